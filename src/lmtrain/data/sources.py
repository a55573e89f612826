"""Resolve ``TRAINING_DATA_SOURCE`` (file, folder, glob, .jsonl) and stream its text.

The corpus is the documents of the source (its files; the records of a .jsonl) joined by a
separator: the end-of-text token for tokenizers that have one (see
``lmtrain.data.tokenizers.document_separator``), else a blank line. It is read in blocks and
handed on in chunks, so no step ever holds the whole text; invalid UTF-8 stops with the file
name and the byte offset.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmtrain.errors import UserError
from lmtrain.paths import not_a_file
from lmtrain.unicode_text import surrogate_problem

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
#: What separates documents for a tokenizer without an end-of-text token: a blank line.
DOC_SEPARATOR = "\n\n"
BLOCK_BYTES = 1 << 22  # bytes read from a file at a time
#: What :func:`read_jsonl` gives for a blank line (skipped, but its bytes count).
BLANK_LINE: Any = object()


def resolve_files(source: str) -> list[Path]:
    """The files a source names, sorted; a clear error when there are none."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(
                f"TRAINING_DATA_SOURCE={source!r}: the folder holds no .txt, .md or .jsonl files")
        return files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"TRAINING_DATA_SOURCE={source!r}: the pattern matches no files")
        return files
    problem = not_a_file(path)
    what = "no such file or folder" if problem == "no such file" else problem
    raise UserError(
        f"TRAINING_DATA_SOURCE={source!r}: {what}; give a text file, a folder "
        f"of .txt/.md files, a glob or a .jsonl file")


def decode_utf8(data: bytes, name: str | Path, offset: int = 0) -> str:
    """Strict UTF-8 decoding whose error names the file and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"TRAINING_DATA_SOURCE: {name} is not valid UTF-8 at byte offset "
            f"{offset + exc.start}; convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of ``data`` without a trailing, possibly unfinished, multi-byte character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else \
                4 if byte >> 3 == 0b11110 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


def source_digest(files: list[Path], text_field: str) -> str:
    """sha256 over the files' contents in order (and ``TEXT_FIELD`` when a .jsonl is among them)."""
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
        h.update(path.suffix.encode())
    if any(p.suffix == ".jsonl" for p in files):
        h.update(b"text_field=" + text_field.encode())
    return h.hexdigest()


class CorpusStream:
    """The corpus text of a source, iterated in pieces; counts the raw bytes read so far."""

    def __init__(self, source: str, text_field: str = "text", block_bytes: int = BLOCK_BYTES):
        self.source = source
        self.text_field = text_field
        self.block_bytes = block_bytes
        self.separator = DOC_SEPARATOR  # between two documents
        self.files = resolve_files(source)
        self.bytes_read = 0

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        first = True
        for path in self.files:
            docs = self._jsonl(path) if path.suffix == ".jsonl" else [self._text_file(path)]
            for doc in docs:
                if not first:
                    yield self.separator
                first = False
                yield from doc

    def _text_file(self, path: Path) -> Iterator[str]:
        offset, pending = 0, b""
        with path.open("rb") as fh:
            while block := fh.read(self.block_bytes):
                self.bytes_read += len(block)
                data = pending + block
                cut = _complete_utf8_prefix(data)
                yield decode_utf8(data[:cut], path, offset)
                offset, pending = offset + cut, data[cut:]
        if pending:
            decode_utf8(pending, path, offset)  # a truncated last character: raises

    def _jsonl(self, path: Path) -> Iterator[list[str]]:
        for lineno, size, record in read_jsonl(path):
            self.bytes_read += size
            if record is BLANK_LINE:
                continue
            if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                raise UserError(
                    f"TRAINING_DATA_SOURCE: {path} line {lineno} has no text field "
                    f"{self.text_field!r}; set TEXT_FIELD to the field that holds the text")
            yield [record[self.text_field]]


def read_jsonl(path: Path) -> Iterator[tuple[int, int, Any]]:
    """``(line number, bytes, record)`` for each line of a .jsonl file; a blank line's record
    is :data:`BLANK_LINE`. A line that is not JSON (or not UTF-8) stops with the file and the
    line."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                yield lineno, len(raw), BLANK_LINE
                continue
            record = parse_json_line(line, f"TRAINING_DATA_SOURCE: {path} line {lineno}")
            yield lineno, len(raw), record


def parse_json_line(line: str, where: str) -> Any:
    """One JSON value, refused in one line starting with ``where`` when it is not JSON, nests
    deeper than :data:`MAX_JSON_DEPTH`, holds a number of over 4300 digits, or holds text that
    is not Unicode (an unpaired surrogate such as ``"\\ud800"``)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not JSON ({exc.msg})") from None
    except ValueError as exc:  # an integer of over 4300 digits
        raise UserError(f"{where}: a number is too long ({exc})") from None
    except RecursionError:
        raise UserError(f"{where} nests deeper than Python's JSON reader allows") from None
    problem = json_problem(record)
    if problem:
        raise UserError(f"{where}: {problem}")
    return record


#: How deep a JSON record may nest (a chat record needs 3: record, messages, turn).
MAX_JSON_DEPTH = 64


def json_problem(value: Any) -> str | None:
    """What makes a parsed JSON value unfit as a record, walked without recursion: nesting
    deeper than :data:`MAX_JSON_DEPTH`, or a string (key or value) that is not Unicode."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"it nests deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            problem = surrogate_problem(item)
            if problem is not None:
                where = f"field {path!r}" if path else "the record"
                return f"{where} {problem}, which is not text; fix the file's writer"
        elif isinstance(item, dict):
            for key, sub in item.items():
                name = f"{path}.{key}" if path else str(key)
                stack.append((key, f"{name} (its name)", depth + 1))
                stack.append((sub, name, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item))
    return None


def _cut_point(buf: str, target: int) -> int:
    """Where to end a chunk of at most ``target`` characters (``len(buf) > target``).

    Preferably just after a newline with non-space characters on both sides: GPT-2-style
    pre-tokenizers never join text across such a newline, so chunked encoding gives the very
    ids that encoding the whole text would. Failing that, after any newline; else ``target``.
    """
    lo = target // 2
    i = buf.rfind("\n", lo, target)
    first_newline = i
    while i > 0:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        i = buf.rfind("\n", lo, i)
    return first_newline + 1 if first_newline >= 0 else target


def iter_chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Regroup text pieces into chunks of at most ``chunk_chars`` characters.

    The cuts depend only on the text, never on how it arrived in pieces.
    """
    parts: list[str] = []
    size = 0
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size > chunk_chars:
            buf = "".join(parts)
            while len(buf) > chunk_chars:
                cut = _cut_point(buf, chunk_chars)
                yield buf[:cut]
                buf = buf[cut:]
            parts, size = [buf], len(buf)
    if size:
        yield "".join(parts)


def read_corpus(source: str, text_field: str = "text") -> str:
    """The whole source as one string (for small sources and tests)."""
    text = "".join(CorpusStream(source, text_field))
    if not text.strip():
        raise empty_source_error(source)
    return text


def empty_source_error(source: str) -> UserError:
    """The one error for a data source that holds no text."""
    return UserError(f"TRAINING_DATA_SOURCE={source!r} is empty; give it some text")
