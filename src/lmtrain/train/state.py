"""The live state of a run, and what a checkpoint holds of it (and how to restore it)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtrain import __version__
from lmtrain.checkpoint import FORMAT_VERSION
from lmtrain.config import TrainingConfig
from lmtrain.data.dataset import TokenData
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.distributed import all_gather_objects
from lmtrain.errors import UserError
from lmtrain.reporting import MetricsWriter

log = logging.getLogger("lmtrain")


@dataclass
class RunContext:
    """Everything the training loop reads and advances; built the same for fresh and resume."""

    config: TrainingConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    data: TokenData
    device: torch.device
    sampler: torch.Generator
    run_name: str
    checkpoint_dir: Path
    log_dir: Path
    metrics: MetricsWriter | None = None
    autocast_dtype: torch.dtype | None = None
    grad_scaler: Any = None
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    last_losses: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("data", "train", "eval", "checkpoint"), 0.0))
    is_main: bool = True
    rank: int = 0
    world_size: int = 1
    stop_signal: int | None = None
    saved_steps: list[int] = field(default_factory=list)

    @property
    def raw_model(self) -> nn.Module:
        """The model without DDP / torch.compile wrappers (what checkpoints hold)."""
        m = self.model
        m = getattr(m, "module", m)
        return getattr(m, "_orig_mod", m)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def model_state(model: nn.Module, config: TrainingConfig) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: all of them, or only the LoRA adapter."""
    if config.use_lora:
        from lmtrain.models.lora import adapter_state_dict

        return adapter_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, config: TrainingConfig, sd: dict[str, Any]) -> None:
    if config.use_lora:
        from lmtrain.models.lora import load_adapter_state_dict

        load_adapter_state_dict(model, sd)
        return
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(
            f"the checkpoint's weights do not fit the model built from its settings "
            f"(GPT2_MODEL_NAME={config.gpt2_model_name!r} for gpt2 runs): "
            f"{' '.join(first[1:2] or first[:1])[:200]}; point GPT2_MODEL_NAME at the model "
            f"the run was trained from") from None


def checkpoint_payload(ctx: RunContext, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain-data dict that loads with ``torch.load(weights_only=True)``."""
    cfg = ctx.config
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "lmtrain_version": __version__,
        "step": ctx.step,
        "model_type": cfg.model_type,
        "run_name": ctx.run_name,
        "model_state_dict": model_state(ctx.raw_model, cfg),
        "optimizer_state_dict": ctx.optimizer.state_dict(),
        "scheduler_state_dict": {
            "kind": cfg.lr_scheduler, "warmup_steps": cfg.warmup_steps,
            "lr_decay_steps": cfg.decay_horizon, "min_lr_ratio": cfg.min_lr_ratio,
            "last_lr": ctx.optimizer.param_groups[0]["lr"], "step": ctx.step,
        },
        "hyperparameters": cfg.model_dump(),
        "vocab_size": ctx.tokenizer.vocab_size,
        "block_size": cfg.block_size,
        "batch_size": cfg.batch_size,
        "tokenizer": json.dumps(ctx.tokenizer.state()),
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        "sampler_state": ctx.sampler.get_state(),
        "world_size": ctx.world_size,
        "best_val_loss": ctx.best_val_loss if math.isfinite(ctx.best_val_loss) else None,
        "best_step": ctx.best_step,
        "last_losses": dict(ctx.last_losses),
        "grad_scaler_state_dict": ctx.grad_scaler.state_dict() if ctx.grad_scaler else {},
    }
    if cfg.use_lora:  # the adapter's base model: name + weights fingerprint
        from lmtrain.models.lora import base_reference

        payload["lora_base"] = base_reference(ctx.raw_model)
    payload.update(extra or {})
    return payload


def restore_state(ctx: RunContext, ckpt: dict[str, Any]) -> None:
    """Load weights, optimizer, RNG and sampler state so training continues bit for bit."""
    if ctx.config.use_lora:
        from lmtrain.models.lora import check_base_reference

        check_base_reference(ctx.raw_model, ckpt.get("lora_base"),
                             str(ctx.config.checkpoint_path or "the checkpoint"))
    load_model_state(ctx.raw_model, ctx.config, ckpt["model_state_dict"])
    ctx.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    ctx.step = int(ckpt["step"])
    best = ckpt.get("best_val_loss")
    ctx.best_val_loss = math.inf if best is None else float(best)
    ctx.best_step = ckpt.get("best_step")
    ctx.last_losses = dict(ckpt.get("last_losses") or {})
    if ctx.grad_scaler is not None and ckpt.get("grad_scaler_state_dict"):
        ctx.grad_scaler.load_state_dict(ckpt["grad_scaler_state_dict"])
    torch.set_rng_state(ckpt["rng_state"])
    cuda_states = ckpt.get("cuda_rng_state") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    saved_world = int(ckpt.get("world_size") or 1)
    if saved_world != ctx.world_size:
        _reseed_for_new_world(ctx, saved_world)
        return
    sampler_state = ckpt["sampler_state"]
    if isinstance(sampler_state, list):  # one state per rank (distributed runs)
        sampler_state = sampler_state[ctx.rank]
    ctx.sampler.set_state(sampler_state)
    rank_rng = ckpt.get("rank_rng_states") or []
    if rank_rng:  # each rank's own dropout RNG
        torch.set_rng_state(rank_rng[ctx.rank]["cpu"])
        if ctx.device.type == "cuda" and len(rank_rng[ctx.rank]["cuda"]):
            torch.cuda.set_rng_state(rank_rng[ctx.rank]["cuda"], ctx.device)


def gather_rank_states(ctx: RunContext) -> dict[str, Any]:
    """Checkpoint keys holding every rank's sampler and RNG state (a collective: all ranks
    call it); empty in a single process, whose states :func:`checkpoint_payload` stores."""
    if ctx.world_size == 1:
        return {}
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else torch.empty(0)
    mine = {"sampler": ctx.sampler.get_state(), "cpu": torch.get_rng_state(), "cuda": cuda}
    states = all_gather_objects(mine)
    return {"sampler_state": [s["sampler"] for s in states],
            "rank_rng_states": [{"cpu": s["cpu"], "cuda": s["cuda"]} for s in states]}


def _reseed_for_new_world(ctx: RunContext, saved_world: int) -> None:
    """Batch order and dropout for a resume with another number of processes: seeded from
    (SEED, rank, step), so ranks differ and no rank replays the run's first batches."""
    import numpy as np

    seed = int(np.random.SeedSequence([ctx.config.seed, ctx.rank, ctx.step]).generate_state(1)[0])
    ctx.sampler.manual_seed(seed)
    torch.manual_seed(seed)
    if ctx.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: weights and "
            "optimizer continue, but batch order and dropout are freshly seeded and a step "
            "now takes %d× BATCH_SIZE sequences instead of %d×, so this is not a bit-exact "
            "continuation (resume with the same number of processes for that)", saved_world,
            ctx.world_size, ctx.world_size, saved_world)
