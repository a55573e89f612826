"""The end of a run: its final losses (the loop's own last evaluation when there was one), val
perplexity, answer accuracy on question/answer records, and the sample."""

from __future__ import annotations

import logging
import time

from lmtrain.config import GenerationSettings
from lmtrain.generate import default_prompt, generate_text
from lmtrain.progress import TrainProgress
from lmtrain.reporting import report_final
from lmtrain.sharding import is_sharded
from lmtrain.train.answer_eval import report_final_answers
from lmtrain.train.loop import evaluate
from lmtrain.train.perplexity import perplexity
from lmtrain.train.state import Components, LoopSettings, RunServices

log = logging.getLogger("lmtrain")


def finish(parts: Components, progress: TrainProgress, settings: LoopSettings,
           services: RunServices, generation: GenerationSettings, model_type: str,
           ) -> tuple[dict[str, float], str]:
    """The final losses (with perplexity and answer accuracy) and the end-of-run sample of
    ``generation``'s settings (the prompt by ``model_type``)."""
    losses = _final_evaluation(parts, progress, settings, services)
    is_main = parts.placement.is_main
    if "val" in losses:  # EVAL_ITERS=0: nothing was evaluated
        losses["val_perplexity"] = perplexity(losses["val"])
        if is_main:
            report_final(losses, progress.step, services.metrics)
    report_final_answers(services, progress.step, is_main, losses)  # question/answer records
    t0 = time.perf_counter()
    # FSDP: every rank takes part in the forward passes (the same seed, the same sample)
    sharded = is_sharded(parts.raw_model)
    sample = _sample(parts, settings, generation, model_type) if is_main or sharded else ""
    services.timings["sample"] = time.perf_counter() - t0
    log.info("sample:\n%s", sample)
    if services.metrics and sample:
        services.metrics.text("sample", sample, progress.step)
    return losses, sample


def _final_evaluation(parts: Components, progress: TrainProgress, settings: LoopSettings,
                      services: RunServices) -> dict[str, float]:
    """The losses at the last step: the loop's own final evaluation, else a new one."""
    losses = (dict(progress.last_losses) if progress.evaluated
              else evaluate(parts, progress, settings, services))
    losses.pop("step", None)
    return losses


def _sample(parts: Components, settings: LoopSettings, gen: GenerationSettings,
            model_type: str) -> str:
    """The end-of-run sample (rank 0; timed as ``sample``)."""
    if gen.max_new_tokens == 0:
        return ""
    prompt = default_prompt(gen, model_type)
    return generate_text(parts.raw_model, parts.tokenizer, prompt, gen, settings.block_size,
                         parts.placement.device, seed=settings.optimization.seed)
