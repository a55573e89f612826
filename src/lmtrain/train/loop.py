"""The one training loop, shared by fresh and resumed runs.

:func:`run_training` receives the run's read-only components, the settings groups it reads,
the progress it advances and the session's services (checkpoints, metrics, timings, stop
request), in the manner of litgpt's ``fit``. :func:`train_step` is one optimizer step, top to
bottom: per micro-batch the batch (``data/dataset.py``), the forward pass and loss
(``train/lm_loss.py``) and the backward pass; then the mean over ranks, clipping, the NaN
policy and the update. The loss stays on the device until a progress line or a checkpoint
needs it (one transfer per line, not one per step); only ``ON_NAN=skip`` looks at it every
step, because it must decide before the update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any

import torch

from lmtrain.distributed import all_reduce_mean, max_across_ranks
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.progress import TrainProgress
from lmtrain.sharding import replicated_value
from lmtrain.signals import StopNow, interruptible
from lmtrain.train.answer_eval import measure_answers
from lmtrain.train.evaluate import estimate_loss
from lmtrain.train.lm_loss import compute_loss
from lmtrain.train.optim import set_learning_rate
from lmtrain.train.state import Components, LoopSettings, Placement, RunServices

log = logging.getLogger("lmtrain")


def share_stop_signal(parts: Components, services: RunServices) -> None:
    """In a distributed run, a stop signal any rank received becomes every rank's (collective)."""
    if parts.placement.world_size > 1:
        stop = services.stop
        stop.share(max_across_ranks(stop.signal or 0, parts.placement.device) or None)


def evaluate(parts: Components, progress: TrainProgress, settings: LoopSettings,
             services: RunServices) -> dict[str, float]:
    """Train/val loss now; logs it, records it and keeps it as the last losses. Nothing
    (``{}``) with ``EVAL_ITERS=0``: evaluation is off."""
    opt, place = settings.optimization, parts.placement
    if not settings.evaluation.eval_iters:
        return {}
    t0 = time.perf_counter()
    losses = estimate_loss(parts.model, parts.data, opt.batch_size, settings.block_size,
                           settings.evaluation.eval_iters, place.device, opt.seed + place.rank,
                           place.autocast())
    if place.world_size > 1:  # each rank drew its own batches: report the mean over all of them
        keys = sorted(losses)
        mean = all_reduce_mean(torch.tensor([losses[k] for k in keys], device=place.device))
        losses = dict(zip(keys, mean.tolist(), strict=True))
    services.timings["eval"] += time.perf_counter() - t0
    progress.last_losses = {"train": losses["train"], "val": losses["val"], "step": progress.step}
    if place.is_main:
        log.info("step %d: train loss %.4f, val loss %.4f", progress.step, losses["train"],
                 losses["val"])
        if services.metrics:
            services.metrics.write(step=progress.step, train_loss=losses["train"],
                                   val_loss=losses["val"], kind="eval")
    measure_answers(parts, progress, settings, services)  # question/answer records
    return losses


def interruptible_alone(place: Placement) -> contextlib.AbstractContextManager[Any]:
    """:func:`~lmtrain.signals.interruptible` in a one-process run: a stop signal raises
    ``StopNow`` inside. Not with many processes, whose others would wait for the stopped one
    in a collective."""
    return interruptible() if place.world_size == 1 else contextlib.nullcontext()


def evaluate_unless_stopped(parts: Components, progress: TrainProgress,
                            settings: LoopSettings, services: RunServices) -> None:
    """:func:`evaluate`, cut short by a stop signal (one process only,
    :func:`interruptible_alone`); the stop request holds the signal, and the step's checkpoint
    and the stop then follow as usual."""
    with contextlib.suppress(StopNow), interruptible_alone(parts.placement):
        evaluate(parts, progress, settings, services)


def save(parts: Components, progress: TrainProgress, services: RunServices) -> Any:
    """The checkpoint of the current step (timed as ``checkpoint``); see
    :meth:`~lmtrain.train.checkpointing.Checkpointer.save`."""
    t0 = time.perf_counter()
    path = services.checkpointer.save(parts, progress)
    services.timings["checkpoint"] += time.perf_counter() - t0
    return path


