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

from lmtrain.advice import run_warnings, steps_to_run
from lmtrain.config import FIELDS
from lmtrain.crash_report import LOG_ATTRIBUTE
from lmtrain.distributed import broadcast_object, cleanup
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
from lmtrain.signals import StopNow, StopRequest, stop_on_signals
from lmtrain.train.build import assemble, check_before_start
from lmtrain.train.finish import finish
from lmtrain.train.loop import evaluate, interruptible_alone, run_training, share_stop_signal
from lmtrain.train.plan import RunPlan, resolve_plan
from lmtrain.train.resume import ResumeHints
from lmtrain.train.state import Components, LiveRun, Placement

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
    #: components (read-only), progress (what the loop advances), the settings groups the
    #: loop reads and the session's services (checkpoints, metrics, timings, stop request)
    live: LiveRun
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
        placement = Placement.join(str(self.values.get("device") or FIELDS["device"].default))
        self.resources.callback(cleanup)
        self.plan = plan = resolve_plan(self.values, self.sources, agree=broadcast_object)
        check_before_start(plan, placement)
        is_main = placement.is_main
        self.resources.enter_context(claim_run_folders(
            plan.paths, checkpoints=plan.config.checkpointing.enable_checkpoints,
            outputs=plan.config.run.enable_output_to_file, is_main=is_main,
            agree=broadcast_object))
        self._open_log(is_main)
        self._build(placement)
        self.summary = self._announce()
        self._open_metrics()

    def train(self) -> None:
        """From the start step to the end: the loop, its evaluations and checkpoints."""
        parts, progress, settings, services = self.live
        summary = self.summary
        if self.plan.resume is not None:
            summary.start_losses = evaluate(parts, progress, settings, services)
        with self.hints.completing(progress):
            run_training(parts, progress, settings, services,
                         summary.end_step - summary.start_step)
            share_stop_signal(parts, services)  # a signal in the final save: all ranks stop
            self.stop.check()  # a signal during the last step: the final checkpoint is written

    def save(self) -> RunSummary:
        """The final losses and the sample; once the metrics are complete, the loss plot, the
        output file and the timings."""
        parts, progress, settings, services = self.live
        plan, summary, cfg = self.plan, self.summary, self.plan.config
        try:  # a stop signal cuts the final evaluation and sample short: the run is saved
            with interruptible_alone(parts.placement):
                summary.final_losses, summary.sample = finish(
                    parts, progress, settings, services, cfg.generation, cfg.model.model_type)
        except StopNow as exc:
            raise self.hints.interrupted(TrainingInterrupted(exc.signum), progress) from None
        self._close_metrics()
        is_main = parts.placement.is_main
        if is_main:
            summary.plot_file = plot_run(summary.metrics_file)
        results = run_results(plan.run_name, summary.start_step, progress.step,
                              summary.start_losses, summary.final_losses)
        if cfg.run.enable_output_to_file and is_main:
            summary.output_file = report_output_file(cfg, plan.paths.outputs, plan.run_name,
                                                     self.settings, results, summary.sample)
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
        if is_main:  # the plan is every rank's: its notes are said once
            for note in plan.notes:
                log.warning(note)
            for leftover in remove_stale_temp_files(plan.paths.checkpoints):
                log.warning("removed %s, left by an interrupted checkpoint write", leftover)

    def _build(self, placement: Placement) -> None:
        """The run, fresh or restored (timed as ``setup``), and the steps it will train."""
        plan, cfg = self.plan, self.plan.config
        resumed_from = str(plan.resume.path) if plan.resume else None
        self.t_start = time.perf_counter()
        self.stop.check(resumed_from)
        self.live = assemble(plan, placement, self.stop)
        parts, progress = self.live.parts, self.live.progress
        # data, model, restore
        self.live.services.timings["setup"] = time.perf_counter() - self.t_start
        end = progress.step + steps_to_run(cfg, progress.step, plan.resume is not None)
        self.hints = ResumeHints(progress.step, end, resumed_from, plan.paths.checkpoints,
                                 cfg.optimization.training_steps, cfg.run.parallel == "fsdp")
        if self.stop.signal is not None:  # a signal while the run was being prepared
            raise self.hints.interrupted(TrainingInterrupted(self.stop.signal), progress)
        if cfg.generation.max_new_tokens:  # a prompt the tokenizer cannot encode fails now
            start_context(parts.tokenizer, default_prompt(cfg.generation, cfg.model.model_type))

    def _announce(self) -> RunSummary:
        """Log what this run is (settings, device, data, model size, advice); returns the
        summary the session fills in."""
        plan, hints = self.plan, self.hints
        saved = plan.resume.checkpoint.hyperparameters if plan.resume else None
        self.settings = settings_lines(plan.loaded, saved)
        _log_start(plan, self.live.parts, self.settings, hints.start, hints.end)
        return RunSummary(
            run_name=plan.run_name, start_step=hints.start, end_step=hints.end,
            checkpoint_dir=plan.paths.checkpoints, log_file=self.log_file,
            metrics_file=plan.paths.logs / "metrics.jsonl")

    def _open_metrics(self) -> None:
        """Rank 0's metrics file and trackers, opened with the run's start record."""
        if not self.live.parts.placement.is_main:
            return
        plan, services = self.plan, self.live.services
        services.metrics = open_metrics(self.summary.metrics_file, plan.config, plan.run_name,
                                        self.live.progress.tracker_run_ids)
        self.resources.callback(self._close_metrics)
        services.metrics.write(step=self.hints.start, kind="resume" if plan.resume else "start",
                               log_file=str(self.log_file))

    def _close_metrics(self) -> None:
        """End the metrics file and the trackers' runs (once; as stopped or failed while an
        exception propagates)."""
        services = self.live.services
        if services.metrics:
            services.metrics.close()
            services.metrics = None

    def _timings(self) -> dict[str, float]:
        """Where the session's time went; ``other`` is logs, metrics and the plot."""
        timings = self.live.services.timings
        total = time.perf_counter() - self.t_start
        timings["other"] = max(total - sum(timings.values()), 0.0)
        timings["total"] = total
        return dict(timings)


#: How the processes of a run share its work, as the start of the run says it
_PARALLEL_NAMES = {"ddp": " (DistributedDataParallel)",
                   "fsdp": " (FSDP2: weights, gradients and optimizer state sharded)"}


def _log_start(plan: RunPlan, parts: Components, settings: list[str], start: int,
               end: int) -> None:
    """What this run is: its settings, device, data and model size, and the advice for it."""
    cfg, place, resumed = plan.config, parts.placement, plan.resume is not None
    log.info("lmtrain %s run %s", "resuming" if resumed else "starting", plan.run_name)
    for line in settings:
        log.info("  %s", line)
    log.info("device %s, precision %s, %s tokenizer (%d tokens), %d train / %d val tokens",
             place.device, place.precision or "fp32", parts.tokenizer.kind,
             parts.tokenizer.vocab_size, len(parts.data.train), len(parts.data.val))
    if place.world_size > 1 or cfg.run.compile:
        log.info("%d process(es)%s, torch.compile %s", place.world_size,
                 _PARALLEL_NAMES[cfg.run.parallel] if place.world_size > 1 else "",
                 "on" if cfg.run.compile else "off")
    trainable, total = count_parameters(parts.raw_model)
    log.info("parameters: %s trainable / %s total", f"{trainable:,}", f"{total:,}")
    if resumed:
        log.info("resuming from step %d for %d steps (to step %d)", start, end - start, end)
    for warning in run_warnings(cfg, start, resumed) if place.is_main else ():  # the same
        log.warning(warning)  # on every rank: said once
