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

from lmtrain.advice import run_warnings
from lmtrain.checkpoint import (
    AUTO_RESUME,
    checkpoint_filename,
    ensure_writable_dir,
    find_resumable,
    load_checkpoint,
    remove_stale_temp_files,
)
from lmtrain.config import LoadedConfig, TrainingConfig, load_fresh, load_resumed
from lmtrain.data.prepare import load_token_data
from lmtrain.data.tokenizers import tokenizer_from_state
from lmtrain.device import autocast_dtype, make_grad_scaler, select_device
from lmtrain.distributed import (
    broadcast_object,
    cleanup,
    init_distributed,
    main_process_first,
    wrap_model,
)
from lmtrain.errors import TrainingInterrupted
from lmtrain.generate import default_prompt, generate_text, start_context
from lmtrain.models import build_model, count_parameters
from lmtrain.reporting import (
    MetricsWriter,
    close_logging,
    default_run_name,
    setup_logging,
    stable_run_name,
    timestamp,
    write_output_file,
)
from lmtrain.signals import StopRequest, signal_name, stop_on_signals
from lmtrain.train.loop import evaluate, run_training, share_stop_signal
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
    plot_file: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def resolve_config(values: dict[str, Any], sources: dict[str, str],
                   notes: list[str] | None = None,
                   ) -> tuple[LoadedConfig, dict[str, Any] | None]:
    """The config of this session and, when resuming, the loaded checkpoint.

    ``CHECKPOINT_PATH=auto`` resumes the newest valid checkpoint in CHECKPOINT_DIR/RUN_NAME
    (RUN_NAME defaults to ``<model>-<data>``, without a timestamp) or starts that run fresh;
    what it found or skipped is appended to ``notes``.
    """
    resume = values.get("checkpoint_path")
    if str(resume).strip().lower() == AUTO_RESUME:
        fresh = _load_fresh(values, sources)
        run_name = fresh.config.run_name or stable_run_name(fresh.config)
        folder = Path(fresh.config.checkpoint_dir) / run_name
        path, ckpt, problems = find_resumable(folder)
        if notes is not None:
            notes.extend(f"CHECKPOINT_PATH=auto: {p}" for p in problems)
            notes.append(f"CHECKPOINT_PATH=auto: resuming {path}" if path else
                         f"CHECKPOINT_PATH=auto: no usable checkpoint in {folder}; "
                         f"starting run {run_name} fresh")
        if path is None:
            fresh.config.run_name, fresh.config.checkpoint_path = run_name, None
            return fresh, None
        values = {**values, "checkpoint_path": str(path)}
        ckpt["run_name"] = run_name  # keep writing where the next launch will look
    elif resume:
        ckpt = load_checkpoint(resume)
    else:
        return _load_fresh(values, sources), None
    return load_resumed(ckpt["hyperparameters"], values, sources), ckpt


def _load_fresh(values: dict[str, Any], sources: dict[str, str]) -> LoadedConfig:
    loaded = load_fresh(values, sources)
    if loaded.config.lr_decay_steps is None:  # the horizon is saved with the run
        loaded.config.lr_decay_steps = max(loaded.config.training_steps, 1)
        loaded.sources["lr_decay_steps"] = "TRAINING_STEPS"
    return loaded


def run_name_for(cfg: TrainingConfig, ckpt: dict[str, Any] | None) -> str:
    """A resumed run keeps writing under its checkpoint's run name; a fresh one uses RUN_NAME
    or a new ``<model>-<data>-<timestamp>``."""
    return (ckpt or {}).get("run_name") or cfg.run_name or default_run_name(cfg)


