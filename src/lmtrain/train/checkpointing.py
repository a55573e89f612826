"""A live run into its checkpoint and back: :func:`build` the payload (with every rank's
generator states, :func:`gather_rank_states`) and :func:`restore` a saved run into a freshly
assembled one so that training continues bit for bit. The format itself is
:mod:`lmtrain.checkpoint_format`'s; the files are :mod:`lmtrain.checkpoint`'s."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain import __version__
from lmtrain.checkpoint_format import (
    BATCH_SIZE_KEY,
    BEST_STEP_KEY,
    BEST_VAL_LOSS_KEY,
    BLOCK_SIZE_KEY,
    CUDA_RNG_STATE_KEY,
    FORMAT_VERSION,
    FORMAT_VERSION_KEY,
    GRAD_SCALER_STATE_KEY,
    HYPERPARAMETERS_KEY,
    LAST_LOSSES_KEY,
    LMTRAIN_VERSION_KEY,
    LORA_BASE_KEY,
    MODEL_STATE_KEY,
    MODEL_TYPE_KEY,
    OPTIMIZER_STATE_KEY,
    RANK_CPU,
    RANK_CUDA,
    RANK_RNG_STATES_KEY,
    RNG_STATE_KEY,
    RUN_NAME_KEY,
    SAMPLER_STATE_KEY,
    SCHEDULER_STATE_KEY,
    STEP_KEY,
    TOKENIZER_KEY,
    TRACKER_RUN_IDS_KEY,
    VOCAB_SIZE_KEY,
    WORLD_SIZE_KEY,
    SavedRun,
)
from lmtrain.distributed import all_gather_objects, broadcast_object
from lmtrain.errors import UserError
from lmtrain.models.gpt2 import model_positions
from lmtrain.models.weights import load_weights, model_state
from lmtrain.sharded_checkpoint import ShardedRun, load_sharded_state, save_sharded
from lmtrain.train.optim import load_optimizer_state
from lmtrain.train.state import RunContext

log = logging.getLogger("lmtrain")


def _scheduler_state(ctx: RunContext) -> dict[str, Any]:
    """The schedule's parameters (the schedule is a pure function of the step; kept for
    readers of the file)."""
    opt = ctx.config.optimization
    return {"kind": opt.lr_scheduler, "warmup_steps": opt.warmup_steps,
            "lr_decay_steps": opt.decay_horizon, "min_lr_ratio": opt.min_lr_ratio,
            "last_lr": ctx.optimizer.param_groups[0]["lr"], "step": ctx.step}


def _hyperparameters(ctx: RunContext) -> dict[str, Any]:
    """Every setting, plus the model's context limit (``n_positions``)."""
    cfg = ctx.config
    return {**cfg.flat(), "n_positions": model_positions(ctx.raw_model) or cfg.model.block_size}


def build(ctx: RunContext, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of ``ctx`` now: plain data that loads with ``weights_only=True``.

    ``extra`` holds the per-rank states of a distributed run (see :func:`gather_rank_states`).
    The digest is added when the file is written (:func:`lmtrain.checkpoint.save_checkpoint`).
    """
    cfg = ctx.config
    payload: dict[str, Any] = {
        FORMAT_VERSION_KEY: FORMAT_VERSION,
        LMTRAIN_VERSION_KEY: __version__,
        STEP_KEY: ctx.step,
        MODEL_TYPE_KEY: cfg.model.model_type,
        RUN_NAME_KEY: ctx.run_name,
        MODEL_STATE_KEY: model_state(ctx.raw_model, cfg.model),
        OPTIMIZER_STATE_KEY: ctx.optimizer.state_dict(),
        SCHEDULER_STATE_KEY: _scheduler_state(ctx),
        HYPERPARAMETERS_KEY: _hyperparameters(ctx),
        VOCAB_SIZE_KEY: ctx.tokenizer.vocab_size,
        BLOCK_SIZE_KEY: cfg.model.block_size,
        BATCH_SIZE_KEY: cfg.optimization.batch_size,
        TOKENIZER_KEY: json.dumps(ctx.tokenizer.state()),
        RNG_STATE_KEY: torch.get_rng_state(),
        CUDA_RNG_STATE_KEY: (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                             else []),
        SAMPLER_STATE_KEY: ctx.sampler.get_state(),
        WORLD_SIZE_KEY: ctx.world_size,
        BEST_VAL_LOSS_KEY: ctx.best_val_loss if math.isfinite(ctx.best_val_loss) else None,
        BEST_STEP_KEY: ctx.best_step,
        LAST_LOSSES_KEY: dict(ctx.last_losses),
        GRAD_SCALER_STATE_KEY: ctx.grad_scaler.state_dict() if ctx.grad_scaler else {},
        TRACKER_RUN_IDS_KEY: dict(ctx.tracker_run_ids),
    }
    if cfg.model.use_lora:  # the adapter's base model: name + weights fingerprint
        from lmtrain.models.lora import base_reference

        payload[LORA_BASE_KEY] = base_reference(ctx.raw_model)
    payload.update(extra or {})
    return payload


def gather_rank_states(ctx: RunContext) -> dict[str, Any]:
    """Checkpoint keys holding every rank's sampler and RNG state (a collective: all ranks
    call it); empty in a single process, whose states the checkpoint's own keys hold."""
    if ctx.world_size == 1:
        return {}
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else torch.empty(0)
    mine = {"sampler": ctx.sampler.get_state(), RANK_CPU: torch.get_rng_state(), RANK_CUDA: cuda}
    states = all_gather_objects(mine)
    return {SAMPLER_STATE_KEY: [s["sampler"] for s in states],
            RANK_RNG_STATES_KEY: [{RANK_CPU: s[RANK_CPU], RANK_CUDA: s[RANK_CUDA]}
                                  for s in states]}


