"""A training session: run a :class:`~lmtrain.train.plan.RunPlan` (resolved once from the
settings and the checkpoint): lock the run folder, assemble the run, train, evaluate, sample
and report. Fresh and resumed runs differ only in where config and state come from;
everything after :func:`prepare_run` is the same code."""

from __future__ import annotations

import contextlib
import glob
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtrain.advice import run_warnings, steps_to_run
from lmtrain.checkpoint import checkpoint_filename
from lmtrain.checkpoint_schema import restore
from lmtrain.config import FIELDS
from lmtrain.data.hf_datasets import HF_PREFIX
from lmtrain.data.prepare import load_token_data
from lmtrain.device import autocast_dtype, make_grad_scaler, select_device
from lmtrain.distributed import (
    DistInfo,
    broadcast_object,
    cleanup,
    init_distributed,
    main_process_first,
    wrap_model,
)
from lmtrain.durable import ensure_writable_dir, remove_stale_temp_files
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.generate import default_prompt, generate_text, start_context
from lmtrain.models import build_model, count_parameters
from lmtrain.perplexity import perplexity
from lmtrain.reporting import (
    close_logging,
    open_metrics,
    setup_logging,
    timestamp,
    write_output_file,
)
from lmtrain.run_folder import LOCK_NAME, RunLock
from lmtrain.signals import StopRequest, resume_commands, signal_name, stop_on_signals
from lmtrain.trackers import check_installed, tracker_names
from lmtrain.train.frozen import store_frozen_base_in
from lmtrain.train.loop import evaluate, run_training, share_stop_signal
from lmtrain.train.optim import build_optimizer
from lmtrain.train.plan import RunPlan, resolve_plan
from lmtrain.train.state import RunContext

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


def prepare_run(plan: RunPlan, placement: tuple[DistInfo, torch.device] | None = None,
                ) -> RunContext:
    """Tokenizer, data, model, optimizer and RNG: from scratch, then restored from the plan's
    checkpoint. ``placement`` is the session's (process group, device); joined here if absent."""
    cfg = plan.config
    dist_info, device = placement or init_distributed(select_device(cfg.device))
    ckpt = plan.resume.checkpoint if plan.resume else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    with main_process_first():  # rank 0 fills caches before the others read them
        tokenizer = None
        if ckpt is not None:  # validated with the checkpoint; rebuilt with this run's options
            from lmtrain.data.tokenizers import tokenizer_from_state

            tokenizer = tokenizer_from_state(ckpt["tokenizer"],
                                             drop_unknown=cfg.drop_unknown_chars)
        if tokenizer is None and cfg.model_type == "gpt2":  # GPT-2's own BPE, checked early
            from lmtrain.models.gpt2 import gpt2_tokenizer

            tokenizer = gpt2_tokenizer(cfg.model, cfg.data)
        tokenizer, data = load_token_data(cfg.data, tokenizer, block_size=cfg.block_size,
                                          allow_download=cfg.allow_download)
        model = build_model(cfg.model, tokenizer.vocab_size).to(device)
    if dist_info.world_size > 1:
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout differs between ranks
    dtype = autocast_dtype(cfg.precision, device, model)
    ctx = RunContext(
        config=cfg, model=model, optimizer=build_optimizer(model, cfg.optimization, device),
        tokenizer=tokenizer, data=data, device=device,
        sampler=torch.Generator().manual_seed(cfg.seed + dist_info.rank),
        run_name=plan.run_name, checkpoint_dir=plan.paths.checkpoints, log_dir=plan.paths.logs,
        autocast_dtype=dtype, grad_scaler=make_grad_scaler(dtype, device),
        is_main=dist_info.is_main, rank=dist_info.rank, world_size=dist_info.world_size,
    )
    if plan.resume is not None:
        restore(ctx, plan.resume.checkpoint, f"CHECKPOINT_PATH={str(plan.resume.path)!r}")
    store_frozen_base_in(ctx.model, dtype)  # LoRA: cast the frozen base once, not every step
    ctx.model = wrap_model(ctx.model, dist_info, device)  # checkpoints keep the raw model
    if cfg.compile:
        ctx.model = torch.compile(ctx.model)
    return ctx


