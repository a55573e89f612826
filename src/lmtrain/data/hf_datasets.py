"""Hugging Face datasets as a data source: Parquet / Arrow files or folders, and
``hf:NAME[:CONFIG][@SPLIT]`` from the local ``datasets`` cache (``ALLOW_DOWNLOAD=1`` to fetch).

Rows are read a record batch at a time with ``pyarrow`` (memory-mapped Arrow, row-group-wise
Parquet), so memory stays flat however large the dataset; ``TEXT_FIELD`` names the text column.
A ``validation`` split, when the dataset has one, validates instead of the ``TRAIN_SPLIT`` cut.
Both need the ``datasets`` extra (``pip install 'lmtrain[datasets]'``, which brings pyarrow).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.data.sources import DOC_SEPARATOR, source_digest
from lmtrain.errors import UserError

HF_PREFIX = "hf:"
SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 1024  # rows decoded at a time
TRAIN_NAMES = ("train", "training")
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
OTHER_SPLIT_NAMES = ("test", "testing", "eval")  # never trained on


def is_dataset_source(source: str) -> bool:
    """True for ``hf:…``, a ``.parquet``/``.arrow`` file, or a folder holding such files."""
    if source.startswith(HF_PREFIX):
        return True
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix in SUFFIXES
    if path.is_dir():
        return any(p.suffix in SUFFIXES for p in path.rglob("*") if p.is_file())
    return False


@dataclass
class DatasetSplits:
    """The files of the training split and, when the dataset has one, the validation split."""

    train: list[Path]
    validation: list[Path] = field(default_factory=list)


def resolve_dataset(source: str, allow_download: bool = False) -> DatasetSplits:
    """The split files of a dataset source (see the module docstring)."""
    if source.startswith(HF_PREFIX):
        return _from_hub_cache(source, allow_download)
    path = Path(source).expanduser()
    if path.is_file():
        return DatasetSplits([path])
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        return _split_choice(source, _saved_dict(path), None)
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        return DatasetSplits(_saved_dataset(path))
    return _by_file_names(source, path)


def _saved_dataset(folder: Path) -> list[Path]:
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return [folder / f["filename"] for f in state.get("_data_files", [])]


def _saved_dict(folder: Path) -> dict[str, list[Path]]:
    splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    return {name: _saved_dataset(folder / name) for name in splits}


def _split_of(relative: Path) -> str | None:
    """``train`` / ``validation`` / ``other`` from a file's path words (HF's naming), or None."""
    words = [w for part in relative.parts for w in re.split(r"[-_.\s]+", part.lower()) if w]
    for names, split in ((VALIDATION_NAMES, "validation"), (TRAIN_NAMES, "train"),
                         (OTHER_SPLIT_NAMES, "other")):
        if any(w in names for w in words):
            return split
    return None


def _by_file_names(source: str, folder: Path) -> DatasetSplits:
    """A folder of data files: split by their names (``train-*``, ``validation/…``) when
    they say, else every file trains."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    splits: dict[str | None, list[Path]] = {}
    for path in files:
        splits.setdefault(_split_of(path.relative_to(folder)), []).append(path)
    train = splits.get("train", []) + splits.get(None, [])
    if not train:
        raise UserError(f"TRAINING_DATA_SOURCE={source!r}: the folder holds no training files "
                        f"(only {', '.join(sorted(k for k in splits if k))} splits)")
    return DatasetSplits(train, splits.get("validation", []))


def parse_hub_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split)."""
    spec = source[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name.strip():
        raise UserError(f"TRAINING_DATA_SOURCE={source!r}: give a dataset name, "
                        f"hf:NAME[:CONFIG][@SPLIT]")
    return name.strip(), config.strip() or None, split.strip() or None


@contextlib.contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """``datasets`` reads only its local cache while this is active (when ``enabled``)."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = enabled or saved
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _from_hub_cache(source: str, allow_download: bool) -> DatasetSplits:
    name, config, split = parse_hub_source(source)
    try:
        import datasets
    except ImportError:
        raise UserError(f"TRAINING_DATA_SOURCE={source!r} needs the datasets extra: "
                        f"pip install 'lmtrain[datasets]'") from None
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or None
    try:
        with _offline(not allow_download):
            loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        hint = ("set ALLOW_DOWNLOAD=1 to fetch it" if not allow_download
                else "check the name and the network")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"TRAINING_DATA_SOURCE={source!r}: not found in the local datasets cache "
                        f"({reason}); {hint}") from None
    if not isinstance(loaded, dict):  # a single Dataset
        loaded = {"train": loaded}
    files = {k: [Path(f["filename"]) for f in ds.cache_files] for k, ds in loaded.items()}
    return _split_choice(source, files, split)


def _split_choice(source: str, splits: dict[str, list[Path]], split: str | None) -> DatasetSplits:
    """``split`` (default ``train``) trains; ``validation``, when present and not the training
    split, validates."""
    split = split or "train"
    if split not in splits:
        raise UserError(f"TRAINING_DATA_SOURCE={source!r}: the dataset has no split {split!r}; "
                        f"it has {', '.join(sorted(splits))} (choose one with @SPLIT)")
    validation = splits.get("validation", []) if split != "validation" else []
    return DatasetSplits(splits[split], validation)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet/Arrow data sources need the datasets extra: "
                        "pip install 'lmtrain[datasets]'") from None
    return pa, pq