def restore(ctx: RunContext, run: SavedRun) -> None:
    """Load weights, optimizer, bookkeeping, RNG and sampler state so training continues bit
    for bit. Reads ``run`` (validated when it was loaded) and never changes it."""
    if isinstance(run, ShardedRun):  # PARALLEL=fsdp: DCP reshards onto this world size
        _load_sharded(ctx, run)
    else:
        load_weights(ctx.raw_model, ctx.config.model, run)
        load_optimizer_state(ctx.optimizer, run.optimizer_state, run.where)
    ctx.step = run.step
    best = run.best_val_loss
    ctx.best_val_loss = math.inf if best is None else best
    ctx.best_step = run.best_step
    ctx.last_losses = run.last_losses
    # a branch (or a renamed run) is a tracker run of its own
    ctx.tracker_run_ids = run.tracker_run_ids if run.run_name == ctx.run_name else {}
    if ctx.grad_scaler is not None and run.grad_scaler_state:
        ctx.grad_scaler.load_state_dict(run.grad_scaler_state)
    _restore_generators(ctx, run)


def _restore_generators(ctx: RunContext, run: SavedRun) -> None:
    """The global, CUDA, sampler and per-rank generators; freshly seeded for another world."""
    torch.set_rng_state(run.rng_state)
    cuda_states = run.cuda_rng_states
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    if run.world_size != ctx.world_size:
        _reseed_for_new_world(ctx, run.world_size)
        return
    ctx.sampler.set_state(run.sampler_state(ctx.rank))
    mine = run.rank_rng_state(ctx.rank)
    if mine is not None:  # each rank's own dropout RNG
        cpu, cuda = mine
        torch.set_rng_state(cpu)
        if ctx.device.type == "cuda" and len(cuda):
            torch.cuda.set_rng_state(cuda, ctx.device)


def _reseed_for_new_world(ctx: RunContext, saved_world: int) -> None:
    """Batch order and dropout for a resume with another number of processes: seeded from
    (SEED, rank, step), so ranks differ and no rank replays the run's first batches."""
    seed = int(np.random.SeedSequence([ctx.config.optimization.seed, ctx.rank,
                                       ctx.step]).generate_state(1)[0])
    ctx.sampler.manual_seed(seed)
    torch.manual_seed(seed)
    if ctx.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: weights and "
            "optimizer continue, but batch order and dropout are freshly seeded and a step "
            "now takes %d× BATCH_SIZE sequences instead of %d×, so this is not a bit-exact "
            "continuation (resume with the same number of processes for that)", saved_world,
            ctx.world_size, ctx.world_size, saved_world)



def _load_sharded(ctx: RunContext, run: ShardedRun) -> None:
    """The weights and optimizer state of a sharded checkpoint (LoRA: the adapter's, once its
    base is verified)."""
    lora = ctx.config.model.use_lora
    if lora:
        from lmtrain.models.lora import check_base_reference

        base = run.lora_base
        check_base_reference(ctx.raw_model, dict(base) if base else None, run.where)
    load_sharded_state(run, ctx.raw_model, ctx.optimizer, trainable_only=lora)


def write_sharded(ctx: RunContext, folder: Path, extra: dict[str, Any]) -> None:
    """The sharded checkpoint of ``ctx`` now (``PARALLEL=fsdp``; a collective). A write that
    failed on any rank raises ``OSError`` on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    payload = build(ctx, extra) if ctx.is_main else {}
    try:
        save_sharded(folder, ctx.raw_model, ctx.optimizer, payload, ctx.is_main,
                     ctx.world_size, trainable_only=ctx.config.model.use_lora,
                     agree=broadcast_object)
    except CheckpointException as exc:  # DCP's: raised on every rank
        raise OSError(str(exc).strip().splitlines()[-1][:160] or "DCP write failed") from None


def check_checkpoint_kind(run: SavedRun, parallel: str) -> None:
    """A sharded checkpoint resumes only a ``PARALLEL=fsdp`` run, a single file only the
    others; one line naming the fix otherwise."""
    sharded = isinstance(run, ShardedRun)
    if sharded and parallel != "fsdp":
        raise UserError(f"{run.where} is a sharded checkpoint (PARALLEL=fsdp); resume it with "
                        f"PARALLEL=fsdp under torchrun, or make it one file with `lmtrain "
                        f"checkpoint consolidate` and resume that")
    if not sharded and parallel == "fsdp":
        raise UserError(f"{run.where} is a single-file checkpoint; resume it with PARALLEL=ddp "
                        f"(the default), or start a fresh PARALLEL=fsdp run")
