"""The one training loop, shared by fresh and resumed runs."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import torch

from lmtrain.checkpoint import checkpoint_filename, rotate_checkpoints, save_checkpoint
from lmtrain.distributed import all_reduce_mean, max_across_ranks
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.train.evaluate import compute_loss, estimate_loss
from lmtrain.train.optim import set_learning_rate
from lmtrain.train.state import RunContext, checkpoint_payload, gather_rank_states

log = logging.getLogger("lmtrain")


def share_stop_signal(ctx: RunContext) -> None:
    """In a distributed run, a stop signal any rank received becomes every rank's (collective)."""
    if ctx.world_size > 1:
        ctx.stop_signal = max_across_ranks(ctx.stop_signal or 0, ctx.device) or None


def evaluate(ctx: RunContext) -> dict[str, float]:
    """Train/val loss now; logs it, records it and tracks the best validation loss."""
    t0 = time.perf_counter()
    cfg = ctx.config
    losses = estimate_loss(ctx.model, ctx.data, cfg.batch_size, cfg.block_size, cfg.eval_iters,
                           ctx.device, cfg.seed + ctx.rank, ctx.autocast())
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
    return losses


def save(ctx: RunContext) -> Path | None:
    """Write the checkpoint for the current step (main process only) and rotate old ones.

    The best-validation checkpoint (the lowest val loss measured at a checkpointed step) is
    spared by rotation; older files go only once the new one is on disk.
    """
    if not ctx.config.enable_checkpoints:
        return None
    path = ctx.checkpoint_dir / checkpoint_filename(ctx.step)
    if (ctx.saved_steps and ctx.saved_steps[-1] == ctx.step
            and (ctx.world_size > 1 or path.is_file())):
        return path  # already written at this step
    t0 = time.perf_counter()
    rank_states = gather_rank_states(ctx)  # every rank takes part; rank 0 writes
    if not ctx.is_main:
        ctx.saved_steps.append(ctx.step)
        ctx.timings["checkpoint"] += time.perf_counter() - t0
        return path
    best = ctx.best_val_loss, ctx.best_step
    evaluated = ctx.last_losses.get("step") == ctx.step
    if evaluated and ctx.last_losses["val"] < ctx.best_val_loss:
        ctx.best_val_loss, ctx.best_step = ctx.last_losses["val"], ctx.step
    try:
        save_checkpoint(path, checkpoint_payload(ctx, rank_states))
    except OSError as exc:
        ctx.best_val_loss, ctx.best_step = best
        previous = (f"the step {ctx.saved_steps[-1]} checkpoint is intact" if ctx.saved_steps
                    else "earlier checkpoints are untouched")
        raise UserError(
            f"CHECKPOINT_DIR={str(ctx.checkpoint_dir)!r}: writing the step {ctx.step} checkpoint "
            f"failed ({exc.strerror or exc}); the run stops here and {previous} — free space "
            f"or pick another CHECKPOINT_DIR, then resume") from None
    ctx.saved_steps.append(ctx.step)
    protect = {ctx.best_step} if ctx.best_step is not None else set()
    rotate_checkpoints(ctx.checkpoint_dir, ctx.config.keep_last_checkpoints, protect,
                       upto=ctx.step)
    ctx.timings["checkpoint"] += time.perf_counter() - t0
    log.info("step %d: saved checkpoint %s", ctx.step, path)
    return path


def _progress(ctx: RunContext, stack: contextlib.ExitStack, start: int, end: int):
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

    Evaluates every ``EVAL_INTERVAL`` steps, checkpoints every ``CHECKPOINT_INTERVAL`` steps
    and at the end, logs every ``LOG_INTERVAL`` steps; all step numbers are absolute.
    """
    cfg = ctx.config
    model, opt, data = ctx.model, ctx.optimizer, ctx.data
    params = [p for p in model.parameters() if p.requires_grad]
    end = start_step + n_steps
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * ctx.world_size
    stack = contextlib.ExitStack()
    bar = _progress(ctx, stack, start_step, end)
    window_seconds, window_steps, window_loss = 0.0, 0, 0.0  # since the last progress line
    model.train()
    ctx.step = start_step
    try:
        for step in range(start_step, end):
            step_t0 = time.perf_counter()
            lr = set_learning_rate(opt, step, cfg)
            loss_sum = torch.zeros((), device=ctx.device)
            for micro in range(cfg.grad_accum_steps):
                t0 = time.perf_counter()
                x, y = data.get_batch("train", cfg.batch_size, cfg.block_size, ctx.sampler,
                                      ctx.device)
                t1 = time.perf_counter()
                ctx.timings["data"] += t1 - t0
                with contextlib.ExitStack() as micro_ctx:
                    micro_ctx.enter_context(ctx.autocast())
                    if micro < cfg.grad_accum_steps - 1 and hasattr(model, "no_sync"):
                        micro_ctx.enter_context(model.no_sync())  # DDP: all-reduce on the last
                    loss = compute_loss(model, x, y) / cfg.grad_accum_steps
                (ctx.grad_scaler.scale(loss) if ctx.grad_scaler else loss).backward()
                loss_sum += loss.detach()
                ctx.timings["train"] += time.perf_counter() - t1
            t2 = time.perf_counter()
            loss_value = all_reduce_mean(loss_sum).item()  # the same value on every rank
            if ctx.grad_scaler:
                ctx.grad_scaler.unscale_(opt)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else None)
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                if cfg.on_nan == "stop":
                    raise UserError(
                        f"the loss became {loss_value} at step {step + 1}; the last good "
                        f"checkpoint is kept — lower LEARNING_RATE or set ON_NAN=skip")
                log.warning("step %d: loss is %s, step skipped (ON_NAN=skip)", step + 1,
                            loss_value)
                if ctx.grad_scaler:
                    ctx.grad_scaler.update()
            else:
                if ctx.grad_scaler:
                    ctx.grad_scaler.step(opt)
                    ctx.grad_scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            ctx.step = step + 1
            ctx.timings["train"] += time.perf_counter() - t2
            window_seconds += time.perf_counter() - step_t0
            window_steps += 1
            window_loss += loss_value
            if bar is not None:
                bar.update(1)
            if ctx.step % cfg.log_interval == 0 or ctx.step == end:
                # training throughput and mean loss over the steps since the last line
                tps = tokens_per_step * window_steps / max(window_seconds, 1e-9)
                mean_loss = window_loss / window_steps
                if ctx.is_main:
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}")
                    log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", ctx.step, end,
                             mean_loss, lr, tps)
                    if ctx.metrics:
                        ctx.metrics.write(step=ctx.step, train_loss=mean_loss, lr=lr,
                                          tokens_per_s=round(tps, 1), grad_norm=grad_norm,
                                          kind="train")
                window_seconds, window_steps, window_loss = 0.0, 0, 0.0
            if ctx.step % cfg.eval_interval == 0:
                evaluate(ctx)
            if ctx.step % cfg.checkpoint_interval == 0 and ctx.step != end:
                save(ctx)
            share_stop_signal(ctx)  # a signal seen by any rank stops all at the same step
            if ctx.stop_signal is not None and ctx.step != end:
                path = save(ctx)
                raise TrainingInterrupted(ctx.stop_signal, path)
    finally:
        stack.close()
    if n_steps > 0:
        save(ctx)

