"""A training session: one :class:`~lmtrain.train.plan.RunPlan`, run in four phases (in the
spirit of a torchtune recipe), each a short method of :class:`Session`:

- **setup**: join the process group, resolve and check the plan, claim the run's folders
  (:mod:`lmtrain.run_folder`), open the log, build the run (:func:`prepare_run`: restored
  from the checkpoint on resume) and open its metrics;
- **train**: on resume, the losses it starts from; then :func:`~lmtrain.train.loop.run_training`
  to the last step and its checkpoint (a stop or an error says how to resume:
  :mod:`lmtrain.train.resume`);
- **save**: the final evaluation and perplexity, the sample, the loss plot, the output file
  and the timings (report lines: :mod:`lmtrain.reporting`);
- **close**: metrics, log, folder locks and the process group, however the others ended.

Fresh and resumed runs differ only in where config and state come from (the plan, then
:func:`prepare_run`); every line after that is the same code.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lmtrain.advice import run_warnings, steps_to_run
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
from lmtrain.durable import remove_stale_temp_files
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.generate import default_prompt, generate_text, start_context
from lmtrain.models import build_model, count_parameters
from lmtrain.plotting import plot_run
from lmtrain.reporting import (
    close_logging,
    open_metrics,
    report_final,
    report_output_file,
    run_results,
    settings_lines,
    setup_logging,
    timestamp,
    timings_line,
)
from lmtrain.run_folder import claim_run_folders
from lmtrain.signals import StopRequest, stop_on_signals
from lmtrain.trackers import check_installed, tracker_names
from lmtrain.train.answer_eval import report_final_answers
from lmtrain.train.checkpointing import restore
from lmtrain.train.frozen import store_frozen_base_in
from lmtrain.train.loop import evaluate, run_training, share_stop_signal
from lmtrain.train.optim import build_optimizer
from lmtrain.train.perplexity import perplexity
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
        finally:
            self.close()

    def setup(self) -> None:
        """Join the process group once, resolve the plan, check what can be checked before
        anything is created, claim the run's folders, open the log; then build the run."""
        placement = init_distributed(select_device(str(self.values.get("device") or
                                                       FIELDS["device"].default)))
        self.resources.callback(cleanup)
        self.plan = plan = resolve_plan(self.values, self.sources, agree=broadcast_object)
        _check_before_start(plan)
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
        summary.final_losses = _final_evaluation(ctx)
        _report_perplexity(ctx, summary.final_losses)
        report_final_answers(ctx, summary.final_losses)  # question/answer records
        summary.sample = _sample_at_end(ctx)
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


def prepare_run(plan: RunPlan, placement: tuple[DistInfo, torch.device] | None = None,
                ) -> RunContext:
    """Tokenizer, data, model, optimizer and RNG: from scratch, then restored from the plan's
    checkpoint. ``placement`` is the session's (process group, device); joined here if absent."""
    cfg = plan.config
    dist_info, device = placement or init_distributed(select_device(cfg.run.device))
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
    store_frozen_base_in(ctx.model, dtype)  # LoRA: cast the frozen base once, not every step
    ctx.model = wrap_model(ctx.model, dist_info, device)  # checkpoints keep the raw model
    if cfg.run.compile:
        ctx.model = cast(nn.Module, torch.compile(ctx.model))
    return ctx


def _check_before_start(plan: RunPlan) -> None:
    """What can fail without touching the disk fails here, before any folder is created."""
    cfg = plan.config
    check_installed(tracker_names(cfg.run.metrics))  # a missing extra fails before any work
    source = cfg.data.training_data_source
    if not source.startswith(HF_PREFIX) and not glob.has_magic(source) \
            and not Path(source).expanduser().exists():
        from lmtrain.data.sources import resolve_files

        resolve_files(source)  # raises the one-line error for a missing source


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


def _final_evaluation(ctx: RunContext) -> dict[str, float]:
    """The losses at the last step: the loop's own final evaluation, else a new one."""
    fresh = ctx.last_losses.get("step") == ctx.step
    losses = dict(ctx.last_losses) if fresh else evaluate(ctx)
    losses.pop("step", None)
    return losses


def _report_perplexity(ctx: RunContext, losses: dict[str, float]) -> None:
    """Val perplexity beside val loss at the end of the run: logged, recorded, summarized."""
    if "val" not in losses:  # EVAL_ITERS=0: nothing was evaluated
        return
    losses["val_perplexity"] = perplexity(losses["val"])
    if ctx.is_main:
        report_final(losses, ctx.step, ctx.metrics)


def _sample_at_end(ctx: RunContext) -> str:
    """The end-of-run sample (rank 0; timed as ``sample``): logged and recorded."""
    t0 = time.perf_counter()
    sample = _sample(ctx) if ctx.is_main else ""
    ctx.timings["sample"] = time.perf_counter() - t0
    log.info("sample:\n%s", sample)
    if ctx.metrics and sample:
        ctx.metrics.text("sample", sample, ctx.step)
    return sample


def _sample(ctx: RunContext) -> str:
    cfg = ctx.config
    if cfg.generation.max_new_tokens == 0:
        return ""
    prompt = default_prompt(cfg.generation, cfg.model.model_type)
    gen = cfg.generation
    return generate_text(ctx.raw_model, ctx.tokenizer, prompt, gen.max_new_tokens,
                         cfg.model.block_size, ctx.device, gen.temperature, gen.top_k,
                         seed=cfg.optimization.seed, top_p=gen.top_p, stop_at_eot=gen.stop_at_eot)
