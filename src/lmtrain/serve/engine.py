"""The decoding engine of a server: requests queue up, join the running batch between steps,
and leave it as they end, each with its own settings and random generator.

Each request gets what it would get alone: its rows' logits are computed as they would be alone
(:mod:`lmtrain.padded_batch`), and its tokens are drawn with :func:`lmtrain.generate.pick_token`
from its own ``torch.Generator``, so a greedy answer and a seeded sample do not depend on the
requests beside it. A request whose prompt and ``max_tokens`` do not fit the model's window
(or a model without a KV cache) decodes on its own through :class:`lmtrain.generate.Decoder`,
its window sliding as in ``lmtrain sample``, one token per engine step beside the batch.

One thread runs the engine (:meth:`Engine.start`); :meth:`Engine.step` also runs it in the
caller's thread (``lmtrain chat``).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmtrain.config import GenerationSettings
from lmtrain.data.tokenizers import CharTokenizer, Tokenizer
from lmtrain.device import autocast_context
from lmtrain.errors import UserError
from lmtrain.generate import (
    Decoder,
    context_window,
    low_precision,
    model_kind,
    pick_token,
    start_context,
)
from lmtrain.healing import TextPieces, heal_prompt, token_bytes
from lmtrain.models import unwrap_model
from lmtrain.padded_batch import PaddedBatch
from lmtrain.serve import MAX_BATCH

log = logging.getLogger("lmtrain")
#: How a request ends: the ``finish`` of its last :class:`Event`.
FINISHES = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class Event:
    """What a request hears from the engine: a piece of ``text``; or, last, its end:
    ``finish`` (``stop``, ``length``, ``cancelled``; ``error`` with ``error`` set) and the
    tokens it generated."""

    text: str = ""
    finish: str | None = None
    tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request: what to feed, how to sample, where its events go."""

    context: list[int]  # the prompt's ids, token-healed
    sampling: GenerationSettings
    generator: torch.Generator
    emit: Callable[[Event], None]
    prompt_tokens: int = 0
    allowed: list[int] | None = None  # the first token's ids (token healing)
    prefix: bytes = b""  # the text the first token's text starts with (already in the prompt)
    stops: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (a client that went away)."""
        self.cancelled.set()


class _Row:
    """A job being decoded: its ids so far, its text so far and how much was sent."""

    def __init__(self, job: Job, table: list[bytes], stop_id: int | None, device: torch.device,
                 decoder: Decoder | None = None) -> None:
        self.job, self.stop_id, self.decoder = job, stop_id, decoder
        self.generated: list[int] = []
        self.pieces = TextPieces(table, job.prefix)
        self.text, self.sent = "", 0
        self.allowed = (None if job.allowed is None
                        else torch.tensor(job.allowed, dtype=torch.long, device=device))
        self.hold = max((len(s) for s in job.stops), default=1) - 1

    def take(self, token: int) -> bool:
        """Record ``token``; False once the row has ended (its end event sent)."""
        self.allowed = None
        if token == self.stop_id:
            return self._end("stop")
        self.generated.append(token)
        self.text += self.pieces.push(token)
        last = len(self.generated) == self.job.sampling.max_new_tokens
        if last:
            self.text += self.pieces.end()
        if self._cut_at_stop():
            return self._end("stop")
        if last:
            return self._end("length")
        self._send(len(self.text) - self._stop_begun())
        return True

    def _cut_at_stop(self) -> bool:
        begin = max(self.sent - self.hold, 0)
        found = [i for i in (self.text.find(s, begin) for s in self.job.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def _stop_begun(self) -> int:
        """How many of the text's last characters may be the start of a stop string (held
        back until the next tokens tell)."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(stop.startswith(tail) for stop in self.job.stops):
                return k
        return 0

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.emit(Event(text=self.text[self.sent:upto]))
            self.sent = upto

    def _end(self, reason: str) -> bool:
        self._send(len(self.text))
        self.job.emit(Event(finish=reason, tokens=len(self.generated)))
        return False