def train(values: dict[str, Any], sources: dict[str, str]) -> RunSummary:
    """Run one session from explicit settings (flags/env/file) and their sources.

    SIGINT / SIGTERM stop it cleanly: see :mod:`lmtrain.signals` (an entrypoint that already
    handles them shares its stop request).
    """
    with stop_on_signals() as stop:
        return _session(values, sources, stop)


def _session(values: dict[str, Any], sources: dict[str, str], stop: StopRequest) -> RunSummary:
    """Join the process group once, resolve the plan, check what can be checked before
    anything is created, then claim the run's folders, open the log and run the plan."""
    placement = init_distributed(select_device(str(values.get("device") or
                                                   FIELDS["device"].default)))
    dist_info = placement[0]
    with contextlib.ExitStack() as stack:  # undone in reverse: log, folders, process group
        stack.callback(cleanup)
        plan = resolve_plan(values, sources, agree=broadcast_object)
        _check_before_start(plan)
        _claim_run_folders(stack, plan, dist_info)
        _check_storage(plan)
        kind = f"resume-{plan.resume.step:07d}" if plan.resume else "train"
        log_file = plan.paths.logs / f"{kind}-{timestamp()}.log"
        # only rank 0 writes the log; the other ranks stay quiet (errors still reach stderr)
        setup_logging(log_file if dist_info.is_main else None, quiet=not dist_info.is_main)
        stack.callback(close_logging)
        try:
            for note in plan.notes:
                log.warning(note)
            if dist_info.is_main:
                for leftover in remove_stale_temp_files(plan.paths.checkpoints):
                    log.warning("removed %s, left by an interrupted checkpoint write", leftover)
            return _train(plan, placement, log_file, stop)
        except UserError as exc:  # the log, once created, holds the error too
            log.error("error: %s", exc, extra={"file_only": True})
            raise


def _claim_run_folders(stack: contextlib.ExitStack, plan: RunPlan, dist_info: DistInfo) -> None:
    """Lock the run's folders for this run (rank 0, for all ranks) until ``stack`` closes;
    then a folder this session created and left empty but for its lock is removed again."""
    created = [p for p in (plan.paths.checkpoints, plan.paths.logs) if not p.exists()]
    if dist_info.is_main:
        stack.callback(_remove_unused, created)
    for lock in _lock_run(plan, dist_info):
        stack.callback(lock.release)


def _check_before_start(plan: RunPlan) -> None:
    """What can fail without touching the disk fails here, before any folder is created."""
    cfg = plan.config
    check_installed(tracker_names(cfg.metrics))  # a missing extra fails before any work
    source = cfg.training_data_source
    if not source.startswith(HF_PREFIX) and not glob.has_magic(source) \
            and not Path(source).expanduser().exists():
        from lmtrain.data.sources import resolve_files

        resolve_files(source)  # raises the one-line error for a missing source


def _lock_run(plan: RunPlan, dist_info: DistInfo) -> list[RunLock]:
    """The run folders' locks (checkpoints, then logs), taken by rank 0 for all ranks of the
    run: one writer per run."""
    folders = [(plan.paths.logs, "LOG_DIR")]
    if plan.config.enable_checkpoints:
        folders.insert(0, (plan.paths.checkpoints, "CHECKPOINT_DIR"))
    locks: list[RunLock] = []
    error = None
    if dist_info.is_main:
        try:
            for folder, setting in folders:
                locks.append(RunLock(folder).acquire(setting))
        except UserError as exc:
            error = str(exc)
            for lock in locks:
                lock.release()
    if dist_info.world_size > 1:
        error = broadcast_object(error)
    if error:
        raise UserError(error)
    return locks


def _remove_unused(created: list[Path]) -> None:
    """Remove run folders this session created that hold nothing but the lock file."""
    for folder in created:
        try:
            entries = list(folder.iterdir())
            if all(p.name == LOCK_NAME for p in entries):
                for p in entries:
                    p.unlink()
                folder.rmdir()
        except OSError:
            continue