def train_step(parts: Components, progress: TrainProgress, settings: LoopSettings,
               services: RunServices, params: list[torch.nn.Parameter],
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The optimizer step after ``progress.step`` (which the caller advances): per micro-batch
    of ``GRAD_ACCUM_STEPS``, draw the batch (timed as ``data``), forward under autocast and
    backward (DDP all-reduces the gradients on the last one only); then clip and update, or
    skip the update on a non-finite loss under ``ON_NAN=skip``. Returns the step's mean loss
    (over micro-batches and ranks; NaN for a skipped step) and the gradient norm before
    clipping, both on the device.
    """
    opt, place, model = settings.optimization, parts.placement, parts.model
    scaler, timings, accum = parts.grad_scaler, services.timings, opt.grad_accum_steps
    no_sync = getattr(model, "no_sync", None)
    loss_sum = torch.zeros((), device=place.device)
    for micro in range(accum):
        t0 = time.perf_counter()
        x, y = parts.data.get_batch("train", opt.batch_size, settings.block_size,
                                    progress.sampler, place.device)
        t1 = time.perf_counter()
        timings["data"] += t1 - t0
        last = micro == accum - 1
        with place.autocast(), (contextlib.nullcontext() if last or no_sync is None
                                else no_sync()):
            loss = compute_loss(model, x, y) / accum
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
        timings["train"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    loss = all_reduce_mean(loss_sum)  # the same value on every rank
    if scaler:
        scaler.unscale_(parts.optimizer)
    grad_norm = (replicated_value(torch.nn.utils.clip_grad_norm_(params, opt.grad_clip))
                 if opt.grad_clip > 0 else None)  # FSDP: the norm over all shards
    # the grad scaler skips non-finite gradients itself; without it they would poison the weights
    if opt.on_nan == "skip" and not _finite(loss, None if scaler else grad_norm):
        _warn_skipped(progress.step, loss, grad_norm)
        loss = torch.full_like(loss, math.nan)  # marks the step as skipped
    elif scaler:
        scaler.step(parts.optimizer)
    else:
        parts.optimizer.step()
    if scaler:
        scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    timings["train"] += time.perf_counter() - t0
    return loss, grad_norm


def _finite(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    checked = loss if grad_norm is None else torch.stack([loss, grad_norm.to(loss.dtype)])
    return bool(torch.isfinite(checked).all())


def _warn_skipped(step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """The ``ON_NAN=skip`` warning for step ``step`` (0-based): what was not finite."""
    if grad_norm is None or not torch.isfinite(loss):
        what, value = "loss", loss.item()
    else:
        what, value = "gradient norm", grad_norm.item()
    log.warning("step %d: %s is %s, step skipped (ON_NAN=skip)", step + 1, what, value)


class LossWindow:
    """The steps since the last progress line; their losses stay on the device until read.
    ``bar``: the progress bar it advances and annotates (``None``: no bar)."""

    def __init__(self, progress: TrainProgress, services: RunServices, bar: Any = None) -> None:
        self.progress, self.services = progress, services
        self.bar = bar
        self.reset()

    def reset(self) -> None:
        self.first_step = self.progress.step + 1
        self.pending: list[torch.Tensor] = []
        self.values: list[float] = []
        self.grad_norm: torch.Tensor | None = None
        self.t0 = time.perf_counter()
        self.excluded0 = self._excluded()

    def _excluded(self) -> float:
        return self.services.timings["eval"] + self.services.timings["checkpoint"]

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """One more step's loss and gradient norm (on the device)."""
        self.pending.append(loss)
        self.grad_norm = grad_norm
        if self.bar is not None:
            self.bar.update(1)

    def check(self, on_nan: str, extra: torch.Tensor | None = None) -> float | None:
        """Bring the pending losses (and ``extra``) to the host in one transfer; a non-finite
        loss stops the run under ``ON_NAN=stop`` before its weights are evaluated or saved.
        Returns ``extra`` as a float."""
        tensors = [*self.pending, *([] if extra is None else [extra])]
        values = torch.stack([t.float() for t in tensors]).tolist() if tensors else []
        extra_value = values.pop() if extra is not None else None
        self.values += values
        self.progress.loss_window += values  # since the last LOG_INTERVAL step, saved
        self.pending.clear()
        if on_nan == "stop":
            for i, value in enumerate(self.values):
                if not math.isfinite(value):
                    raise UserError(
                        f"the loss became {value} at step {self.first_step + i}; the last good "
                        f"checkpoint is kept — lower LEARNING_RATE or set ON_NAN=skip")
        return extra_value

    def report(self, settings: LoopSettings, place: Placement, lr: float, end: int) -> None:
        """One progress line: mean loss and tokens/s (evaluation and saving time excluded)."""
        opt, step = settings.optimization, self.progress.step
        grad_norm = self.check(opt.on_nan, self.grad_norm)
        on_grid = step % settings.evaluation.log_interval == 0  # else the run's last step
        # on the grid: the mean since the last grid step, also across a resume in between
        window = self.progress.loss_window if on_grid else self.values
        kept = [v for v in window if math.isfinite(v)]  # skipped steps are left out
        seconds = time.perf_counter() - self.t0 - (self._excluded() - self.excluded0)
        tokens = (opt.batch_size * settings.block_size * opt.grad_accum_steps * place.world_size
                  * len(self.values))
        tps = tokens / max(seconds, 1e-9)
        mean_loss = sum(kept) / len(kept) if kept else math.nan
        if place.is_main:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}")
            log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", step, end, mean_loss, lr, tps)
            if self.services.metrics:
                self.services.metrics.write(step=step, train_loss=mean_loss, lr=lr,
                                            tokens_per_s=round(tps, 1), grad_norm=grad_norm,
                                            kind="train")
        if on_grid:
            self.progress.loss_window.clear()
        self.reset()


