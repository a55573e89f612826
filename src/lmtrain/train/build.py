"""Build a run from its plan: what is checked before anything is written, then the tokenizer,
data, model, optimizer and RNG of a :class:`~lmtrain.train.state.RunContext`, from scratch and,
on resume, restored from the checkpoint. Fresh and resumed runs share every line.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lmtrain.data.hf_datasets import HF_PREFIX
from lmtrain.data.prepare import load_token_data
from lmtrain.device import autocast_dtype, make_grad_scaler, select_device
from lmtrain.distributed import DistInfo, init_distributed, main_process_first, wrap_model
from lmtrain.host_memory import keep_freed_memory, return_freed_memory
from lmtrain.models import build_model
from lmtrain.sharding import check_fits, check_fsdp_launch, shard_model
from lmtrain.trackers import check_installed, tracker_names
from lmtrain.train.checkpointing import check_checkpoint_kind, restore
from lmtrain.train.frozen import store_frozen_base_in
from lmtrain.train.optim import build_optimizer
from lmtrain.train.plan import RunPlan
from lmtrain.train.state import RunContext


def prepare_run(plan: RunPlan, placement: tuple[DistInfo, torch.device] | None = None,
                ) -> RunContext:
    """Tokenizer, data, model, optimizer and RNG: from scratch, then restored from the plan's
    checkpoint. ``placement`` is the session's (process group, device); joined here if absent."""
    cfg = plan.config
    dist_info, device = placement or init_distributed(select_device(cfg.run.device))
    fsdp = cfg.run.parallel == "fsdp"
    if device.type == "cpu":  # DDP: the next step reuses this one's activations (no page
        # faults); FSDP: gathered weights go back as they are freed (a low peak)
        (return_freed_memory if fsdp else keep_freed_memory)()
    ckpt = plan.resume.checkpoint if plan.resume else None
    torch.manual_seed(cfg.optimization.seed)  # the same initial weights on every rank
    with main_process_first():  # rank 0 fills caches before the others read them
        tokenizer = None
        if ckpt is not None:  # validated with the checkpoint; rebuilt with this run's options
            from lmtrain.data.tokenizers import saved_tokenizer

            tokenizer = saved_tokenizer(ckpt, drop_unknown=cfg.data.drop_unknown_chars)
        if tokenizer is None and cfg.model.model_type == "gpt2":  # GPT-2's own BPE, checked early
            from lmtrain.models.gpt2 import gpt2_tokenizer

            tokenizer = gpt2_tokenizer(cfg.model, cfg.data)
        tokenizer, data = load_token_data(cfg.data, tokenizer, block_size=cfg.model.block_size,
                                          allow_download=cfg.model.allow_download)
        model = build_model(cfg.model, tokenizer.vocab_size).to(device)
    if dist_info.world_size > 1:
        torch.manual_seed(cfg.optimization.seed + dist_info.rank)  # dropout differs between ranks
    dtype = autocast_dtype(cfg.run.precision, device, model)
    if fsdp:  # the optimizer is built over the shards
        check_fits(model, dist_info.world_size, device)
        shard_model(model, dist_info.world_size, dtype)
    # Muon's CombinedOptimizer is no torch Optimizer subclass but offers its API
    optimizer = cast(torch.optim.Optimizer, build_optimizer(model, cfg.optimization, device))
    ctx = RunContext(
        config=cfg, model=model, optimizer=optimizer,
        tokenizer=tokenizer, data=data, device=device,
        sampler=torch.Generator().manual_seed(cfg.optimization.seed + dist_info.rank),
        run_name=plan.run_name, checkpoint_dir=plan.paths.checkpoints, log_dir=plan.paths.logs,
        autocast_dtype=dtype, grad_scaler=make_grad_scaler(dtype, device),
        is_main=dist_info.is_main, rank=dist_info.rank, world_size=dist_info.world_size,
    )
    if plan.resume is not None:
        restore(ctx, plan.resume.checkpoint)
    if not fsdp:
        store_frozen_base_in(ctx.model, dtype)  # LoRA: cast the frozen base once, not every step
        ctx.model = wrap_model(ctx.model, dist_info, device)  # checkpoints keep the raw model
    if cfg.run.compile:
        ctx.model = cast(nn.Module, torch.compile(ctx.model))
    return ctx


def check_before_start(plan: RunPlan) -> None:
    """What can fail without touching the disk fails here, before any folder is created."""
    cfg = plan.config
    check_installed(tracker_names(cfg.run.metrics))  # a missing extra fails before any work
    check_fsdp_launch(cfg.run.parallel, cfg.optimization.optimizer)
    if plan.resume is not None:
        check_checkpoint_kind(plan.resume.checkpoint, cfg.run.parallel)
    source = cfg.data.training_data_source
    if not source.startswith(HF_PREFIX) and not glob.has_magic(source) \
            and not Path(source).expanduser().exists():
        from lmtrain.data.sources import resolve_files

        resolve_files(source)  # raises the one-line error for a missing source
