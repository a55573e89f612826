"""A training session: build the config (fresh or from a checkpoint), assemble the run, train,
evaluate, sample and report. Fresh and resumed runs differ only in where config and state
come from; everything after :func:`prepare_run` is the same code."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import LoadedConfig, load_fresh, load_resumed
from lmtrain.data.prepare import load_token_data
from lmtrain.data.tokenizers import tokenizer_from_state
from lmtrain.device import autocast_dtype, select_device
from lmtrain.generate import generate_text
from lmtrain.models import build_model, count_parameters
from lmtrain.reporting import (
    MetricsWriter,
    close_logging,
    default_run_name,
    setup_logging,
    timestamp,
    write_output_file,
)
from lmtrain.train.loop import evaluate, run_training
from lmtrain.train.optim import build_optimizer
from lmtrain.train.state import RunContext, restore_state

log = logging.getLogger("lmtrain")


@dataclass
class RunSummary:
    """What a finished session reports back (used by the CLI and the tests)."""

    run_name: str
    start_step: int
    end_step: int
    checkpoint_dir: Path
    log_file: Path
    metrics_file: Path
    start_losses: dict[str, float] = field(default_factory=dict)
    final_losses: dict[str, float] = field(default_factory=dict)
    sample: str = ""
    output_file: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def resolve_config(values: dict[str, Any], sources: dict[str, str]
                   ) -> tuple[LoadedConfig, dict[str, Any] | None]:
    """The config of this session and, when resuming, the loaded checkpoint."""
    resume = values.get("checkpoint_path")
    if resume:
        ckpt = load_checkpoint(resume)
        loaded = load_resumed(ckpt["hyperparameters"], values, sources)
        return loaded, ckpt
    loaded = load_fresh(values, sources)
    if loaded.config.lr_decay_steps is None:  # the horizon is saved with the run
        loaded.config.lr_decay_steps = max(loaded.config.training_steps, 1)
        loaded.sources["lr_decay_steps"] = "TRAINING_STEPS"
    return loaded, None


def prepare_run(loaded: LoadedConfig, ckpt: dict[str, Any] | None) -> RunContext:
    """Tokenizer, data, model, optimizer and RNG: from scratch, then restored from ``ckpt``."""
    cfg = loaded.config
    device = select_device(cfg.device)
    run_name = (ckpt or {}).get("run_name") or cfg.run_name or default_run_name(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = (tokenizer_from_state(ckpt["tokenizer"], drop_unknown=cfg.drop_unknown_chars)
                 if ckpt else None)
    tokenizer, data = load_token_data(cfg, tokenizer)
    model = build_model(cfg, tokenizer.vocab_size).to(device)
    ctx = RunContext(
        config=cfg, model=model, optimizer=build_optimizer(model, cfg, device),
        tokenizer=tokenizer, data=data, device=device,
        sampler=torch.Generator().manual_seed(cfg.seed), run_name=run_name,
        checkpoint_dir=Path(cfg.checkpoint_dir) / run_name, log_dir=Path(cfg.log_dir) / run_name,
        autocast_dtype=autocast_dtype(cfg.precision, device),
    )
    if ckpt is not None:
        restore_state(ctx, ckpt)
    return ctx


def steps_to_run(cfg, start: int, resumed: bool) -> int:
    """``RESUME_STEPS`` more steps when given on resume, else up to ``TRAINING_STEPS``."""
    if resumed and cfg.resume_steps is not None:
        return cfg.resume_steps
    return max(cfg.training_steps - start, 0)


def train(values: dict[str, Any], sources: dict[str, str]) -> RunSummary:
    """Run one session from explicit settings (flags/env/file) and their sources."""
    loaded, ckpt = resolve_config(values, sources)
    cfg = loaded.config
    resumed = ckpt is not None
    run_name = (ckpt or {}).get("run_name") or cfg.run_name or default_run_name(cfg)
    cfg.run_name = run_name
    log_dir = Path(cfg.log_dir) / run_name
    kind = f"resume-{int(ckpt['step']):07d}" if resumed else "train"
    log_file = log_dir / f"{kind}-{timestamp()}.log"
    setup_logging(log_file)
    try:
        return _train(loaded, ckpt, log_file)
    finally:
        close_logging()


def _train(loaded: LoadedConfig, ckpt: dict[str, Any] | None, log_file: Path) -> RunSummary:
    cfg = loaded.config
    resumed = ckpt is not None
    t_start = time.perf_counter()
    ctx = prepare_run(loaded, ckpt)
    start = ctx.step
    n_steps = steps_to_run(cfg, start, resumed)
    trainable, total = count_parameters(ctx.raw_model)
    log.info("lmtrain %s run %s", "resuming" if resumed else "starting", ctx.run_name)
    for line in loaded.describe():
        log.info("  %s", line)
    log.info("device %s, precision %s, %s tokenizer (%d tokens), %d train / %d val tokens",
             ctx.device, ctx.autocast_dtype or "fp32", ctx.tokenizer.kind,
             ctx.tokenizer.vocab_size, len(ctx.data.train), len(ctx.data.val))
    log.info("parameters: %s trainable / %s total", f"{trainable:,}", f"{total:,}")
    if resumed:
        log.info("resuming from step %d for %d steps (to step %d)", start, n_steps,
                 start + n_steps)
    summary = RunSummary(
        run_name=ctx.run_name, start_step=start, end_step=start + n_steps,
        checkpoint_dir=ctx.checkpoint_dir, log_file=log_file,
        metrics_file=ctx.log_dir / "metrics.jsonl")
    ctx.metrics = MetricsWriter(summary.metrics_file) if ctx.is_main else None
    try:
        if ctx.metrics:
            ctx.metrics.write(step=start, kind="resume" if resumed else "start",
                              log_file=str(log_file))
        if resumed:
            summary.start_losses = evaluate(ctx)
        run_training(ctx, start, n_steps)
        summary.final_losses = evaluate(ctx)
        summary.sample = _sample(ctx)
        log.info("sample:\n%s", summary.sample)
    finally:
        if ctx.metrics:
            ctx.metrics.close()
    if resumed:
        before, after = summary.start_losses["val"], summary.final_losses["val"]
        log.info("resumed run: val loss %.4f at step %d -> %.4f at step %d (change %+.4f)",
                 before, start, after, ctx.step, after - before)
    if cfg.enable_output_to_file and ctx.is_main:
        summary.output_file = write_output_file(
            cfg, Path(cfg.output_dir), loaded.describe(),
            {"start_step": start, "end_step": ctx.step, **summary.start_losses,
             **{f"final_{k}": v for k, v in summary.final_losses.items()}}, summary.sample)
        log.info("wrote %s", summary.output_file)
    ctx.timings["total"] = time.perf_counter() - t_start
    summary.timings = dict(ctx.timings)
    log.info("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in ctx.timings.items()))
    return summary


def _sample(ctx: RunContext) -> str:
    cfg = ctx.config
    if cfg.max_new_tokens == 0:
        return ""
    prompt = cfg.prompt if cfg.prompt is not None else (
        "QUESTION: " if cfg.model_type == "gpt2" else "")
    return generate_text(
        ctx.raw_model, ctx.tokenizer.encode, ctx.tokenizer.decode, prompt, cfg.max_new_tokens,
        cfg.block_size, ctx.device, cfg.temperature, cfg.top_k, seed=cfg.seed)
