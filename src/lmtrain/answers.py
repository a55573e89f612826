"""Answer accuracy: greedy answers to held-out questions, compared exactly with the expected ones.

A question is a :class:`QAPair`: the prompt (the rendered record up to and including the answer
prefix, ``QUESTION: abc ANSWER:``) and the expected answer. :func:`answer_accuracy` generates
greedily (argmax) for every prompt, batched and through a KV cache, and counts the answers that
equal the expected ones once surrounding whitespace is stripped.

Batches: prompts are sorted by length and left-padded; each row keeps its own positions (its
first real token is at position 0) and no token attends to padding, so a row decodes as it would
alone (the from-scratch GPT through ``KVCache.left_pad``, GPT-2 through ``attention_mask`` and
``position_ids``). A prompt too long to leave room for the answer inside ``block_size`` decodes
on its own, its window sliding as in ``lmtrain sample`` (:func:`lmtrain.generate.sample_tokens`).

An answer ends at the end-of-text token, at a stop string (by default a newline when every
expected answer is one line, else a blank line, the document separator of a character
vocabulary), or after a budget of tokens: the longest expected answer plus a margin, so an answer
that runs on past the expected one is still seen to be wrong.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmtrain.data.tokenizers import CharTokenizer, Tokenizer
from lmtrain.device import autocast_context
from lmtrain.errors import UserError
from lmtrain.generate import (
    Decoder,
    context_window,
    greedy,
    low_precision,
    model_kind,
    sample_tokens,
    start_context,
)
from lmtrain.models import unwrap_model
from lmtrain.padded_batch import PaddedBatch

#: Tokens generated beyond the longest expected answer: room for a leading space, the end of
#: text, and one token more that shows an answer running on.
ANSWER_MARGIN = 4
#: Prompts decoded together by default.
BATCH_SIZE = 64
#: Wrong answers an :class:`AnswerReport` keeps as examples by default.
EXAMPLES = 5

Progress = bool | None | Callable[[int, int], None]


@dataclass(frozen=True)
class QAPair:
    """A question as the model is prompted with it and the answer expected after it.

    ``prompt`` is the rendered text up to and including the answer prefix, without the space
    that follows it (``QUESTION: abc ANSWER:``), as the training text tokenizes it; ``answer``
    is the expected answer's text (compared with surrounding whitespace stripped).
    """

    prompt: str
    answer: str

    @classmethod
    def from_text(cls, text: str, answer_prefix: str = "ANSWER:") -> QAPair | None:
        """Split one rendered record at the first ``answer_prefix``; ``None`` without one."""
        at = text.find(answer_prefix)
        if at < 0:
            return None
        cut = at + len(answer_prefix)
        return cls(text[:cut].lstrip(), text[cut:].strip())


@dataclass(frozen=True)
class WrongAnswer:
    """One question answered wrongly: its prompt, the expected answer, what the model said."""

    prompt: str
    expected: str
    got: str


@dataclass
class AnswerReport:
    """Exact-match accuracy over a set of questions, and a few of the wrong answers."""

    correct: int
    total: int
    wrong: list[WrongAnswer] = field(default_factory=list)  # the first few, in input order
    seconds: float = 0.0  # generation time
    max_new_tokens: int = 0  # the budget each answer had
    answers: list[str] = field(default_factory=list)  # every answer given, stripped, in order

    @property
    def accuracy(self) -> float:
        """Correct answers as a fraction (0.0 for no question)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.accuracy

    def summary(self) -> str:
        """``answer accuracy 93.5% (187/200)``."""
        return f"answer accuracy {self.percent:.1f}% ({self.correct}/{self.total})"

    def metrics(self) -> dict[str, Any]:
        """Flat values for ``metrics.jsonl`` and the trackers."""
        return {"answer_accuracy": self.accuracy, "answers_correct": self.correct,
                "answers_total": self.total}

    def lines(self) -> list[str]:
        """The summary, then one line per wrong example."""
        out = [self.summary()]
        out += [f"  wrong: {w.prompt!r} expected {w.expected!r}, got {w.got!r}"
                for w in self.wrong]
        return out


def is_correct(expected: str, got: str) -> bool:
    """Exact match once surrounding whitespace is stripped from both."""
    return expected.strip() == got.strip()


