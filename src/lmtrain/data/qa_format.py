"""Question/answer records: their three formats, the checks that turn a malformed record into
one clear line, and the one template every record is rendered through.

The formats (``DATA_FORMAT``; ``auto`` tells them apart by the first record's fields, in
this order):

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``. Each user turn is a
  question and the assistant turn after it its answer; a system message goes before the next
  question (the first one), on a line of its own. Turns of one role in a row are joined by a
  newline.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; the question is the
  instruction, then the input (optional, may be empty) on the next line.
- ``qa``: ``{"question": ..., "answer": ...}``.

A record becomes its turns, ``(question, answer)`` pairs with surrounding whitespace dropped.
Each turn is rendered through ``QA_TEMPLATE`` (default ``QUESTION: {question} ANSWER:
{answer}``) and followed by the end of text. The text up to the answer (without the whitespace
before it) is the *prompt*; the rest of the turn (that whitespace, the answer, any text the
template puts after it) and the end of text are the *answer*, the tokens ``LOSS_ON=answers``
trains on. Nothing here knows files: :class:`RecordError` names the field, and the reader
adds the file and the line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from lmtrain.unicode_text import surrogate_problem

if TYPE_CHECKING:
    from lmtrain.data.tokenizers import Tokenizer

#: The record formats, in the order ``DATA_FORMAT=auto`` tries them.
RECORD_FORMATS = ("chat", "alpaca", "qa")
#: The fields each format needs (``alpaca``'s ``input`` is optional).
REQUIRED = {"chat": ("messages",), "alpaca": ("instruction", "output"),
            "qa": ("question", "answer")}
ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]  # (question, answer)


class RecordError(ValueError):
    """A malformed record; the message names the field (the reader adds file and line)."""


class Question(NamedTuple):
    """A held-out question: the prompt the model continues and the answer expected after it."""

    prompt: str
    answer: str


def detect_format(fields: Sequence[str] | Mapping[str, Any]) -> str:
    """The record format whose fields a record (or a table's columns) has, else ``text``."""
    names = set(fields)
    for fmt in RECORD_FORMATS:
        if set(REQUIRED[fmt]) <= names:
            return fmt
    return "text"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def text_field(record: Mapping[str, Any], name: str, optional: bool = False,
               label: str | None = None) -> str:
    """``record[name]`` as text, stripped; a :class:`RecordError` when it is missing, not text
    or empty (an optional field may be missing or empty: ``""``)."""
    label = label or f"field {name!r}"
    if name not in record or (optional and record[name] is None):
        if optional:
            return ""
        raise RecordError(f"{label} is missing")
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"{label} is {_kind(value)}, not text")
    if not value.strip() and not optional:
        raise RecordError(f"{label} is empty")
    problem = surrogate_problem(value)
    if problem is not None:
        raise RecordError(f"{label} {problem}, which is not text")
    return value.strip()


def record_turns(record: Any, fmt: str) -> list[Turn]:
    """The ``(question, answer)`` turns of one record of format ``fmt``."""
    if not isinstance(record, Mapping):
        raise RecordError(f"the record is {_kind(record)}, not an object with the fields "
                          f"{', '.join(REQUIRED[fmt])}")
    if fmt == "qa":
        return [(text_field(record, "question"), text_field(record, "answer"))]
    if fmt == "alpaca":
        question = "\n".join(t for t in (text_field(record, "instruction"),
                                         text_field(record, "input", optional=True)) if t)
        return [(question, text_field(record, "output"))]
    if fmt == "chat":
        return chat_turns(record)
    raise ValueError(f"not a record format: {fmt!r}")