def _progress_bar(is_main: bool, stack: contextlib.ExitStack, start: int, end: int) -> Any:
    """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; ``None`` when output is not a TTY.

    While the bar is up, log lines are routed through ``tqdm.write`` so they never tear it;
    log files only ever receive whole lines.
    """
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    stack.enter_context(logging_redirect_tqdm(loggers=[log]))
    return stack.enter_context(tqdm(total=end, initial=start, desc="train", unit="step",
                                    dynamic_ncols=True, file=sys.stderr, leave=False))


def run_training(parts: Components, progress: TrainProgress, settings: LoopSettings,
                 services: RunServices, n_steps: int) -> None:
    """Advance ``progress`` by ``n_steps`` optimizer steps from where it stands.

    Logs every ``LOG_INTERVAL`` steps, evaluates every ``EVAL_INTERVAL`` steps and at the end
    (before the final checkpoint, which then holds its own losses; never with
    ``EVAL_ITERS=0``), checkpoints every ``CHECKPOINT_INTERVAL`` steps and at the end; all step
    numbers are absolute.
    """
    opt, cadence = settings.optimization, settings.evaluation
    every = settings.checkpointing.checkpoint_interval
    evaluating = cadence.eval_iters > 0  # EVAL_ITERS=0: evaluation is off
    params = [p for p in parts.model.parameters() if p.requires_grad]
    start, end = progress.step, progress.step + n_steps
    parts.model.train()
    if len(progress.loss_window) != start % cadence.log_interval:
        progress.loss_window = []  # saved under another LOG_INTERVAL (or none): a new window
    with contextlib.ExitStack() as stack:
        window = LossWindow(progress, services,
                            _progress_bar(parts.placement.is_main, stack, start, end))
        for step in range(start, end):
            lr = set_learning_rate(parts.optimizer, step, opt)
            window.add(*train_step(parts, progress, settings, services, params))
            progress.step = step + 1
            if progress.step % cadence.log_interval == 0 or progress.step == end:
                window.report(settings, parts.placement, lr, end)
            # window.check(): under ON_NAN=stop a NaN loss is never evaluated or saved
            if evaluating and progress.step % cadence.eval_interval == 0:
                window.check(opt.on_nan)
                evaluate_unless_stopped(parts, progress, settings, services)
            if progress.step % every == 0 and progress.step != end:
                window.check(opt.on_nan)
                save(parts, progress, services)
            share_stop_signal(parts, services)  # a signal seen by any rank stops all at once
            if services.stop.signal is not None and progress.step != end:
                window.check(opt.on_nan)
                raise TrainingInterrupted(services.stop.signal, save(parts, progress, services))
    if n_steps > 0:
        if evaluating and not progress.evaluated and services.stop.signal is None:
            evaluate_unless_stopped(parts, progress, settings, services)  # the final checkpoint
        save(parts, progress, services)                                   # holds its losses