def prepare_run(loaded: LoadedConfig, ckpt: dict[str, Any] | None) -> RunContext:
    """Tokenizer, data, model, optimizer and RNG: from scratch, then restored from ``ckpt``."""
    cfg = loaded.config
    dist_info, device = init_distributed(select_device(cfg.device))
    run_name = run_name_for(cfg, ckpt)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    with main_process_first():  # rank 0 fills caches before the others read them
        tokenizer = (tokenizer_from_state(ckpt["tokenizer"], drop_unknown=cfg.drop_unknown_chars)
                     if ckpt else None)
        if tokenizer is None and cfg.model_type == "gpt2":  # GPT-2's own BPE, checked early
            from lmtrain.models.gpt2 import gpt2_tokenizer

            tokenizer = gpt2_tokenizer(cfg)
        tokenizer, data = load_token_data(cfg, tokenizer)
        model = build_model(cfg, tokenizer.vocab_size).to(device)
    if dist_info.world_size > 1:
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout differs between ranks
    dtype = autocast_dtype(cfg.precision, device, model)
    ctx = RunContext(
        config=cfg, model=model, optimizer=build_optimizer(model, cfg, device),
        tokenizer=tokenizer, data=data, device=device,
        sampler=torch.Generator().manual_seed(cfg.seed + dist_info.rank), run_name=run_name,
        checkpoint_dir=Path(cfg.checkpoint_dir) / run_name, log_dir=Path(cfg.log_dir) / run_name,
        autocast_dtype=dtype, grad_scaler=make_grad_scaler(dtype, device),
        is_main=dist_info.is_main, rank=dist_info.rank, world_size=dist_info.world_size,
    )
    if ckpt is not None:
        restore_state(ctx, ckpt)
    ctx.model = wrap_model(ctx.model, dist_info, device)  # checkpoints keep the raw model
    if cfg.compile:
        ctx.model = torch.compile(ctx.model)
    return ctx


def steps_to_run(cfg, start: int, resumed: bool) -> int:
    """``RESUME_STEPS`` more steps when given on resume, else up to ``TRAINING_STEPS``."""
    if resumed and cfg.resume_steps is not None:
        return cfg.resume_steps
    return max(cfg.training_steps - start, 0)


def train(values: dict[str, Any], sources: dict[str, str]) -> RunSummary:
    """Run one session from explicit settings (flags/env/file) and their sources.

    SIGINT / SIGTERM stop it cleanly: see :mod:`lmtrain.signals`.
    """
    with stop_on_signals() as stop:
        return _session(values, sources, stop)


def _session(values: dict[str, Any], sources: dict[str, str], stop: StopRequest) -> RunSummary:
    notes: list[str] = []
    loaded, ckpt = resolve_config(values, sources, notes)
    cfg = loaded.config
    resumed = ckpt is not None
    dist_info, _ = init_distributed(select_device(cfg.device))  # torchrun: join the group
    try:
        # rank 0's name (default names hold a timestamp, which differs between processes)
        run_name = broadcast_object(run_name_for(cfg, ckpt))
        cfg.run_name = run_name
        log_dir = Path(cfg.log_dir) / run_name
        _check_storage(cfg, run_name)
        kind = f"resume-{int(ckpt['step']):07d}" if resumed else "train"
        log_file = log_dir / f"{kind}-{timestamp()}.log"
        # only rank 0 writes the log; the other ranks stay quiet (errors still reach stderr)
        setup_logging(log_file if dist_info.is_main else None, quiet=not dist_info.is_main)
        try:
            for note in notes:
                log.warning(note)
            if dist_info.is_main:
                for leftover in remove_stale_temp_files(Path(cfg.checkpoint_dir) / run_name):
                    log.warning("removed %s, left by an interrupted checkpoint write", leftover)
            return _train(loaded, ckpt, log_file, stop)
        finally:
            close_logging()
    finally:
        cleanup()


def _check_storage(cfg, run_name: str) -> None:
    """Find unwritable output folders before any work is done."""
    ensure_writable_dir(Path(cfg.log_dir) / run_name, "LOG_DIR")
    if cfg.enable_checkpoints:
        ensure_writable_dir(Path(cfg.checkpoint_dir) / run_name, "CHECKPOINT_DIR")
    if cfg.enable_output_to_file:
        ensure_writable_dir(Path(cfg.output_dir), "OUTPUT_DIR")


def _interrupted(exc: TrainingInterrupted, ctx: RunContext, start: int, end: int,
                 resume_path: str | None) -> TrainingInterrupted:
    """Complete a stop request with the checkpoint to resume from; logged in the run's log."""
    exc.checkpoint, exc.step = None, ctx.step
    if ctx.saved_steps:
        exc.step = ctx.saved_steps[-1]
        exc.checkpoint = ctx.checkpoint_dir / checkpoint_filename(exc.step)
    elif resume_path and ctx.step == start:  # nothing newer: resume where this one began
        exc.checkpoint = resume_path
    elif ctx.step == start:
        exc.step = None  # nothing trained yet
    if exc.checkpoint is not None:
        remaining = max(end - exc.step, 0)
        plain = max(ctx.config.training_steps - exc.step, 0)
        exc.resume_steps = None if remaining == plain else remaining
    log.warning("interrupted by %s at step %d; checkpoint: %s", signal_name(exc.signum),
                ctx.step, exc.checkpoint or "none")
    return exc