def _messages(record: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(role, content) of each message, checked."""
    messages = record.get("messages")
    if "messages" not in record:
        raise RecordError("field 'messages' is missing")
    if not isinstance(messages, list | tuple):
        raise RecordError(f"field 'messages' is {_kind(messages)}, not a list of turns")
    if not messages:
        raise RecordError("field 'messages' is empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RecordError(f"{where} is {_kind(message)}, not an object with role and content")
        role = text_field(message, "role", label=f"{where}.role")
        if role not in ROLES:
            raise RecordError(f"{where}.role is {role!r}, not one of {', '.join(ROLES)}")
        yield role, text_field(message, "content", label=f"{where}.content",
                               optional=role == "system")


def chat_turns(record: Mapping[str, Any]) -> list[Turn]:
    """The turns of a chat record (see the module doc)."""
    turns: list[Turn] = []
    system: list[str] = []
    question: list[str] = []
    answer: list[str] = []
    for i, (role, content) in enumerate(_messages(record)):
        if role == "assistant" and not question:
            raise RecordError(f"messages[{i}] is an assistant turn before any user turn")
        if role != "assistant" and answer:  # the turn before is complete
            turns.append(("\n".join(question), "\n".join(answer)))
            question, answer = [], []
        if role == "system":
            system += [content] if content else []
        elif role == "user":
            question += [*system, content]
            system = []
        else:
            answer.append(content)
    if question and not answer:
        raise RecordError("the last user turn of 'messages' has no assistant turn after it")
    if answer:
        turns.append(("\n".join(question), "\n".join(answer)))
    if not turns:
        raise RecordError("field 'messages' has no user turn")
    return turns  # a system message after the last answer starts nothing: it is left out


@dataclass(frozen=True)
class QATemplate:
    """``QA_TEMPLATE``: ``{question}`` once, then ``{answer}`` once (checked by the settings)."""

    text: str

    def prompt(self, question: str) -> str:
        """The text before the answer, without the whitespace that precedes it."""
        return self._head(question).rstrip()

    def answer(self, question: str, answer: str) -> str:
        """The answer as rendered: the whitespace before it, the answer, the template's tail."""
        head = self._head(question)
        tail = self.text.split("{answer}", 1)[1]
        return head[len(head.rstrip()):] + answer + tail

    def _head(self, question: str) -> str:
        return self.text.split("{answer}", 1)[0].replace("{question}", question)

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        """``(text, is_answer)`` pieces of a record, one prompt and one answer per turn; the
        end of text after each answer is the caller's (it is a token, not text)."""
        out: list[tuple[str, bool]] = []
        for question, answer in turns:
            out += [(self.prompt(question), False), (self.answer(question, answer), True)]
        return out

    def render(self, turns: Sequence[Turn], end_of_text: str) -> str:
        """The record as text, ``end_of_text`` after each answer."""
        return "".join(text + (end_of_text if is_answer else "")
                       for text, is_answer in self.segments(turns))

    def questions(self, turns: Sequence[Turn], end_of_text: str) -> list[Question]:
        """One :class:`Question` per turn: the conversation so far up to the answer, and the
        answer."""
        out: list[Question] = []
        context = ""
        for question, answer in turns:
            prompt = context + self.prompt(question)
            out.append(Question(prompt, answer))
            context = prompt + self.answer(question, answer) + end_of_text
        return out


def encode_records(tokenizer: Tokenizer, template: QATemplate, records: Sequence[Sequence[Turn]],
                   end_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, answer mask, tokens per record) of ``records``.

    Each prompt and each answer is encoded on its own, so an answer starts at a token
    boundary and its tokens are known by construction, never by searching for a prefix;
    ``end_ids`` (the end of text) follow each answer and belong to it.
    """
    texts: list[str] = []
    owners: list[tuple[int, bool]] = []
    for r, turns in enumerate(records):
        for text, is_answer in template.segments(turns):
            texts.append(text)
            owners.append((r, is_answer))
    end = np.asarray(end_ids, dtype=np.int64)
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    lengths = np.zeros(len(records), dtype=np.int64)
    for piece, (r, is_answer) in zip(tokenizer.encode_arrays(texts), owners, strict=True):
        parts = [piece.astype(np.int64), end] if is_answer else [piece.astype(np.int64)]
        for part in parts:
            ids.append(part)
            mask.append(np.full(len(part), is_answer))
            lengths[r] += len(part)
    if not ids:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), lengths
    return np.concatenate(ids), np.concatenate(mask), lengths
