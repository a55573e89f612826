"""Question/answer records read from a source, and the questions held out for scoring.

A source in a record format (:mod:`lmtrain.data.qa_format`) is ``.jsonl`` files, Parquet /
Arrow files or an ``hf:`` dataset whose columns are the format's fields. Every record is
checked as it is read; a malformed one stops the run with one line naming the file, the line
(a table's row) and the field, before anything is trained or written.

**The validation split of records** is a dataset's own ``validation`` split, else the last
records: the first ``int(n * TRAIN_SPLIT)`` of the ``n`` records train (:func:`training_records`),
the rest validate. The token arrays are cut at the same record, so no record is split between
the two. The *held-out questions* are the turns of the validation records; one whose prompt
is also a training record's is left out (and counted), so the model is never scored on a
question it trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.data.hf_datasets import SUFFIXES as TABLE_SUFFIXES
from lmtrain.data.hf_datasets import table_columns, table_rows
from lmtrain.data.qa_format import (
    REQUIRED,
    QATemplate,
    Question,
    RecordError,
    Turn,
    detect_format,
    record_turns,
)
from lmtrain.data.sources import BLANK_LINE, DOC_SEPARATOR, read_jsonl, source_digest
from lmtrain.errors import UserError

#: Files a record format is read from.
RECORD_SUFFIXES = (".jsonl", *TABLE_SUFFIXES)
#: Fields read when a table has them, besides the required ones.
OPTIONAL = {"alpaca": ("input",)}


#: How many records of a .jsonl ``DATA_FORMAT=auto`` looks at to tell the format.
DETECT_RECORDS = 100


def source_format(data_format: str, files: list[Path]) -> str:
    """The format a source is read in: ``DATA_FORMAT``, or for ``auto`` the record format the
    fields of its first records (a table's columns) name; anything else is plain text. A
    record lacking a field does not make the file text: it is refused by its format later."""
    if data_format != "auto":
        return data_format
    first = files[0]
    if first.suffix == ".jsonl":
        seen = 0
        for _, _, record in read_jsonl(first):
            if record is BLANK_LINE:
                continue
            fmt = detect_format(record) if isinstance(record, dict) else "text"
            seen += 1
            if fmt != "text" or seen >= DETECT_RECORDS:
                return fmt
        return "text"
    if first.suffix in TABLE_SUFFIXES:
        return detect_format(table_columns(first))
    return "text"


def training_records(n_records: int, train_split: float) -> int:
    """How many of ``n_records`` records train (the first ones); the rest validate."""
    return int(n_records * train_split)


class RecordStream:
    """The records of a source in one record format: their turns, checked
    (:meth:`records`), and their text through the template (iterating it, which is what a
    tokenizer learns from; ``separator`` is the end of text after each answer)."""

    def __init__(self, source: str, files: list[Path], fmt: str, template: str) -> None:
        for path in files:
            if path.suffix not in RECORD_SUFFIXES:
                raise UserError(
                    f"TRAINING_DATA_SOURCE: {path} is not a .jsonl, .parquet or .arrow file, "
                    f"and {fmt} records are read from those; set DATA_FORMAT=text to train on "
                    f"it as plain text")
        self.source = source
        self.files = files
        self.format = fmt
        self.template = QATemplate(template)
        self.separator = DOC_SEPARATOR
        self.bytes_read = 0

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def digest(self) -> str:
        """sha256 of the files' contents, the format and the template."""
        inner = source_digest(self.files, "")
        return hashlib.sha256(f"{inner}\0{self.format}\0{self.template.text}".encode()
                              ).hexdigest()

    def records(self) -> Iterator[list[Turn]]:
        """The turns of every record, in order; a malformed record is a :class:`UserError`
        naming the file, the line (row) and the field."""
        self.bytes_read = 0
        for path in self.files:
            done = self.bytes_read
            rows = self._jsonl(path) if path.suffix == ".jsonl" else self._table(path)
            for where, record in rows:
                try:
                    yield record_turns(record, self.format)
                except RecordError as exc:
                    raise UserError(
                        f"TRAINING_DATA_SOURCE: {path} {where}: {exc} ({self.format} records "
                        f"hold {', '.join(REQUIRED[self.format])})") from None
            self.bytes_read = done + path.stat().st_size

    def _jsonl(self, path: Path) -> Iterator[tuple[str, Any]]:
        for lineno, size, record in read_jsonl(path):
            self.bytes_read += size
            if record is not BLANK_LINE:
                yield f"line {lineno}", record

    def _table(self, path: Path) -> Iterator[tuple[str, Any]]:
        columns = table_columns(path)
        missing = [c for c in REQUIRED[self.format] if c not in columns]
        if missing:
            raise UserError(
                f"TRAINING_DATA_SOURCE: {path} has no column {missing[0]!r} (it has "
                f"{', '.join(columns)}); {self.format} records hold "
                f"{', '.join(REQUIRED[self.format])}")
        wanted = [c for c in (*REQUIRED[self.format], *OPTIONAL.get(self.format, ()))
                  if c in columns]
        row = 0
        for batch in table_rows(path, wanted):
            for record in batch:
                row += 1
                yield f"row {row}", record

    def __iter__(self) -> Iterator[str]:
        for turns in self.records():
            yield self.template.render(turns, self.separator)

    def questions(self, end_of_text: str) -> Iterator[list[Question]]:
        """Each record's questions (one per turn; see :meth:`QATemplate.questions`)."""
        for turns in self.records():
            yield self.template.questions(turns, end_of_text)


@dataclass(frozen=True)
class HeldOut:
    """The held-out questions, and how many validation questions were left out because a
    training record asks them too."""

    questions: list[Question]
    seen: int = 0


def _key(question: Question) -> bytes:
    return hashlib.blake2b(question.prompt.encode(), digest_size=12).digest()


def held_out_questions(train: RecordStream, val: RecordStream | None, train_split: float,
                       end_of_text: str) -> HeldOut:
    """The questions of the validation records (see the module doc): ``val``'s, else those of
    the records after the ``TRAIN_SPLIT`` cut of ``train``; ``end_of_text`` is the text that
    ends an answer in a prompt of a later turn."""
    if val is None:
        keys = [[_key(q) for q in questions] for questions in train.questions(end_of_text)]
        n_train = training_records(len(keys), train_split)
        seen = {k for record in keys[:n_train] for k in record}
        candidates = (q for i, questions in enumerate(train.questions(end_of_text))
                      if i >= n_train for q in questions)
    else:
        seen = {_key(q) for questions in train.questions(end_of_text) for q in questions}
        candidates = (q for questions in val.questions(end_of_text) for q in questions)
    kept, dropped = [], 0
    for question in candidates:
        if _key(question) in seen:
            dropped += 1
        else:
            kept.append(question)
    return HeldOut(kept, dropped)


def all_questions(stream: RecordStream, end_of_text: str) -> list[Question]:
    """Every question of every record of ``stream`` (``lmtrain eval --answers --data FILE``)."""
    return [q for questions in stream.questions(end_of_text) for q in questions]


def text_questions(text: str, answer_prefix: str) -> list[Question]:
    """The questions of plain text: each line holding ``answer_prefix`` is one, split after
    the prefix's first occurrence (``QUESTION: ... ANSWER: ...`` lines)."""
    out = []
    for line in text.splitlines():
        at = line.find(answer_prefix)
        if at >= 0 and line[at + len(answer_prefix):].strip():
            cut = at + len(answer_prefix)
            out.append(Question(line[:cut].strip(), line[cut:].strip()))
    return out


@dataclass
class HeldOutSource:
    """The held-out questions of a run's records, read from the source when first asked for
    (a run that never scores answers never reads them)."""

    #: () -> (the training records, a dataset's validation records or ``None``)
    open_streams: Callable[[], tuple[RecordStream, RecordStream | None]]
    train_split: float
    _read: dict[str, HeldOut] = field(default_factory=dict)

    def is_read(self, end_of_text: str) -> bool:
        """Whether :meth:`get` has read them already."""
        return end_of_text in self._read

    def get(self, end_of_text: str) -> HeldOut:
        """The held-out questions (answers ended by ``end_of_text`` in later turns' prompts)."""
        if end_of_text not in self._read:
            train, val = self.open_streams()
            self._read[end_of_text] = held_out_questions(train, val, self.train_split,
                                                         end_of_text)
        return self._read[end_of_text]
