"""The one training loop, shared by fresh and resumed runs.

:func:`train_step` is the arithmetic of one optimizer step; :func:`run_training` repeats it
and does the cadence around it (progress lines, evaluation, checkpoints, stop requests). The
loss stays on the device until a progress line or a checkpoint needs it (one transfer per
line, not one per step); only ``ON_NAN=skip`` looks at it every step, because it must decide
before the update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmtrain.checkpoint import checkpoint_filename, rotate_checkpoints, save_checkpoint
from lmtrain.distributed import all_reduce_mean, max_across_ranks
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.sharding import is_sharded, local, replicated_value
from lmtrain.train.answer_eval import measure_answers
from lmtrain.train.checkpointing import build as build_checkpoint
from lmtrain.train.checkpointing import gather_rank_states, write_sharded
from lmtrain.train.evaluate import compute_loss, estimate_loss
from lmtrain.train.optim import set_learning_rate
from lmtrain.train.state import RunContext

log = logging.getLogger("lmtrain")


def share_stop_signal(ctx: RunContext) -> None:
    """In a distributed run, a stop signal any rank received becomes every rank's (collective)."""
    if ctx.world_size > 1:
        ctx.stop_signal = max_across_ranks(ctx.stop_signal or 0, ctx.device) or None


def evaluate(ctx: RunContext) -> dict[str, float]:
    """Train/val loss now; logs it, records it and tracks the best validation loss. Nothing
    (``{}``) with ``EVAL_ITERS=0``: evaluation is off."""
    cfg = ctx.config
    if not cfg.evaluation.eval_iters:
        return {}
    t0 = time.perf_counter()
    losses = estimate_loss(ctx.model, ctx.data, cfg.optimization.batch_size, cfg.model.block_size,
                           cfg.evaluation.eval_iters,
                           ctx.device, cfg.optimization.seed + ctx.rank, ctx.autocast())
    if ctx.world_size > 1:  # each rank drew its own batches: report the mean over all of them
        keys = sorted(losses)
        mean = all_reduce_mean(torch.tensor([losses[k] for k in keys], device=ctx.device))
        losses = dict(zip(keys, mean.tolist(), strict=True))
    ctx.timings["eval"] += time.perf_counter() - t0
    ctx.last_losses = {"train": losses["train"], "val": losses["val"], "step": ctx.step}
    if ctx.is_main:
        log.info("step %d: train loss %.4f, val loss %.4f", ctx.step, losses["train"],
                 losses["val"])
        if ctx.metrics:
            ctx.metrics.write(step=ctx.step, train_loss=losses["train"], val_loss=losses["val"],
                              kind="eval")
    measure_answers(ctx)  # question/answer records: answer accuracy beside the loss
    return losses


def _previous_checkpoint(ctx: RunContext) -> str:
    return (f"the step {ctx.saved_steps[-1]} checkpoint is intact" if ctx.saved_steps
            else "earlier checkpoints are untouched")


def _weights_finite(ctx: RunContext) -> bool:
    """Whether every trainable weight is finite (one transfer to the host; FSDP: every
    rank's shard)."""
    params = [local(p) for p in ctx.raw_model.parameters() if p.requires_grad]
    finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    return finite if not is_sharded(ctx.raw_model) else not max_across_ranks(
        int(not finite), ctx.device)


