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
from lmtrain.progress import TrainProgress
from lmtrain.sharding import is_sharded
from lmtrain.train.state import Components, LoopSettings, RunServices

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


def held_out_pairs(parts: Components, limit: int) -> list[QAPair]:
    """Up to ``limit`` (``EVAL_ANSWERS``) held-out questions of the run's records; none for
    plain text."""
    held_out = parts.data.held_out
    if not limit or held_out is None:
        return []
    end_of_text = document_separator(parts.tokenizer)
    first = not held_out.is_read(end_of_text)
    held = held_out.get(end_of_text)
    pairs = [QAPair(q.prompt, q.answer) for q in spread(held.questions, limit)]
    if first:  # said once per session
        left_out = f" ({held.seen} also asked in training, left out)" if held.seen else ""
        log.log(logging.INFO if pairs else logging.WARNING,
                "answers: %d held-out questions%s, %d answered at each evaluation",
                len(held.questions), left_out, len(pairs))
    return pairs


def measure_answers(parts: Components, progress: TrainProgress, settings: LoopSettings,
                    services: RunServices) -> None:
    """Score answers now (see the module doc); nothing on plain text or with EVAL_ANSWERS=0."""
    if not parts.placement.is_main or is_sharded(parts.raw_model):  # FSDP: `lmtrain eval
        return                                                       # --answers` afterwards
    t0 = time.perf_counter()
    pairs = held_out_pairs(parts, settings.evaluation.eval_answers)
    if not pairs:
        return
    report = answer_accuracy(parts.raw_model, parts.tokenizer, pairs,
                             device=parts.placement.device, block_size=settings.block_size,
                             progress=False)
    services.timings["eval"] += time.perf_counter() - t0
    services.last_answers = report
    progress.last_losses["val_answer_accuracy"] = report.accuracy
    log.info("step %d: %s", progress.step, report.summary())
    if services.metrics:
        services.metrics.write(step=progress.step, **answer_metrics(report), kind="eval")


def report_final_answers(services: RunServices, step: int, is_main: bool,
                         losses: dict[str, float]) -> None:
    """At the end of the run: the last answer accuracy beside the final losses (``losses``
    gains ``val_answer_accuracy``), a few wrong answers, and a ``final`` metrics record."""
    report = services.last_answers
    if report is None or not is_main:
        return
    losses["val_answer_accuracy"] = report.accuracy
    log.info("final: %s", report.summary())
    for line in report.lines()[1:]:
        log.info("%s", line)
    if services.metrics:
        services.metrics.write(step=step, **answer_metrics(report), kind="final")
