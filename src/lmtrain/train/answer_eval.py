"""Answer accuracy during a run on question/answer records, beside the loss.

At each evaluation up to ``EVAL_ANSWERS`` held-out questions (the validation records', see
:mod:`lmtrain.data.qa_source`) are answered greedily, batched through a KV cache
(:func:`lmtrain.answers.answer_accuracy`). The exact-match accuracy is logged after the loss,
kept in the run's last losses (so checkpoints carry it) and recorded in ``metrics.jsonl`` as
``val_answer_accuracy`` with ``val_answers_correct`` and ``val_answers_total``, which the
trackers receive as ``eval/...``; the end of the run reports the last one as ``final/...``
with a few wrong answers. The questions are the same at every evaluation (spread evenly over
the held-out ones), so the numbers compare across steps. Only the main process answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TypeVar

from lmtrain.answers import AnswerReport, QAPair, answer_accuracy
from lmtrain.data.tokenizers import document_separator
from lmtrain.sharding import is_sharded
from lmtrain.train.state import RunContext

log = logging.getLogger("lmtrain")
T = TypeVar("T")


def spread(items: Sequence[T], n: int) -> list[T]:
    """At most ``n`` of ``items``, evenly spaced (all of them when there are no more)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def answer_metrics(report: AnswerReport) -> dict[str, float | int]:
    """The numbers a report adds to a metrics record."""
    return {"val_answer_accuracy": report.accuracy, "val_answers_correct": report.correct,
            "val_answers_total": report.total}


def held_out_pairs(ctx: RunContext) -> list[QAPair]:
    """Up to ``EVAL_ANSWERS`` held-out questions of the run's records; none for plain text."""
    limit = ctx.config.evaluation.eval_answers
    if not limit or ctx.data.held_out is None:
        return []
    end_of_text = document_separator(ctx.tokenizer)
    first = not ctx.data.held_out.is_read(end_of_text)
    held = ctx.data.held_out.get(end_of_text)
    pairs = [QAPair(q.prompt, q.answer) for q in spread(held.questions, limit)]
    if first:  # said once per session
        left_out = f" ({held.seen} also asked in training, left out)" if held.seen else ""
        log.log(logging.INFO if pairs else logging.WARNING,
                "answers: %d held-out questions%s, %d answered at each evaluation",
                len(held.questions), left_out, len(pairs))
    return pairs


def measure_answers(ctx: RunContext) -> None:
    """Score answers now (see the module doc); nothing on plain text or with EVAL_ANSWERS=0."""
    if not ctx.is_main or is_sharded(ctx.raw_model):  # FSDP: `lmtrain eval --answers` after
        return
    t0 = time.perf_counter()
    pairs = held_out_pairs(ctx)
    if not pairs:
        return
    report = answer_accuracy(ctx.raw_model, ctx.tokenizer, pairs, device=ctx.device,
                             block_size=ctx.config.model.block_size, progress=False)
    ctx.timings["eval"] += time.perf_counter() - t0
    ctx.last_answers = report
    ctx.last_losses["val_answer_accuracy"] = report.accuracy
    log.info("step %d: %s", ctx.step, report.summary())
    if ctx.metrics:
        ctx.metrics.write(step=ctx.step, **answer_metrics(report), kind="eval")


def report_final_answers(ctx: RunContext, losses: dict[str, float]) -> None:
    """At the end of the run: the last answer accuracy beside the final losses (``losses``
    gains ``val_answer_accuracy``), a few wrong answers, and a ``final`` metrics record."""
    report = ctx.last_answers
    if report is None or not ctx.is_main:
        return
    losses["val_answer_accuracy"] = report.accuracy
    log.info("final: %s", report.summary())
    for line in report.lines()[1:]:
        log.info("%s", line)
    if ctx.metrics:
        ctx.metrics.write(step=ctx.step, **answer_metrics(report), kind="final")