def save(ctx: RunContext) -> Path | None:
    """Write the checkpoint for the current step (main process only) and rotate old ones.

    The best-validation checkpoint (the lowest val loss measured at a checkpointed step) is
    spared by rotation; older files go only once the new one is on disk. A model whose weights
    are no longer finite is never saved.
    """
    if not ctx.config.checkpointing.enable_checkpoints:
        return None
    sharded = ctx.config.run.parallel == "fsdp"  # every rank writes its shards
    path = ctx.checkpoint_dir / checkpoint_filename(ctx.step, sharded)
    if (ctx.saved_steps and ctx.saved_steps[-1] == ctx.step
            and (ctx.world_size > 1 or path.exists())):
        return path  # already written at this step
    if not _weights_finite(ctx):  # every rank holds the same weights: all refuse together
        raise UserError(
            f"the model's weights are no longer finite at step {ctx.step} "
            f"(ON_NAN={ctx.config.optimization.on_nan}); the step is not saved and "
            f"{_previous_checkpoint(ctx)} — lower LEARNING_RATE or set GRAD_CLIP, then resume")
    t0 = time.perf_counter()
    rank_states = gather_rank_states(ctx)  # every rank takes part; rank 0 writes
    if not ctx.is_main and not sharded:
        ctx.saved_steps.append(ctx.step)
        ctx.timings["checkpoint"] += time.perf_counter() - t0
        return path
    best = ctx.best_val_loss, ctx.best_step
    evaluated = ctx.last_losses.get("step") == ctx.step
    if evaluated and ctx.last_losses["val"] < ctx.best_val_loss:
        ctx.best_val_loss, ctx.best_step = ctx.last_losses["val"], ctx.step
    try:
        if sharded:
            write_sharded(ctx, path, rank_states)
        else:
            save_checkpoint(path, build_checkpoint(ctx, rank_states))
    except OSError as exc:
        ctx.best_val_loss, ctx.best_step = best
        raise UserError(
            f"CHECKPOINT_DIR={str(ctx.checkpoint_dir)!r}: writing the step {ctx.step} checkpoint "
            f"failed ({exc.strerror or exc}); the run stops here and {_previous_checkpoint(ctx)}"
            f" — free space or pick another CHECKPOINT_DIR, then resume") from None
    ctx.saved_steps.append(ctx.step)
    if not ctx.is_main:
        return path
    protect = {ctx.best_step} if ctx.best_step is not None else set()
    rotate_checkpoints(ctx.checkpoint_dir, ctx.config.checkpointing.keep_last_checkpoints, protect,
                       upto=ctx.step)
    ctx.timings["checkpoint"] += time.perf_counter() - t0
    log.info("step %d: saved checkpoint %s", ctx.step, path)
    return path


def train_step(ctx: RunContext, step: int, params: list[torch.nn.Parameter],
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step ``step`` (0-based): forward and backward over ``GRAD_ACCUM_STEPS``
    micro-batches, clip, then update, or skip the update on a non-finite loss under
    ``ON_NAN=skip``. Returns the step's mean loss (over micro-batches and ranks; NaN for a
    skipped step) and the gradient norm before clipping, both on the device.
    """
    settings, scaler = ctx.config.optimization, ctx.grad_scaler
    loss_sum = torch.zeros((), device=ctx.device)
    for micro in range(settings.grad_accum_steps):
        loss_sum += _forward_backward(ctx, last=micro == settings.grad_accum_steps - 1)
    t0 = time.perf_counter()
    loss = all_reduce_mean(loss_sum)  # the same value on every rank
    if scaler:
        scaler.unscale_(ctx.optimizer)
    grad_norm = (replicated_value(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
                 if settings.grad_clip > 0 else None)
    # the grad scaler skips non-finite gradients itself; without it they would poison the weights
    if settings.on_nan == "skip" and not _finite(loss, None if scaler else grad_norm):
        _warn_skipped(step, loss, grad_norm)
        loss = torch.full_like(loss, math.nan)  # marks the step as skipped
    elif scaler:
        scaler.step(ctx.optimizer)
    else:
        ctx.optimizer.step()
    if scaler:
        scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.timings["train"] += time.perf_counter() - t0
    return loss, grad_norm


def _forward_backward(ctx: RunContext, last: bool) -> torch.Tensor:
    """One micro-batch: draw it (timed as ``data``), forward under autocast, backward; returns
    its loss over ``GRAD_ACCUM_STEPS``, detached. DDP all-reduces on the ``last`` one only."""
    settings, model = ctx.config.optimization, ctx.model
    t0 = time.perf_counter()
    x, y = ctx.data.get_batch("train", settings.batch_size, ctx.config.model.block_size,
                              ctx.sampler, ctx.device)
    t1 = time.perf_counter()
    ctx.timings["data"] += t1 - t0
    no_sync = getattr(model, "no_sync", None)
    with ctx.autocast(), (contextlib.nullcontext() if last or no_sync is None else no_sync()):
        loss = compute_loss(model, x, y) / settings.grad_accum_steps
    (ctx.grad_scaler.scale(loss) if ctx.grad_scaler else loss).backward()
    ctx.timings["train"] += time.perf_counter() - t1
    return loss.detach()


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

    def __init__(self, ctx: RunContext, bar: Any = None) -> None:
        self.ctx = ctx
        self.bar = bar
        self.reset()

    def reset(self) -> None:
        self.first_step = self.ctx.step + 1
        self.pending: list[torch.Tensor] = []
        self.values: list[float] = []
        self.grad_norm: torch.Tensor | None = None
        self.t0 = time.perf_counter()
        self.excluded0 = self._excluded()

    def _excluded(self) -> float:
        return self.ctx.timings["eval"] + self.ctx.timings["checkpoint"]

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """One more step's loss and gradient norm (on the device)."""
        self.pending.append(loss)
        self.grad_norm = grad_norm
        if self.bar is not None:
            self.bar.update(1)

    def check(self, extra: torch.Tensor | None = None) -> float | None:
        """Bring the pending losses (and ``extra``) to the host in one transfer; a non-finite
        loss stops the run under ``ON_NAN=stop`` before its weights are evaluated or saved.
        Returns ``extra`` as a float."""
        tensors = [*self.pending, *([] if extra is None else [extra])]
        values = torch.stack([t.float() for t in tensors]).tolist() if tensors else []
        extra_value = values.pop() if extra is not None else None
        self.values += values
        self.pending.clear()
        if self.ctx.config.optimization.on_nan == "stop":
            for i, value in enumerate(self.values):
                if not math.isfinite(value):
                    raise UserError(
                        f"the loss became {value} at step {self.first_step + i}; the last good "
                        f"checkpoint is kept — lower LEARNING_RATE or set ON_NAN=skip")
        return extra_value

    def report(self, lr: float, end: int) -> None:
        """One progress line: mean loss and tokens/s (evaluation and saving time excluded)."""
        ctx, cfg = self.ctx, self.ctx.config
        grad_norm = self.check(self.grad_norm)
        kept = [v for v in self.values if math.isfinite(v)]  # skipped steps are left out
        seconds = time.perf_counter() - self.t0 - (self._excluded() - self.excluded0)
        opt = cfg.optimization
        tokens = (opt.batch_size * cfg.model.block_size * opt.grad_accum_steps * ctx.world_size
                  * len(self.values))
        tps = tokens / max(seconds, 1e-9)
        mean_loss = sum(kept) / len(kept) if kept else math.nan
        if ctx.is_main:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}")
            log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", ctx.step, end, mean_loss, lr,
                     tps)
            if ctx.metrics:
                ctx.metrics.write(step=ctx.step, train_loss=mean_loss, lr=lr,
                                  tokens_per_s=round(tps, 1), grad_norm=grad_norm, kind="train")
        self.reset()


