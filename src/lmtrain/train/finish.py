"""The end of a run: its final losses (the loop's own last evaluation when there was one), val
perplexity, answer accuracy on question/answer records, and the sample."""

from __future__ import annotations

import logging
import time

from lmtrain.generate import default_prompt, generate_text
from lmtrain.reporting import report_final
from lmtrain.sharding import is_sharded
from lmtrain.train.answer_eval import report_final_answers
from lmtrain.train.loop import evaluate
from lmtrain.train.perplexity import perplexity
from lmtrain.train.state import RunContext

log = logging.getLogger("lmtrain")


def finish(ctx: RunContext) -> tuple[dict[str, float], str]:
    """The final losses (with perplexity and answer accuracy) and the end-of-run sample."""
    losses = _final_evaluation(ctx)
    _report_perplexity(ctx, losses)
    report_final_answers(ctx, losses)  # question/answer records
    return losses, _sample_at_end(ctx)


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
    # FSDP: every rank takes part in the forward passes (the same seed, the same sample)
    sample = _sample(ctx) if ctx.is_main or is_sharded(ctx.raw_model) else ""
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