def _open_parquet(path: Path):
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"TRAINING_DATA_SOURCE: {path} is not a Parquet file ({exc})") from None


def _guarded(path: Path, rows: Iterator[Any]) -> Iterator[Any]:
    """``rows`` (batches or lists of a table file), where a damaged page, a truncated stream
    or text that is not UTF-8 found while reading is one line naming the file and the row."""
    pa, _ = _pyarrow()
    read = 0
    while True:
        try:
            batch = next(rows)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UserError(f"TRAINING_DATA_SOURCE: {path} is damaged after row {read} "
                            f"({detail}); rewrite the file, or leave it out") from None
        read += len(batch)
        yield batch


class ArrowStream:
    """The text column of Parquet / Arrow files, iterated document by document.

    The same interface as :class:`lmtrain.data.sources.CorpusStream` (``source``, ``files``,
    ``total_bytes``, ``bytes_read``, ``separator``), plus rows for progress.
    """

    def __init__(self, source: str, files: list[Path], text_field: str = "text") -> None:
        self.source = source
        self.files = files
        self.text_field = text_field
        self.separator = DOC_SEPARATOR
        self.bytes_read = 0
        self.rows_read = 0
        self._file_rows: dict[Path, int] = {}  # counted once: an Arrow stream is walked to count

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def total_rows(self) -> int:
        """Rows in all files (from Parquet metadata / Arrow batch headers)."""
        return sum(self._rows_of(p) for p in self.files)

    def digest(self) -> str:
        """sha256 of the files' contents, in order, and of ``TEXT_FIELD``."""
        inner = source_digest(self.files, self.text_field)
        return hashlib.sha256(f"{inner}\0text_field={self.text_field}".encode()).hexdigest()

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = self.rows_read = 0
        first = True
        for path in self.files:
            size, rows = path.stat().st_size, max(self._rows_of(path), 1)
            done_before, rows_before = self.bytes_read, self.rows_read
            for texts in self._batches(path):
                for text in texts:
                    if text is None:
                        continue
                    if not first:
                        yield self.separator
                    first = False
                    yield text
                self.rows_read += len(texts)
                self.bytes_read = done_before + size * (self.rows_read - rows_before) // rows
            self.bytes_read = done_before + size

    def _rows_of(self, path: Path) -> int:
        if path not in self._file_rows:
            self._file_rows[path] = self._count_rows(path)
        return self._file_rows[path]

    def _count_rows(self, path: Path) -> int:
        if path.suffix == ".parquet":
            return _open_parquet(path).metadata.num_rows
        return sum(len(batch) for batch in _guarded(path, self._arrow_batches(path)))

    def _batches(self, path: Path) -> Iterator[list[str | None]]:
        """The text column of ``path``, ``BATCH_ROWS`` rows at a time."""
        return _guarded(path, self._text_batches(path))

    def _text_batches(self, path: Path) -> Iterator[list[str | None]]:
        if path.suffix == ".parquet":
            reader = _open_parquet(path)
            self._check_column(path, reader.schema_arrow)
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=[self.text_field]):
                yield batch.column(0).to_pylist()
            return
        for batch in self._arrow_batches(path):
            self._check_column(path, batch.schema)
            column = batch.column(self.text_field)
            for i in range(0, len(column), BATCH_ROWS):
                yield column.slice(i, BATCH_ROWS).to_pylist()

    def _arrow_batches(self, path: Path) -> Iterator:
        return arrow_batches(path)

    def _check_column(self, path: Path, schema) -> None:
        pa, _ = _pyarrow()
        if self.text_field not in schema.names:
            raise UserError(
                f"TRAINING_DATA_SOURCE: {path} has no column {self.text_field!r} (it has "
                f"{', '.join(schema.names)}); set TEXT_FIELD to the column that holds the text")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind)):
            raise UserError(f"TRAINING_DATA_SOURCE: column {self.text_field!r} of {path} holds "
                            f"{kind}, not text; set TEXT_FIELD to a text column")


def arrow_batches(path: Path) -> Iterator:
    """Record batches of an Arrow IPC file or stream (``datasets`` writes streams),
    memory-mapped: a batch is read from disk only when used."""
    pa, _ = _pyarrow()
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches: Iterator = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                batches = iter(pa.ipc.open_stream(source))
            except pa.ArrowInvalid as exc:
                raise UserError(f"TRAINING_DATA_SOURCE: {path} is not an Arrow file "
                                f"({exc})") from None
        yield from batches


def table_columns(path: Path) -> list[str]:
    """The column names of a Parquet or Arrow file."""
    if path.suffix == ".parquet":
        return list(_open_parquet(path).schema_arrow.names)
    for batch in _guarded(path, arrow_batches(path)):
        return list(batch.schema.names)
    return []


def table_rows(path: Path, columns: list[str]) -> Iterator[list[dict[str, Any]]]:
    """The rows of a Parquet or Arrow file as dicts of ``columns``, ``BATCH_ROWS`` at a time."""
    return _guarded(path, _table_rows(path, columns))


def _table_rows(path: Path, columns: list[str]) -> Iterator[list[dict[str, Any]]]:
    if path.suffix == ".parquet":
        reader = _open_parquet(path)
        for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield batch.to_pylist()
        return
    for batch in arrow_batches(path):
        for i in range(0, len(batch), BATCH_ROWS):
            yield batch.slice(i, BATCH_ROWS).select(columns).to_pylist()