def _progress(ctx: RunContext, stack: contextlib.ExitStack, start: int, end: int) -> Any:
    """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; ``None`` when output is not a TTY.

    While the bar is up, log lines are routed through ``tqdm.write`` so they never tear it;
    log files only ever receive whole lines.
    """
    if not (ctx.is_main and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    stack.enter_context(logging_redirect_tqdm(loggers=[log]))
    return stack.enter_context(tqdm(total=end, initial=start, desc="train", unit="step",
                                    dynamic_ncols=True, file=sys.stderr, leave=False))


def run_training(ctx: RunContext, start_step: int, n_steps: int) -> None:
    """Advance ``ctx`` from ``start_step`` by ``n_steps`` optimizer steps.

    Logs every ``LOG_INTERVAL`` steps, evaluates every ``EVAL_INTERVAL`` steps and at the end
    (before the final checkpoint, which then holds its own losses; never with
    ``EVAL_ITERS=0``), checkpoints every ``CHECKPOINT_INTERVAL`` steps and at the end; all step
    numbers are absolute.
    """
    cfg = ctx.config
    evaluating = cfg.evaluation.eval_iters > 0  # EVAL_ITERS=0: evaluation is off
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    end = start_step + n_steps
    ctx.model.train()
    ctx.step = start_step
    with contextlib.ExitStack() as stack:
        window = LossWindow(ctx, _progress(ctx, stack, start_step, end))
        for step in range(start_step, end):
            lr = set_learning_rate(ctx.optimizer, step, cfg.optimization)
            window.add(*train_step(ctx, step, params))
            ctx.step = step + 1
            if ctx.step % cfg.evaluation.log_interval == 0 or ctx.step == end:
                window.report(lr, end)
            # window.check(): under ON_NAN=stop a NaN loss is never evaluated or saved
            if evaluating and ctx.step % cfg.evaluation.eval_interval == 0:
                window.check()
                evaluate(ctx)
            if ctx.step % cfg.checkpointing.checkpoint_interval == 0 and ctx.step != end:
                window.check()
                save(ctx)
            share_stop_signal(ctx)  # a signal seen by any rank stops all at the same step
            if ctx.stop_signal is not None and ctx.step != end:
                window.check()
                raise TrainingInterrupted(ctx.stop_signal, save(ctx))
    if n_steps > 0:
        if evaluating and ctx.last_losses.get("step") != ctx.step:
            evaluate(ctx)  # the final checkpoint holds its own losses
        save(ctx)