class Engine:
    """Decode many requests at once (see the module doc). ``max_batch=1`` serves one request
    at a time (batching off)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, block_size: int,
                 device: torch.device, max_batch: int = MAX_BATCH) -> None:
        self.model = unwrap_model(model).eval()
        self.tokenizer, self.block_size, self.device = tokenizer, block_size, device
        self.max_batch = max(1, max_batch)
        self.kind = model_kind(self.model)
        self.window = context_window(self.model, block_size)
        self.table = token_bytes(tokenizer)
        self.low = low_precision(self.model)
        self.batch = (PaddedBatch(self.model, self.kind, self.window, device)
                      if self.kind != "plain" else None)
        self.batched: list[_Row] = []  # the batch's rows, in its order
        self.logits: torch.Tensor | None = None  # their next-token logits
        self.alone: list[_Row] = []
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.held: list[Job] = []  # taken from the queue by the idle thread, not yet admitted
        self.thread: threading.Thread | None = None
        self.ended: Counter[str] = Counter()  # requests ended so far, by finish reason

    def job(self, prompt: str, sampling: GenerationSettings, emit: Callable[[Event], None], *,
            seed: int | None = None, stops: Sequence[str] = ()) -> Job:
        """A request for ``prompt`` (token-healed as ``lmtrain sample`` heals it); a character
        outside the vocabulary is a :class:`~lmtrain.errors.UserError`."""
        if sampling.max_new_tokens < 1:
            raise UserError("an answer needs room for at least one token (max_new_tokens >= 1)")
        if isinstance(self.tokenizer, CharTokenizer):
            unknown = self.tokenizer.unknown(prompt)
            if unknown:
                raise UserError(f"the prompt holds characters outside the model's vocabulary "
                                f"({', '.join(map(repr, unknown[:20]))})")
        ids = start_context(self.tokenizer, prompt)
        healed = heal_prompt(ids, self.table)
        seed = secrets.randbits(63) if seed is None else seed
        return Job(healed.context, sampling, torch.Generator().manual_seed(seed),
                   self._counted(emit),
                   prompt_tokens=len(ids), allowed=healed.allowed, prefix=healed.prefix,
                   stops=tuple(s for s in stops if s))

    def _counted(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """``emit``, counting the request's end in :attr:`ended`."""

        def counted(event: Event) -> None:
            if event.finish is not None:
                self.ended[event.finish] += 1
            emit(event)

        return counted

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch at the next step (thread-safe)."""
        self.waiting.put(job)

    @property
    def in_flight(self) -> int:
        """Requests queued or being decoded (read from any thread: a moment's count)."""
        return len(self.batched) + len(self.alone) + len(self.held) + self.waiting.qsize()

    @property
    def busy(self) -> bool:
        """Whether any request is queued or being decoded."""
        return self.in_flight > 0

    def start(self) -> None:
        """Run the engine in a thread of its own until :meth:`stop`."""
        self.thread = threading.Thread(target=self._run, name="lmtrain-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the engine's thread once the requests queued so far have ended."""
        if self.thread is not None:
            self.waiting.put(None)
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while True:
            if not (self.batched or self.alone or self.held):
                job = self.waiting.get()  # idle: wait for work
                if job is None:
                    return
                self.held.append(job)
            self.step()

    def _next_job(self) -> Job | None:
        """The oldest request not yet admitted, or None (none, or the stop sign, left queued)."""
        if self.held:
            return self.held.pop(0)
        try:
            job = self.waiting.get_nowait()
        except queue.Empty:
            return None
        if job is None:  # stop: the thread sees it again once idle
            self.waiting.put(None)
        return job

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then one token for every request being decoded."""
        try:
            with autocast_context(self.device, self.low):
                self._admit()
                self._step_batch()
                self._step_alone()
        except Exception as exc:  # the engine must outlive a failed step: its rows end
            log.exception("decoding failed")
            for row in self.batched + self.alone:
                row.job.emit(Event(finish="error", error=f"decoding failed: {exc}"))
            self.batched, self.alone, self.logits = [], [], None
            if self.batch is not None:
                self.batch.keep([])

    def _admit(self) -> None:
        joining: list[_Row] = []
        while len(self.batched) + len(joining) + len(self.alone) < self.max_batch:
            job = self._next_job()
            if job is None:
                break
            if job.cancelled.is_set():
                job.emit(Event(finish="cancelled"))
                continue
            stop_id = self.tokenizer.eot_id if job.sampling.stop_at_eot else None
            fits = len(job.context) + job.sampling.max_new_tokens - 1 <= self.window
            if self.batch is not None and fits:
                joining.append(_Row(job, self.table, stop_id, self.device))
            else:
                decoder = Decoder(self.model, self.block_size, self.device)
                self.alone.append(_Row(job, self.table, stop_id, self.device, decoder))
        if joining:
            assert self.batch is not None
            logits = self.batch.add([row.job.context for row in joining])
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
            self.batched += joining

    def _step_batch(self) -> None:
        if not self.batched or self.logits is None or self.batch is None:
            return
        tokens = _choose(self.logits, self.batched)
        keep = [i for i, (row, token) in enumerate(zip(self.batched, tokens, strict=True))
                if _goes_on(row, token)]
        self.batch.keep(keep)
        self.batched = [self.batched[i] for i in keep]
        self.logits = (self.batch.step(torch.tensor([tokens[i] for i in keep]))
                       if keep else None)

    def _step_alone(self) -> None:
        still = []
        for row in self.alone:
            assert row.decoder is not None
            if row.job.cancelled.is_set():
                row.job.emit(Event(finish="cancelled", tokens=len(row.generated)))
                continue
            logits = row.decoder.next_logits(row.job.context + row.generated)
            if row.take(pick_token(logits, row.job.sampling, row.job.generator, row.allowed)):
                still.append(row)
        self.alone = still


def _choose(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """The next token of every row: argmax for greedy rows, drawn with each row's own
    settings and generator for the others."""
    tokens = logits.float().argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.job.sampling.top_k != 1 or row.allowed is not None:
            tokens[i] = pick_token(logits[i], row.job.sampling, row.job.generator, row.allowed)
    return tokens


def _goes_on(row: _Row, token: int) -> bool:
    """Whether ``row`` stays in the batch after ``token``; a cancelled one leaves at once."""
    if row.job.cancelled.is_set():
        row.job.emit(Event(finish="cancelled", tokens=len(row.generated)))
        return False
    return row.take(token)
