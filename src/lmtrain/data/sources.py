"""Resolve ``TRAINING_DATA_SOURCE`` (file, folder, glob, .jsonl) into text documents."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from lmtrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


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
    raise UserError(
        f"TRAINING_DATA_SOURCE={source!r}: no such file or folder; give a text file, a folder "
        f"of .txt/.md files, a glob or a .jsonl file")


def decode_utf8(data: bytes, name: str | Path, offset: int = 0) -> str:
    """Strict UTF-8 decoding whose error names the file and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"TRAINING_DATA_SOURCE: {name} is not valid UTF-8 at byte offset "
            f"{offset + exc.start}; convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"TRAINING_DATA_SOURCE: {path} line {lineno} is not JSON ({exc.msg})"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(
                    f"TRAINING_DATA_SOURCE: {path} line {lineno} has no text field "
                    f"{text_field!r}; set TEXT_FIELD to the field that holds the text")
            yield record[text_field]


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in the source, in a stable order."""
    for path in resolve_files(source):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield decode_utf8(path.read_bytes(), path)


def read_corpus(source: str, text_field: str = "text") -> str:
    """The whole source as one string, documents joined by a blank line."""
    text = "\n\n".join(iter_documents(source, text_field))
    if not text.strip():
        raise UserError(f"TRAINING_DATA_SOURCE={source!r} is empty; give it some text")
    return text