def _check_storage(plan: RunPlan) -> None:
    """Find unwritable output folders before any work is done."""
    cfg = plan.config
    ensure_writable_dir(plan.paths.logs, "LOG_DIR")
    if cfg.enable_checkpoints:
        ensure_writable_dir(plan.paths.checkpoints, "CHECKPOINT_DIR")
    if cfg.enable_output_to_file:
        ensure_writable_dir(plan.paths.outputs, "OUTPUT_DIR")


def _interrupted(exc: TrainingInterrupted, ctx: RunContext, start: int, end: int,
                 resume_path: str | None) -> TrainingInterrupted:
    """Complete a stop request with the checkpoint to resume from; logged in the run's log."""
    exc.checkpoint, exc.step = None, ctx.step
    on_disk = _checkpoint_on_disk(ctx, start, resume_path)
    # with nothing saved, where this one began only while nothing was trained since
    if on_disk is not None and (ctx.saved_steps or ctx.step == start):
        exc.step, exc.checkpoint = on_disk
    elif ctx.step == start:
        exc.step = None  # nothing trained yet
    if exc.checkpoint is not None:
        exc.resume_steps = _resume_steps(ctx, exc.step, end)
    log.warning("interrupted by %s at step %d; checkpoint: %s", signal_name(exc.signum),
                ctx.step, exc.checkpoint or "none")
    return exc