def answer_budget(tokenizer: Tokenizer, answers: Sequence[str],
                  margin: int = ANSWER_MARGIN) -> int:
    """Tokens to generate per question: the longest expected answer's, plus ``margin``."""
    longest = 0
    for answer in answers:
        text = answer.strip()
        try:
            n = len(tokenizer.encode(text)) if text else 0
        except UserError:  # characters outside the vocabulary: at most one token each
            n = len(text)
        longest = max(longest, n)
    return longest + margin


def default_stops(answers: Sequence[str]) -> tuple[str, ...]:
    """A newline ends an answer when every expected answer is one line; else a blank line."""
    return ("\n\n",) if any("\n" in a.strip() for a in answers) else ("\n",)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one occurred. Stop strings count only
    after the first non-whitespace character (an answer may start on the next line)."""
    begin = len(text) - len(text.lstrip())
    ends = [i for i in (text.find(s, begin) for s in stops if s) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token (or id 0). A
    character outside a character vocabulary is a clear error naming the prompt."""
    if prompt and isinstance(tokenizer, CharTokenizer):
        unknown = tokenizer.unknown(prompt)
        if unknown:
            raise UserError(
                f"the question {prompt!r} holds characters outside the model's vocabulary "
                f"({', '.join(map(repr, unknown[:20]))}); the model cannot read it")
    return start_context(tokenizer, prompt)


class _Stops:
    """Whether a row's generated ids have ended: end of text or a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.eot = tokenizer.eot_id

    def ended(self, ids: list[int]) -> bool:
        if ids and ids[-1] == self.eot:
            return True
        return bool(self.stops) and cut_at_stop(self.tokenizer.decode(ids), self.stops)[1]

    def text(self, ids: list[int]) -> str:
        """The answer the ids spell: before the end of text, cut at the first stop string."""
        if self.eot is not None and self.eot in ids:
            ids = ids[:ids.index(self.eot)]
        return cut_at_stop(self.tokenizer.decode(ids), self.stops)[0]


@torch.no_grad()
def _greedy_padded(model: nn.Module, kind: str, window: int, contexts: list[list[int]],
                   max_new_tokens: int, device: torch.device,
                   ended: Callable[[list[int]], bool]) -> list[list[int]]:
    """Greedy ids after each context, all rows at once: left-padded, one KV cache
    (:class:`~lmtrain.padded_batch.PaddedBatch`).

    Every ``len(context) + max_new_tokens - 1`` fits the model's ``window`` (the caller checks).
    """
    batch = PaddedBatch(model, kind, window, device)
    n_rows = len(contexts)
    generated: list[list[int]] = [[] for _ in contexts]
    active = [True] * n_rows
    logits = batch.add(contexts)
    for step in range(max_new_tokens):
        tokens = logits.float().argmax(dim=-1)
        for row, token in enumerate(tokens.tolist()):
            if active[row]:
                generated[row].append(token)
                active[row] = not ended(generated[row])
        if not any(active) or step == max_new_tokens - 1:
            break
        logits = batch.step(tokens)
    return generated


def _greedy_alone(model: nn.Module, context: list[int], max_new_tokens: int, block_size: int,
                  device: torch.device, ended: Callable[[list[int]], bool]) -> list[int]:
    """Greedy ids after one context through :func:`sample_tokens` (its window slides)."""
    generated: list[int] = []
    for token in sample_tokens(model, context, greedy(max_new_tokens), block_size, device):
        generated.append(token)
        if ended(generated):
            break
    return generated


def greedy_ids(model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int, *,
               device: torch.device, block_size: int, batch_size: int = BATCH_SIZE,
               ended: Callable[[list[int]], bool] | None = None,
               on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (ids, in input order) of every context, ``batch_size`` at a time.

    A row stops after ``max_new_tokens`` ids or once ``ended(ids_so_far)`` is true (the ids it
    has then are kept, the last one included). ``on_batch(n)`` is told after each ``n`` rows.
    A model with neither a KV cache nor ``transformers``' cache decodes one context at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one id (see encode_prompt)")
    ended = ended or (lambda ids: False)
    results: list[list[int]] = [[] for _ in contexts]
    if max_new_tokens <= 0 or not contexts:
        return results
    model = unwrap_model(model)
    kind = model_kind(model)
    window = context_window(model, block_size)
    fits = [i for i, c in enumerate(contexts) if kind != "plain"
            and len(c) + max_new_tokens - 1 <= window]
    alone = sorted(set(range(len(contexts))) - set(fits))
    fits.sort(key=lambda i: len(contexts[i]))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, low_precision(model)):
            for lo in range(0, len(fits), batch_size):
                rows = fits[lo:lo + batch_size]
                out = _greedy_padded(model, kind, window, [list(contexts[i]) for i in rows],
                                     max_new_tokens, device, ended)
                for i, ids in zip(rows, out, strict=True):
                    results[i] = ids
                if on_batch:
                    on_batch(len(rows))
            for i in alone:
                results[i] = _greedy_alone(model, list(contexts[i]), max_new_tokens, block_size,
                                           device, ended)
                if on_batch:
                    on_batch(1)
    finally:
        model.train(was_training)
    return results


def greedy_answers(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                   max_new_tokens: int, *, device: torch.device, block_size: int,
                   batch_size: int = BATCH_SIZE, stops: Sequence[str] = ("\n",),
                   on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The greedy answer text after each prompt: up to the end of text or a stop string (not
    included), at most ``max_new_tokens`` tokens."""
    stop = _Stops(tokenizer, stops)
    contexts = [encode_prompt(tokenizer, p) for p in prompts]
    ids = greedy_ids(model, contexts, max_new_tokens, device=device, block_size=block_size,
                     batch_size=batch_size, ended=stop.ended, on_batch=on_batch)
    return [stop.text(row) for row in ids]


