"""A training session: one :class:`~lmtrain.train.plan.RunPlan`, run in four phases (in the
spirit of a torchtune recipe), each a short method of :class:`Session`:

- **setup**: join the process group, resolve and check the plan, claim the run's folders
  (:mod:`lmtrain.run_folder`), open the log, build the run (:mod:`lmtrain.train.build`:
  restored from the checkpoint on resume) and open its metrics;
- **train**: on resume, the losses it starts from; then :func:`~lmtrain.train.loop.run_training`
  to the last step and its checkpoint (a stop or an error says how to resume:
  :mod:`lmtrain.train.resume`);
- **save**: the final evaluation, perplexity and sample (:mod:`lmtrain.train.finish`), the
  loss plot, the output file and the timings (report lines: :mod:`lmtrain.reporting`);
- **close**: metrics, log, folder locks and the process group, however the others ended.

Fresh and resumed runs differ only in where config and state come from (the plan, then
:func:`~lmtrain.train.build.prepare_run`); every line after that is the same code.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtrain.advice import run_warnings, steps_to_run
from lmtrain.config import FIELDS
from lmtrain.crash_report import LOG_ATTRIBUTE
from lmtrain.device import select_device
from lmtrain.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from lmtrain.durable import remove_stale_temp_files
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.generate import default_prompt, start_context
from lmtrain.models import count_parameters
from lmtrain.plotting import plot_run
from lmtrain.reporting import (
    close_logging,
    open_metrics,
    report_output_file,
    run_results,
    settings_lines,
    setup_logging,
    timestamp,
    timings_line,
)
from lmtrain.run_folder import claim_run_folders
from lmtrain.signals import StopNow, StopRequest, interruptible, stop_on_signals
from lmtrain.train.build import check_before_start, prepare_run
from lmtrain.train.finish import finish
from lmtrain.train.loop import evaluate, run_training, share_stop_signal
from lmtrain.train.plan import RunPlan, resolve_plan
from lmtrain.train.resume import ResumeHints
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


def train(values: dict[str, Any], sources: dict[str, str]) -> RunSummary:
    """Run one session from explicit settings (flags/env/file) and their sources.

    SIGINT / SIGTERM stop it cleanly: see :mod:`lmtrain.signals` (an entrypoint that already
    handles them shares its stop request).
    """
    with stop_on_signals() as stop:
        return Session(values, sources, stop).run()


class Session:
    """One run of the settings ``values``: :meth:`run` calls :meth:`setup`, :meth:`train` and
    :meth:`save` in turn, then :meth:`close`, however they ended."""

    plan: RunPlan  # set by setup, with the attributes below
    ctx: RunContext
    hints: ResumeHints
    summary: RunSummary
    settings: list[str]

    def __init__(self, values: dict[str, Any], sources: dict[str, str],
                 stop: StopRequest) -> None:
        self.values, self.sources, self.stop = values, sources, stop
        self.resources = contextlib.ExitStack()  # what close() releases, in reverse
        self.logging = False  # whether the run's log is open (it then records errors too)
        self.t_start = 0.0

    def run(self) -> RunSummary:
        """The session's lifecycle: setup, train, save; close however they end."""
        try:
            self.setup()
            self.train()
            return self.save()
        except UserError as exc:
            if self.logging:  # the entrypoint prints it; the log file keeps it too
                log.error("error: %s", exc, extra={"file_only": True})
            raise
        except TrainingInterrupted:
            raise
        except Exception as exc:  # a bug: its traceback in the log, named by the entrypoint
            if self.logging:
                log.exception("internal error", extra={"file_only": True})
                setattr(exc, LOG_ATTRIBUTE, self.log_file)
            raise
        finally:
            self.close()

    def setup(self) -> None:
        """Join the process group once, resolve the plan, check what can be checked before
        anything is created, claim the run's folders, open the log; then build the run."""
        placement = init_distributed(select_device(str(self.values.get("device") or
                                                       FIELDS["device"].default)))
        self.resources.callback(cleanup)
        self.plan = plan = resolve_plan(self.values, self.sources, agree=broadcast_object)
        check_before_start(plan)
        is_main = placement[0].is_main
        self.resources.enter_context(claim_run_folders(
            plan.paths, checkpoints=plan.config.checkpointing.enable_checkpoints,
            outputs=plan.config.run.enable_output_to_file, is_main=is_main,
            agree=broadcast_object))
        self._open_log(is_main)
        self.ctx = self._build(placement)
        self.summary = self._announce()
        self._open_metrics()

    def train(self) -> None:
        """From the start step to the end: the loop, its evaluations and checkpoints."""
        ctx, summary = self.ctx, self.summary
        if self.plan.resume is not None:
            summary.start_losses = evaluate(ctx)
        with self.hints.completing(ctx):
            run_training(ctx, summary.start_step, summary.end_step - summary.start_step)
            share_stop_signal(ctx)  # a signal seen by any rank during the final save stops all
            self.stop.check()  # a signal during the last step: the final checkpoint is written

    def save(self) -> RunSummary:
        """The final losses and the sample; once the metrics are complete, the loss plot, the
        output file and the timings."""
        ctx, summary = self.ctx, self.summary
        try:  # a stop signal cuts the final evaluation and sample short: the run is saved
            with interruptible() if ctx.world_size == 1 else contextlib.nullcontext():
                summary.final_losses, summary.sample = finish(ctx)
        except StopNow as exc:
            raise self.hints.interrupted(TrainingInterrupted(exc.signum), ctx) from None
        self._close_metrics()
        if ctx.is_main:
            summary.plot_file = plot_run(summary.metrics_file)
        results = run_results(ctx.run_name, summary.start_step, ctx.step, summary.start_losses,
                              summary.final_losses)
        if ctx.config.run.enable_output_to_file and ctx.is_main:
            summary.output_file = report_output_file(ctx.config, self.plan.paths.outputs,
                                                     ctx.run_name, self.settings, results,
                                                     summary.sample)
        summary.timings = self._timings()
        log.info(timings_line(summary.timings))
        return summary

    def close(self) -> None:
        """Release what setup took (metrics, log, folders, process group), in reverse."""
        self.resources.close()

    def _open_log(self, is_main: bool) -> None:
        """The run's log (only rank 0 writes one; the other ranks stay quiet, errors still
        reach stderr), then the plan's notes and the leftovers of an interrupted write."""
        plan = self.plan
        kind = f"resume-{plan.resume.step:07d}" if plan.resume else "train"
        self.log_file = plan.paths.logs / f"{kind}-{timestamp()}.log"
        setup_logging(self.log_file if is_main else None, quiet=not is_main)
        self.resources.callback(close_logging)
        self.logging = True
        for note in plan.notes:
            log.warning(note)
        if is_main:
            for leftover in remove_stale_temp_files(plan.paths.checkpoints):
                log.warning("removed %s, left by an interrupted checkpoint write", leftover)

    def _build(self, placement: tuple[DistInfo, torch.device]) -> RunContext:
        """The run, fresh or restored (timed as ``setup``), and the steps it will train."""
        plan, cfg = self.plan, self.plan.config
        resumed_from = str(plan.resume.path) if plan.resume else None
        self.t_start = time.perf_counter()
        self.stop.check(resumed_from)
        ctx = prepare_run(plan, placement)
        ctx.timings["setup"] = time.perf_counter() - self.t_start  # data, model, restore
        end = ctx.step + steps_to_run(cfg, ctx.step, plan.resume is not None)
        self.hints = ResumeHints(ctx.step, end, resumed_from)
        self.stop.attach(ctx)
        if ctx.stop_signal is not None:  # a signal while the run was being prepared
            raise self.hints.interrupted(TrainingInterrupted(ctx.stop_signal), ctx)
        if cfg.generation.max_new_tokens:  # a prompt the tokenizer cannot encode fails now
            start_context(ctx.tokenizer, default_prompt(cfg.generation, cfg.model.model_type))
        return ctx

    def _announce(self) -> RunSummary:
        """Log what this run is (settings, device, data, model size, advice); returns the
        summary the session fills in."""
        plan, ctx, hints = self.plan, self.ctx, self.hints
        saved = plan.resume.checkpoint.hyperparameters if plan.resume else None
        self.settings = settings_lines(plan.loaded, saved)
        _log_start(ctx, self.settings, hints.start, hints.end, resumed=plan.resume is not None)
        return RunSummary(
            run_name=ctx.run_name, start_step=hints.start, end_step=hints.end,
            checkpoint_dir=ctx.checkpoint_dir, log_file=self.log_file,
            metrics_file=ctx.log_dir / "metrics.jsonl")

    def _open_metrics(self) -> None:
        """Rank 0's metrics file and trackers, opened with the run's start record."""
        ctx = self.ctx
        if not ctx.is_main:
            return
        ctx.metrics = open_metrics(self.summary.metrics_file, ctx.config, ctx.run_name,
                                   ctx.tracker_run_ids)
        self.resources.callback(self._close_metrics)
        ctx.metrics.write(step=self.hints.start, kind="resume" if self.plan.resume else "start",
                          log_file=str(self.log_file))

    def _close_metrics(self) -> None:
        """End the metrics file and the trackers' runs (once; as stopped or failed while an
        exception propagates)."""
        if self.ctx.metrics:
            self.ctx.metrics.close()
            self.ctx.metrics = None

    def _timings(self) -> dict[str, float]:
        """Where the session's time went; ``other`` is logs, metrics and the plot."""
        timings = self.ctx.timings
        total = time.perf_counter() - self.t_start
        timings["other"] = max(total - sum(timings.values()), 0.0)
        timings["total"] = total
        return dict(timings)


def _log_start(ctx: RunContext, settings: list[str], start: int, end: int,
               resumed: bool) -> None:
    """What this run is: its settings, device, data and model size, and the advice for it."""
    cfg = ctx.config
    log.info("lmtrain %s run %s", "resuming" if resumed else "starting", ctx.run_name)
    for line in settings:
        log.info("  %s", line)
    log.info("device %s, precision %s, %s tokenizer (%d tokens), %d train / %d val tokens",
             ctx.device, ctx.autocast_dtype or "fp32", ctx.tokenizer.kind,
             ctx.tokenizer.vocab_size, len(ctx.data.train), len(ctx.data.val))
    if ctx.world_size > 1 or cfg.run.compile:
        log.info("%d process(es) (DistributedDataParallel when > 1), torch.compile %s",
                 ctx.world_size, "on" if cfg.run.compile else "off")
    trainable, total = count_parameters(ctx.raw_model)
    log.info("parameters: %s trainable / %s total", f"{trainable:,}", f"{total:,}")
    if resumed:
        log.info("resuming from step %d for %d steps (to step %d)", start, end - start, end)
    for warning in run_warnings(cfg, start, resumed):
        log.warning(warning)