def _train(plan: RunPlan, placement: tuple[DistInfo, torch.device], log_file: Path,
           stop: StopRequest) -> RunSummary:
    cfg = plan.config
    resumed = plan.resume is not None
    resume_path = str(plan.resume.path) if plan.resume else None
    t_start = time.perf_counter()
    stop.check(resume_path)
    ctx = prepare_run(plan, placement)
    ctx.timings["setup"] = time.perf_counter() - t_start  # data preparation, model, restore
    start = ctx.step
    n_steps = steps_to_run(cfg, start, resumed)
    stop.attach(ctx)
    if ctx.stop_signal is not None:  # a signal while the run was being prepared
        raise _interrupted(TrainingInterrupted(ctx.stop_signal), ctx, start, start + n_steps,
                           resume_path)
    if cfg.max_new_tokens:  # a prompt the tokenizer cannot encode fails now, not after training
        start_context(ctx.tokenizer, default_prompt(cfg.generation, cfg.model_type))
    trainable, total = count_parameters(ctx.raw_model)
    log.info("lmtrain %s run %s", "resuming" if resumed else "starting", ctx.run_name)
    settings = _settings_lines(plan)
    for line in settings:
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
    ctx.metrics = (open_metrics(summary.metrics_file, cfg, ctx.run_name, ctx.tracker_run_ids)
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
        except UserError as exc:  # e.g. a checkpoint that could not be written
            raise _with_resume_command(exc, ctx, start, start + n_steps, resume_path) from None
        fresh_eval = ctx.last_losses.get("step") == ctx.step
        summary.final_losses = dict(ctx.last_losses) if fresh_eval else evaluate(ctx)
        summary.final_losses.pop("step", None)
        _report_perplexity(ctx, summary.final_losses)
        t_sample = time.perf_counter()
        summary.sample = _sample(ctx) if ctx.is_main else ""
        ctx.timings["sample"] = time.perf_counter() - t_sample
        log.info("sample:\n%s", summary.sample)
        if ctx.metrics and summary.sample:
            ctx.metrics.text("sample", summary.sample, ctx.step)
    finally:
        if ctx.metrics:
            ctx.metrics.close()
    if ctx.is_main:
        summary.plot_file = _plot(summary.metrics_file)
    results = {"run": ctx.run_name, "start_step": start, "end_step": ctx.step,
               **summary.start_losses,
               **{f"final_{k}": v for k, v in summary.final_losses.items()}}
    if resumed and summary.start_losses:  # none with EVAL_ITERS=0
        for key in ("train", "val"):
            before, after = summary.start_losses[key], summary.final_losses[key]
            results[f"{key}_change"] = after - before
            log.info("resumed run: %s loss %.4f at step %d -> %.4f at step %d (change %+.4f)",
                     key, before, start, after, ctx.step, after - before)
    if cfg.enable_output_to_file and ctx.is_main:
        try:
            summary.output_file = write_output_file(
                cfg, plan.paths.outputs, ctx.run_name, settings, results,
                summary.sample)
            log.info("wrote %s", summary.output_file)
        except OSError as exc:  # the run is trained and saved: a missing report is a warning
            log.warning("could not write the output file in OUTPUT_DIR=%r (%s); the run and "
                        "its checkpoints are complete", str(plan.paths.outputs),
                        exc.strerror or exc)
    total = time.perf_counter() - t_start
    ctx.timings["other"] = max(total - sum(ctx.timings.values()), 0.0)  # logs, metrics, plot
    ctx.timings["total"] = total
    summary.timings = dict(ctx.timings)
    log.info("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in ctx.timings.items()))
    return summary


def _settings_lines(plan: RunPlan) -> list[str]:
    """``name = value  (source)`` for a fresh run's non-default settings; on resume only those
    that differ from the checkpoint (the rest is the checkpoint's, see ``lmtrain inspect``)."""
    if plan.resume is None:
        return plan.loaded.describe()
    saved, sources = plan.resume.checkpoint["hyperparameters"], plan.loaded.sources
    lines, same = [], 0
    for name, value in sorted(plan.config.model_dump().items()):
        source = sources.get(name, "default")
        if saved.get(name, value) == value and (name in saved or source == "default"):
            same += 1
            continue
        was = f"; checkpoint: {saved[name]!r}" if name in saved else ""
        lines.append(f"{name} = {value!r}  ({source}{was})")
    return [*lines, f"{same} other settings as in the checkpoint"]


def _with_resume_command(exc: UserError, ctx: RunContext, start: int, end: int,
                         resume_path: str | None) -> UserError:
    """A training-time error, completed with the command that resumes from the last
    checkpoint on disk (one line)."""
    on_disk = _checkpoint_on_disk(ctx, start, resume_path)
    if on_disk is None:
        return exc
    step, checkpoint = on_disk
    command = resume_commands(checkpoint, _resume_steps(ctx, step, end))[0]
    return UserError(f"{exc}; resume with: {command}")


def _checkpoint_on_disk(ctx: RunContext, start: int, resume_path: str | None,
                        ) -> tuple[int, object] | None:
    """(step, file) of the newest checkpoint on disk: the last this session saved, else the
    one it resumed from (at ``start``); ``None`` when there is neither."""
    if ctx.saved_steps:
        step = ctx.saved_steps[-1]
        return step, ctx.checkpoint_dir / checkpoint_filename(step)
    if resume_path:
        return start, resume_path
    return None


def _resume_steps(ctx: RunContext, step: int, end: int) -> int | None:
    """The RESUME_STEPS that finishes this session from ``step``; ``None`` when a plain resume
    (up to TRAINING_STEPS) does the same."""
    remaining = max(end - step, 0)
    plain = max(ctx.config.training_steps - step, 0)
    return None if remaining == plain else remaining


def _report_perplexity(ctx: RunContext, losses: dict[str, float]) -> None:
    """Val perplexity beside val loss at the end of the run: logged, recorded, summarized."""
    if "val" not in losses:  # EVAL_ITERS=0: nothing was evaluated
        return
    losses["val_perplexity"] = perplexity(losses["val"])
    if ctx.is_main:
        log.info("final: val loss %.4f, val perplexity %.2f", losses["val"],
                 losses["val_perplexity"])
        if ctx.metrics:
            ctx.metrics.write(step=ctx.step, val_loss=losses["val"],
                              val_perplexity=losses["val_perplexity"], kind="final")


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
    prompt = default_prompt(cfg.generation, cfg.model_type)
    return generate_text(ctx.raw_model, ctx.tokenizer, prompt, cfg.max_new_tokens, cfg.block_size,
                         ctx.device, cfg.temperature, cfg.top_k, seed=cfg.seed, top_p=cfg.top_p,
                         stop_at_eot=cfg.stop_at_eot)