def _train(loaded: LoadedConfig, ckpt: dict[str, Any] | None, log_file: Path,
           stop: StopRequest) -> RunSummary:
    cfg = loaded.config
    resumed = ckpt is not None
    resume_path = cfg.checkpoint_path if resumed else None
    t_start = time.perf_counter()
    stop.check(resume_path)
    ctx = prepare_run(loaded, ckpt)
    ctx.timings["setup"] = time.perf_counter() - t_start  # data preparation, model, restore
    start = ctx.step
    n_steps = steps_to_run(cfg, start, resumed)
    stop.attach(ctx)
    if ctx.stop_signal is not None:  # a signal while the run was being prepared
        raise _interrupted(TrainingInterrupted(ctx.stop_signal), ctx, start, start + n_steps,
                           resume_path)
    if cfg.max_new_tokens:  # a prompt the tokenizer cannot encode fails now, not after training
        start_context(ctx.tokenizer, default_prompt(cfg))
    trainable, total = count_parameters(ctx.raw_model)
    log.info("lmtrain %s run %s", "resuming" if resumed else "starting", ctx.run_name)
    for line in loaded.describe():
        log.info("  %s", line)
    log.info("device %s, precision %s, %s tokenizer (%d tokens), %d train / %d val tokens",
             ctx.device, ctx.autocast_dtype or "fp32", ctx.tokenizer.kind,
             ctx.tokenizer.vocab_size, len(ctx.data.train), len(ctx.data.val))
    if ctx.world_size > 1 or cfg.compile:
        log.info("%d process(es) (DistributedDataParallel when > 1), torch.compile %s",
                 ctx.world_size, "on" if cfg.compile else "off")
    log.info("parameters: %s trainable / %s total", f"{trainable:,}", f"{total:,}")
    if resumed:
        log.info("resuming from step %d for %d steps (to step %d)", start, n_steps,
                 start + n_steps)
    for warning in run_warnings(cfg, start, resumed):
        log.warning(warning)
    summary = RunSummary(
        run_name=ctx.run_name, start_step=start, end_step=start + n_steps,
        checkpoint_dir=ctx.checkpoint_dir, log_file=log_file,
        metrics_file=ctx.log_dir / "metrics.jsonl")
    ctx.metrics = (MetricsWriter(summary.metrics_file, tensorboard=cfg.metrics == "tensorboard")
                   if ctx.is_main else None)
    try:
        if ctx.metrics:
            ctx.metrics.write(step=start, kind="resume" if resumed else "start",
                              log_file=str(log_file))
        if resumed:
            summary.start_losses = evaluate(ctx)
        try:
            run_training(ctx, start, n_steps)
            share_stop_signal(ctx)  # a signal seen by any rank during the final save stops all
            stop.check()  # a signal during the last step: the final checkpoint is written
        except TrainingInterrupted as exc:
            raise _interrupted(exc, ctx, start, start + n_steps, resume_path) from None
        fresh_eval = ctx.last_losses.get("step") == ctx.step
        summary.final_losses = dict(ctx.last_losses) if fresh_eval else evaluate(ctx)
        summary.final_losses.pop("step", None)
        t_sample = time.perf_counter()
        summary.sample = _sample(ctx) if ctx.is_main else ""
        ctx.timings["sample"] = time.perf_counter() - t_sample
        log.info("sample:\n%s", summary.sample)
    finally:
        if ctx.metrics:
            ctx.metrics.close()
    if ctx.is_main:
        summary.plot_file = _plot(summary.metrics_file)
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
    total = time.perf_counter() - t_start
    ctx.timings["other"] = max(total - sum(ctx.timings.values()), 0.0)  # logs, metrics, plot
    ctx.timings["total"] = total
    summary.timings = dict(ctx.timings)
    log.info("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in ctx.timings.items()))
    return summary


def _plot(metrics_file: Path) -> Path | None:
    """The loss-curve PNG beside the metrics; a plotting failure never fails the run."""
    from lmtrain.plotting import plot_losses

    try:
        path = plot_losses(metrics_file)
    except Exception as exc:  # a missing plot must not lose a finished run
        log.warning("could not draw the loss plot: %s", exc)
        return None
    log.info("loss plot: %s", path)
    return path


def _sample(ctx: RunContext) -> str:
    cfg = ctx.config
    if cfg.max_new_tokens == 0:
        return ""
    return generate_text(ctx.raw_model, ctx.tokenizer, default_prompt(cfg), cfg.max_new_tokens,
                         cfg.block_size, ctx.device, cfg.temperature, cfg.top_k, seed=cfg.seed,
                         top_p=cfg.top_p, stop_at_eot=cfg.stop_at_eot)
