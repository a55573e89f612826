"""Build a run from its plan: what is checked before anything is written, then the run's
:class:`~lmtrain.train.state.Components` (tokenizer, data, model, optimizer) and its
:class:`~lmtrain.progress.TrainProgress`, from scratch and, on resume, restored from the
checkpoint. Fresh and resumed runs share every line. The process group and device are the
session's (:meth:`~lmtrain.train.state.Placement.join`), never joined here.
"""

from __future__ import annotations

import glob
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lmtrain.data.dataset import TokenData
from lmtrain.data.hf_datasets import HF_PREFIX
from lmtrain.data.prepare import load_token_data
from lmtrain.data.tokenizers import Tokenizer, saved_tokenizer
from lmtrain.device import autocast_dtype, make_grad_scaler
from lmtrain.distributed import DistInfo, main_process_first, wrap_model
from lmtrain.host_memory import keep_freed_memory, return_freed_memory
from lmtrain.memory_estimate import check_memory, check_shards_fit, expected_vocab_size
from lmtrain.models import build_model
from lmtrain.progress import TrainProgress
from lmtrain.sharding import check_fsdp_launch, shard_model
from lmtrain.signals import StopRequest
from lmtrain.trackers import check_installed, tracker_names
from lmtrain.train.checkpointing import Checkpointer, check_checkpoint_kind
from lmtrain.train.frozen import store_frozen_base_in
from lmtrain.train.optim import build_optimizer
from lmtrain.train.plan import RunPlan
from lmtrain.train.state import Components, LiveRun, LoopSettings, Placement, RunServices


def assemble(plan: RunPlan, placement: Placement, stop: StopRequest | None = None) -> LiveRun:
    """The run of ``plan`` ready to train: :func:`prepare_run`'s components and progress, the
    settings groups the loop reads, and the services (checkpoints; ``stop``: the session's
    stop request)."""
    parts, progress = prepare_run(plan, placement)
    services = RunServices(Checkpointer.of(plan), stop or StopRequest())
    return LiveRun(parts, progress, LoopSettings.of(plan.config), services)


def prepare_run(plan: RunPlan, placement: Placement) -> tuple[Components, TrainProgress]:
    """Tokenizer, data, model, optimizer and progress for the session's ``placement``: from
    scratch, then restored from the plan's checkpoint. The components' placement adds the
    autocast dtype the model calls for."""
    cfg, device = plan.config, placement.device
    fsdp = cfg.run.parallel == "fsdp"
    if device.type == "cpu":  # DDP: the next step reuses this one's activations (no page
        # faults); FSDP: gathered weights go back as they are freed (a low peak)
        (return_freed_memory if fsdp else keep_freed_memory)()
    torch.manual_seed(cfg.optimization.seed)  # the same initial weights on every rank
    with main_process_first():  # rank 0 fills caches before the others read them
        tokenizer, data = _tokens(plan)
        model = build_model(cfg.model, tokenizer.vocab_size).to(device)
    if placement.world_size > 1:
        torch.manual_seed(cfg.optimization.seed + placement.rank)  # dropout differs between ranks
    dtype = autocast_dtype(cfg.run.precision, device, model)
    if fsdp:  # the optimizer is built over the shards
        check_shards_fit(model, placement.world_size, device)
        shard_model(model, placement.world_size, dtype)
    # Muon's CombinedOptimizer is no torch Optimizer subclass but offers its API
    optimizer = cast(torch.optim.Optimizer, build_optimizer(model, cfg.optimization, device))
    parts = Components(model=model, optimizer=optimizer, tokenizer=tokenizer, data=data,
                       placement=replace(placement, precision=dtype),
                       grad_scaler=make_grad_scaler(dtype, device))
    progress = TrainProgress(
        sampler=torch.Generator().manual_seed(cfg.optimization.seed + placement.rank))
    if plan.resume is not None:
        Checkpointer.of(plan).restore(parts, progress, plan.resume.checkpoint)
    wrapped = model  # FSDP: sharded in place above
    if not fsdp:
        store_frozen_base_in(model, dtype)  # LoRA: cast the frozen base once, not every step
        wrapped = wrap_model(model, DistInfo(placement.rank, placement.local_rank,
                                             placement.world_size), device)
    if cfg.run.compile:  # checkpoints keep the raw model
        wrapped = cast(nn.Module, torch.compile(wrapped))
    return replace(parts, model=wrapped), progress


def _tokens(plan: RunPlan) -> tuple[Tokenizer, TokenData]:
    """The run's tokenizer (the checkpoint's on resume, GPT-2's own BPE for GPT-2) and its
    token data."""
    cfg, ckpt = plan.config, plan.resume.checkpoint if plan.resume else None
    tokenizer = None
    if ckpt is not None:  # validated with the checkpoint; rebuilt with this run's options
        tokenizer = saved_tokenizer(ckpt, drop_unknown=cfg.data.drop_unknown_chars)
    if tokenizer is None and cfg.model.model_type == "gpt2":  # GPT-2's own BPE, checked early
        from lmtrain.models.gpt2 import gpt2_tokenizer

        tokenizer = gpt2_tokenizer(cfg.model, cfg.data)
    return load_token_data(cfg.data, tokenizer, block_size=cfg.model.block_size,
                           allow_download=cfg.model.allow_download)


def check_before_start(plan: RunPlan, placement: Placement) -> None:
    """What can fail without touching the disk fails here, before any folder is created."""
    cfg = plan.config
    check_installed(tracker_names(cfg.run.metrics))  # a missing extra fails before any work
    check_run_memory(plan, placement)
    check_fsdp_launch(cfg.run.parallel, cfg.optimization.optimizer)
    if plan.resume is not None:
        check_checkpoint_kind(plan.resume.checkpoint, cfg.run.parallel)
    source = cfg.data.training_data_source
    if not source.startswith(HF_PREFIX) and not glob.has_magic(source) \
            and not Path(source).expanduser().exists():
        from lmtrain.data.sources import resolve_files

        resolve_files(source)  # raises the one-line error for a missing source


def check_run_memory(plan: RunPlan, placement: Placement) -> None:
    """The model, optimizer and one batch fit the device: else one line naming the setting."""
    cfg = plan.config
    vocab = (plan.resume.checkpoint.vocab_size if plan.resume else expected_vocab_size(
        cfg.model, cfg.data.tokenization_method, cfg.data.custom_vocab_size))
    device = placement.device
    # PARALLEL=fsdp: each process keeps its shard of the weights, gradients and optimizer state
    # (check_shards_fit checks the shards against free memory once the model exists)
    shards = placement.world_size if cfg.run.parallel == "fsdp" else 1
    check_memory(cfg.model, vocab, device.type, cfg.optimization.batch_size,
                 origin="the checkpoint's " if plan.resume else "", index=device.index,
                 shards=shards)