def answer_accuracy(model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[QAPair], *,
                    device: torch.device, block_size: int, batch_size: int = BATCH_SIZE,
                    max_new_tokens: int | None = None, stops: Sequence[str] | None = None,
                    examples: int = EXAMPLES, progress: Progress = None) -> AnswerReport:
    """Exact-match accuracy of greedy answers to ``pairs`` (see the module doc).

    ``model`` is put in eval mode and back (a DDP or ``torch.compile`` wrapper is looked
    through).
    ``max_new_tokens``: the budget per answer (default :func:`answer_budget`); ``stops``: the
    strings that end an answer (default :func:`default_stops`); ``examples``: wrong answers
    kept; ``progress``: a bar on stderr (``None``: when stderr is a terminal), or a callable
    told ``(done, total)`` after each batch.
    """
    t0 = time.perf_counter()
    answers = [p.answer for p in pairs]
    budget = answer_budget(tokenizer, answers) if max_new_tokens is None else max_new_tokens
    with _progress_callback(progress, len(pairs)) as on_batch:
        got = greedy_answers(model, tokenizer, [p.prompt for p in pairs], budget,
                             device=device, block_size=block_size, batch_size=batch_size,
                             stops=default_stops(answers) if stops is None else stops,
                             on_batch=on_batch)
    wrong = [WrongAnswer(p.prompt, p.answer.strip(), g.strip())
             for p, g in zip(pairs, got, strict=True) if not is_correct(p.answer, g)]
    return AnswerReport(correct=len(pairs) - len(wrong), total=len(pairs),
                        wrong=wrong[:max(examples, 0)], seconds=time.perf_counter() - t0,
                        max_new_tokens=budget, answers=[g.strip() for g in got])


@contextlib.contextmanager
def _progress_callback(progress: Progress, total: int):
    """``on_batch(n)`` for :func:`greedy_ids` from ``progress`` (see :func:`answer_accuracy`)."""
    if callable(progress):
        done = [0]

        def tell(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        yield tell
        return
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, unit="q", desc="answers", disable=not show, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()


def naive_greedy_answers(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                         max_new_tokens: int, *, device: torch.device, block_size: int,
                         stops: Sequence[str] = ("\n",), use_cache: bool = False) -> list[str]:
    """The reference: one prompt at a time through :class:`lmtrain.generate.Decoder` (without
    a KV cache unless ``use_cache``), re-reading the whole window every token."""
    stop = _Stops(tokenizer, stops)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, low_precision(model)):
            for prompt in prompts:
                ids = encode_prompt(tokenizer, prompt)
                decoder = Decoder(model, block_size, device, use_cache)
                generated: list[int] = []
                for _ in range(max_new_tokens):
                    generated.append(int(decoder.next_logits(ids + generated).float().argmax()))
                    if stop.ended(generated):
                        break
                out.append(stop.text(generated))
    finally:
        model.train(was_training)
    return out
