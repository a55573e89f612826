"""Tokenize a data source once into a cached, memory-mapped token array.

The cache folder (``CACHE_DIR``, default ``<user cache dir>/lmtrain/tokens``) holds:

- ``<key>.bin``: the token ids, little-endian ``uint16`` (vocabulary <= 65,535) or ``uint32``;
- ``<key>.json``: its sidecar (``n_tokens``, ``dtype``, source, digests), written after the
  array, so a sidecar always describes a complete array;
- ``tokenizer-<key>.json``: a character vocabulary or BPE learned from a source, so that
  ``lmtrain prepare`` followed by ``lmtrain train`` learns it only once.

``<key>`` hashes the content of the source files and the tokenizer's state: change either and
the entry is new; a resumed run (same tokenizer, same data) maps exactly its fresh run's array.
Text streams through in chunks and is encoded a batch of chunks at a time, so memory stays
flat however large the corpus.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from lmtrain.config import DataSettings
from lmtrain.data.hf_datasets import ArrowStream, is_dataset_source, resolve_dataset
from lmtrain.data.qa_format import Question, encode_records
from lmtrain.data.qa_source import (
    HeldOutSource,
    RecordStream,
    all_questions,
    source_format,
    text_questions,
    training_records,
)
from lmtrain.data.sources import (
    DOC_SEPARATOR,
    CorpusStream,
    empty_source_error,
    iter_chunks,
    resolve_files,
    source_digest,
)
from lmtrain.data.tokenizers import (
    CharTokenizer,
    Tokenizer,
    distinct_chars,
    document_separator,
    token_dtype,
    tokenizer_from_state,
    train_tokenizer,
)
from lmtrain.durable import atomic_write, storage_error
from lmtrain.errors import UserError

if TYPE_CHECKING:
    from lmtrain.data.dataset import TokenData

log = logging.getLogger("lmtrain")
T = TypeVar("T")

CACHE_FORMAT = 2  # 2: documents separated by end of text, BPE reserves it
CHUNK_CHARS = 1 << 21  # characters per encoded piece (~2 MB of ASCII text)
BATCH_CHUNKS = 8  # pieces encoded together (tiktoken spreads them over threads)


@dataclass
class TokenArray:
    """A cached token array and its sidecar."""

    path: Path
    meta: dict[str, Any]
    cached: bool  # True when an earlier run had already written it

    def load(self) -> np.ndarray:
        """The tokens as a read-only memory map (nothing is read into memory up front)."""
        return np.memmap(self.path, dtype=np.dtype(self.meta["dtype"]), mode="r",
                         shape=(self.meta["n_tokens"],))

    @property
    def records(self) -> int | None:
        """How many question/answer records the array holds (``None``: plain text)."""
        return self.meta.get("records")

    def load_mask(self) -> np.ndarray:
        """Records: True at the answer tokens (and the end of text after each), memory-mapped."""
        return np.memmap(mask_path(self.path), dtype=np.bool_, mode="r",
                         shape=(self.meta["n_tokens"],))

    def load_record_ends(self) -> np.ndarray:
        """Records: where each record's tokens end (cumulative token counts)."""
        return np.fromfile(ends_path(self.path), dtype="<u8").astype(np.int64)


def mask_path(bin_path: Path) -> Path:
    """``<key>.mask``: one byte per token of a record array, 1 at the answer tokens."""
    return bin_path.with_suffix(".mask")


def ends_path(bin_path: Path) -> Path:
    """``<key>.ends``: little-endian uint64 token count after each record of a record array."""
    return bin_path.with_suffix(".ends")


def default_cache_dir() -> Path:
    """``<user cache dir>/lmtrain/tokens``."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmtrain")) / "tokens"


def cache_folder(config: DataSettings) -> Path:
    """``CACHE_DIR`` (or the default), created and checked for writing."""
    folder = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"CACHE_DIR={str(folder)!r}: cannot create it ({exc.strerror}); set "
                        f"CACHE_DIR to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"CACHE_DIR={str(folder)!r} is not writable; set CACHE_DIR to a "
                        f"writable folder")
    return folder


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 of what determines the tokenizer's output (its state, and dropping unknowns)."""
    return _digest({**tokenizer.state(), "drop_unknown": getattr(tokenizer, "drop_unknown", False)})


def _cache_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """:func:`atomic_write` into the cache; a full or read-only cache stops with one line (the
    source is untouched)."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise storage_error("CACHE_DIR", path, exc) from None


def _write_json(path: Path, obj: Any) -> None:
    _cache_write(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode()))


Stream = CorpusStream | ArrowStream | RecordStream


def open_streams(config: DataSettings, allow_download: bool = False
                 ) -> tuple[Stream, Stream | None]:
    """The training text of ``TRAINING_DATA_SOURCE`` and, for a dataset with a ``validation``
    split, that split's text (see :mod:`lmtrain.data.hf_datasets`). Question/answer records
    (``DATA_FORMAT``, see :mod:`lmtrain.data.qa_source`) come as :class:`RecordStream`."""
    source = config.training_data_source
    if is_dataset_source(source):
        splits = resolve_dataset(source, allow_download)
        fmt = source_format(config.data_format, splits.train)
        if fmt != "text":
            val_records = (RecordStream(source, splits.validation, fmt, config.qa_template)
                           if splits.validation else None)
            return RecordStream(source, splits.train, fmt, config.qa_template), val_records
        val = (ArrowStream(source, splits.validation, config.text_field)
               if splits.validation else None)
        return ArrowStream(source, splits.train, config.text_field), val
    fmt = source_format(config.data_format, resolve_files(source))
    if fmt != "text":
        return RecordStream(source, resolve_files(source), fmt, config.qa_template), None
    return CorpusStream(source, config.text_field), None


def open_record_streams(config: DataSettings, allow_download: bool = False
                        ) -> tuple[RecordStream, RecordStream | None]:
    """:func:`open_streams` of a source of question/answer records; plain text is an error
    (it holds no questions to score)."""
    train, val = open_streams(config, allow_download)
    if not isinstance(train, RecordStream):
        raise UserError(
            f"TRAINING_DATA_SOURCE={config.training_data_source!r} is plain text "
            f"(DATA_FORMAT={config.data_format}), not question/answer records, so it holds no "
            f"held-out questions; give qa, alpaca or chat records, or the questions as "
            f"--data FILE")
    return train, val if isinstance(val, RecordStream) else None


def source_questions(config: DataSettings, end_of_text: str, allow_download: bool = False
                     ) -> list[Question]:
    """Every question of a source (all its splits): a question per turn of its records, or
    for plain text per line holding ``ANSWER_PREFIX``; ``end_of_text`` ends an answer in a
    later turn's prompt."""
    out: list[Question] = []
    for stream in open_streams(config, allow_download):
        if isinstance(stream, RecordStream):
            out += all_questions(stream, end_of_text)
        elif stream is not None:
            out += text_questions("".join(stream), config.answer_prefix)
    return out


def loss_on_answers(config: DataSettings, records: bool) -> bool:
    """Whether the loss counts answer tokens only: ``LOSS_ON=answers``, or ``auto`` on
    question/answer ``records``."""
    return config.loss_on == "answers" or (config.loss_on == "auto" and records)


def stream_digest(stream: Stream) -> str:
    """sha256 of a stream's files and of what selects their text (for records: the format
    and the template)."""
    if isinstance(stream, ArrowStream | RecordStream):
        return stream.digest()
    return source_digest(stream.files, stream.text_field)


def splits_digest(train_sha: str, val_sha: str | None) -> str:
    """The digest of a source from its splits' digests: the training split's alone, or both
    when it has two."""
    return train_sha if val_sha is None else _digest([train_sha, val_sha])


class _Progress:
    """A tqdm bar over streams: rows for datasets, bytes for text; silent when disabled."""

    def __init__(self, streams: list[Stream], enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.streams = streams
        tables = [s for s in streams if isinstance(s, ArrowStream)]
        self.rows = len(tables) == len(streams)
        total = (sum(s.total_rows for s in tables) if self.rows and enabled
                 else sum(s.total_bytes for s in streams))
        self.bar = tqdm(total=total, unit="rows" if self.rows else "B",
                        unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)

    def _done(self, stream: Stream) -> int:
        return stream.rows_read if self.rows and isinstance(stream, ArrowStream) \
            else stream.bytes_read

    def refresh_from_streams(self) -> None:
        done = sum(self._done(s) for s in self.streams)
        self.bar.update(max(done - self.bar.n, 0))

    def track(self, texts: Iterable[str]) -> Iterator[str]:
        """``texts`` unchanged, moving the bar as the streams behind them are read."""
        for i, text in enumerate(texts):
            if i % 64 == 0:
                self.refresh_from_streams()
            yield text
        self.refresh_from_streams()


@contextlib.contextmanager
def progress_bar(streams: list[Stream], enabled: bool, desc: str) -> Iterator[_Progress]:
    """Progress of reading ``streams`` (done, rate, ETA) on stderr when ``enabled``."""
    progress = _Progress(streams, enabled, desc)
    try:
        yield progress
    finally:
        progress.bar.close()


def _head(chunks: Iterable[str], n_chars: int) -> Iterator[str]:
    """The first ``n_chars`` characters of a chunk stream."""
    for chunk in chunks:
        if n_chars <= 0:
            return
        yield chunk[:n_chars]
        n_chars -= len(chunk)


def fresh_tokenizer(config: DataSettings, stream: Stream, source_sha: str, cache: Path,
                    val_stream: Stream | None = None, progress: bool = False) -> Tokenizer:
    """The tokenizer a fresh run asks for: GPT-2's, or one learned from the source (cached).

    The character vocabulary covers the whole corpus (and a dataset's validation split); the
    BPE learns from the training split only (the first ``TRAIN_SPLIT`` of the text, or all of
    ``stream`` when the dataset has a validation split of its own).
    """
    method = config.tokenization_method
    if method == "gpt2":
        return train_tokenizer(method, [], config.custom_vocab_size)
    params: dict[str, Any] = {"format": CACHE_FORMAT, "method": method, "source": source_sha}
    if method == "custom_bpe":
        params |= {"vocab_size": config.custom_vocab_size, "train_split": config.train_split}
    path = cache / f"tokenizer-{_digest(params)[:32]}.json"
    if path.is_file():
        try:
            tokenizer = tokenizer_from_state(path.read_text(encoding="utf-8"))
        except Exception as exc:  # an unreadable cache entry is relearned, never fatal
            log.warning("tokenizer: ignoring unreadable cache entry %s (%s)", path, exc)
        else:
            log.info("tokenizer: reusing %s", path)
            return tokenizer
    streams = [stream, val_stream] if val_stream is not None and method == "character" else [stream]
    texts: Iterable[str] = itertools.chain.from_iterable(streams)
    if method == "custom_bpe" and val_stream is None:
        total = sum(len(piece) for piece in stream)
        texts = _head(iter_chunks(stream, CHUNK_CHARS), int(total * config.train_split))
    started = time.perf_counter()
    with progress_bar(streams, progress, f"learning {method} tokenizer") as bar:
        tokenizer = train_tokenizer(method, bar.track(texts), config.custom_vocab_size)
    log.info("tokenizer: learned %s (%d tokens) in %.1fs", method, tokenizer.vocab_size,
             time.perf_counter() - started)
    _write_json(path, tokenizer.state())
    return tokenizer


def tokenizer_for(config: DataSettings, allow_download: bool = False) -> Tokenizer:
    """The tokenizer a fresh run on ``config`` would use (without tokenizing the source)."""
    if config.tokenization_method == "gpt2":
        return train_tokenizer("gpt2", [], config.custom_vocab_size)
    stream, val_stream = open_streams(config, allow_download)
    sha = splits_digest(stream_digest(stream),
                        stream_digest(val_stream) if val_stream is not None else None)
    return fresh_tokenizer(config, stream, sha, cache_folder(config), val_stream)


def _read_meta(meta_path: Path, bin_path: Path) -> dict[str, Any] | None:
    """The sidecar of a complete cache entry, or None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["format"] != CACHE_FORMAT:
            return None
        sizes = {bin_path: meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize}
        if meta.get("records") is not None:  # question/answer records: their mask and ends
            sizes |= {mask_path(bin_path): meta["n_tokens"],
                      ends_path(bin_path): 8 * meta["records"]}
        return meta if all(p.stat().st_size == n for p, n in sizes.items()) else None
    except (OSError, ValueError, KeyError, TypeError):  # missing, partial or foreign: rebuild
        return None


def file_dtype(tokenizer: Tokenizer) -> np.dtype:
    """The little-endian dtype of the cached ids (uint16 or uint32, see ``token_dtype``)."""
    return np.dtype(token_dtype(tokenizer.vocab_size)).newbyteorder("<")


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_tokens(path: Path, tokenizer: Tokenizer, stream: Stream, progress: bool,
                  desc: str = "tokenizing") -> dict[str, int]:
    """Encode the stream batch by batch, appending to ``path`` (atomically replaced at the end)."""
    dtype = file_dtype(tokenizer)
    counts = {"n_tokens": 0, "n_chars": 0}

    def write(fh) -> None:
        with progress_bar([stream], progress, desc) as bar:
            for batch in _batched(iter_chunks(stream, CHUNK_CHARS), BATCH_CHUNKS):
                for ids in tokenizer.encode_arrays(batch):
                    fh.write(ids.astype(dtype, copy=False).tobytes())
                    counts["n_tokens"] += len(ids)
                counts["n_chars"] += sum(len(text) for text in batch)
                bar.refresh_from_streams()
        if counts["n_tokens"] == 0:
            raise empty_source_error(stream.source)

    _cache_write(path, write)
    return counts


#: Records encoded at a time.
BATCH_RECORDS = 1024


def _write_record_tokens(path: Path, tokenizer: Tokenizer, stream: RecordStream,
                         progress: bool, desc: str = "tokenizing") -> dict[str, int]:
    """Encode the records (:func:`lmtrain.data.qa_format.encode_records`) into ``path``, their
    answer mask into ``<key>.mask`` and where each record ends into ``<key>.ends``; each file
    is replaced whole, and the sidecar (written after) vouches for all three."""
    dtype = file_dtype(tokenizer)
    eot = tokenizer.eot_id
    end_ids = [eot] if eot is not None else tokenizer.encode(DOC_SEPARATOR)
    counts = {"n_tokens": 0, "n_chars": 0, "records": 0}
    ends: list[np.ndarray] = []

    def write(fh: IO[bytes], mask_fh: IO[bytes]) -> None:
        with progress_bar([stream], progress, desc) as bar:
            for batch in _batched(stream.records(), BATCH_RECORDS):
                ids, mask, lengths = encode_records(tokenizer, stream.template, batch, end_ids)
                fh.write(ids.astype(dtype).tobytes())
                mask_fh.write(mask.astype(np.uint8).tobytes())
                ends.append(counts["n_tokens"] + np.cumsum(lengths))
                counts["n_tokens"] += len(ids)
                counts["records"] += len(batch)
                counts["n_chars"] += sum(len(stream.template.render(t, "")) for t in batch)
                bar.refresh_from_streams()
        if counts["records"] == 0:
            raise empty_source_error(stream.source)

    _cache_write(mask_path(path), lambda mask_fh: _cache_write(path, lambda fh: write(fh, mask_fh)))
    all_ends = np.concatenate(ends).astype("<u8")
    _cache_write(ends_path(path), lambda fh: fh.write(all_ends.tobytes()))
    return counts


def prepare_tokens(config: DataSettings, tokenizer: Tokenizer | None = None,
                   progress: bool | None = None, *, allow_download: bool = False
                   ) -> tuple[Tokenizer, TokenArray]:
    """The tokenizer (given, cached or learned) and the cached token array of the source (of a
    dataset's training split)."""
    tokenizer, train, _ = prepare_splits(config, tokenizer, progress,
                                         allow_download=allow_download)
    return tokenizer, train


def prepare_splits(config: DataSettings, tokenizer: Tokenizer | None = None,
                   progress: bool | None = None, *, allow_download: bool = False,
                   ) -> tuple[Tokenizer, TokenArray, TokenArray | None]:
    """The tokenizer and the cached token arrays of the training split and, for a dataset with a
    validation split, of that split (else ``None``: the ``TRAIN_SPLIT`` cut applies).
    ``allow_download``: an ``hf:`` source not in the local cache may be downloaded."""
    stream, val_stream = open_streams(config, allow_download)
    if stream.total_bytes == 0:
        raise empty_source_error(stream.source)
    cache = cache_folder(config)
    show = sys.stderr.isatty() if progress is None else progress
    fresh = tokenizer is None
    train_sha = stream_digest(stream)  # each split's files are read for their digest once
    val_sha = stream_digest(val_stream) if val_stream is not None else None
    if tokenizer is None:
        tokenizer = fresh_tokenizer(config, stream, splits_digest(train_sha, val_sha), cache,
                                    val_stream, show)
    train = _cached_tokens(config, stream, train_sha, tokenizer, cache, not fresh, show,
                           "tokenizing")
    val = None
    if val_stream is not None and val_sha is not None:
        val = _cached_tokens(config, val_stream, val_sha, tokenizer, cache, not fresh, show,
                             "tokenizing validation")
    return tokenizer, train, val


def _cached_tokens(config: DataSettings, stream: Stream, source_sha: str, tokenizer: Tokenizer,
                   cache: Path, check_chars: bool, progress: bool, desc: str) -> TokenArray:
    """The token array of ``stream`` (whose digest is ``source_sha``) from the cache, or
    encoded into it now."""
    stream.separator = document_separator(tokenizer)
    tok_sha = tokenizer_digest(tokenizer)
    key = _digest({"format": CACHE_FORMAT, "source": source_sha, "tokenizer": tok_sha,
                   "chunk_chars": CHUNK_CHARS})[:32]
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    meta = _read_meta(meta_path, bin_path)
    if meta is not None:
        log.info("tokens: cache hit %s (%d tokens)", bin_path, meta["n_tokens"])
        return TokenArray(bin_path, meta, cached=True)
    if isinstance(tokenizer, CharTokenizer) and check_chars:
        # a resumed run on new data: name every unknown character at once, before encoding
        tokenizer.check_known(distinct_chars(stream))
    started = time.perf_counter()
    counts = (_write_record_tokens(bin_path, tokenizer, stream, progress, desc)
              if isinstance(stream, RecordStream)
              else _write_tokens(bin_path, tokenizer, stream, progress, desc))
    seconds = time.perf_counter() - started
    meta = {
        "format": CACHE_FORMAT, **counts,
        "dtype": file_dtype(tokenizer).str,
        "source": config.training_data_source, "files": [str(p) for p in stream.files],
        "source_bytes": stream.bytes_read, "source_sha256": source_sha,
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tok_sha, "seconds": round(seconds, 3),
    }
    _write_json(meta_path, meta)
    log.info("tokens: wrote %d tokens to %s in %.1fs (%.1f MB/s)", counts["n_tokens"], bin_path,
             seconds, stream.bytes_read / 1e6 / max(seconds, 1e-9))
    return TokenArray(bin_path, meta, cached=False)


def load_token_data(
    config: DataSettings, tokenizer: Tokenizer | None = None, *, block_size: int,
    allow_download: bool = False,
) -> tuple[Tokenizer, TokenData]:
    """Tokenize ``TRAINING_DATA_SOURCE`` through the cache; learn the tokenizer when none is given.

    A dataset's own ``validation`` split validates; otherwise the split is on the token array:
    the first ``TRAIN_SPLIT`` of the tokens train, the rest validate (question/answer records:
    of the records, see :mod:`lmtrain.data.qa_source`). Each split must hold more than
    ``block_size`` tokens. Records carry their answer mask (used when the loss is on answers)
    and their held-out questions (read when first asked for).
    """
    from lmtrain.data.dataset import TokenData  # imports torch

    tokenizer, train, val = prepare_splits(config, tokenizer, allow_download=allow_download)
    source = config.training_data_source
    answers = loss_on_answers(config, records=train.records is not None)
    if train.records is not None:
        data = _record_data(config, train, val, answers, block_size)
        data.held_out = HeldOutSource(
            functools.partial(open_record_streams, config, allow_download), config.train_split)
    elif val is None:
        data = TokenData.split(train.load(), config.train_split, block_size, source)
    else:
        data = TokenData(train.load(), val.load())
        data.check(block_size, source)
    if answers and train.records is None:
        data.mask_answers(tokenizer, config.answer_prefix)
    return tokenizer, data


def _record_data(config: DataSettings, train: TokenArray, val: TokenArray | None,
                 answers: bool, block_size: int) -> TokenData:
    """The splits of question/answer records: a dataset's own, else cut after the training
    records; with their answer masks when ``answers``."""
    from lmtrain.data.dataset import TokenData

    source = config.training_data_source
    if val is None:
        tokens, mask = train.load(), train.load_mask()
        ends = train.load_record_ends()
        n_train = training_records(len(ends), config.train_split)
        if not 0 < n_train < len(ends):
            raise UserError(
                f"TRAINING_DATA_SOURCE={source!r}: its {len(ends)} records cannot be split "
                f"into training and validation records by TRAIN_SPLIT={config.train_split} "
                f"(the first {n_train} train, the rest validate); give more records or change "
                f"TRAIN_SPLIT")
        cut = int(ends[n_train - 1])
        data = TokenData(tokens[:cut], tokens[cut:], mask[:cut] if answers else None,
                         mask[cut:] if answers else None)
    else:
        data = TokenData(train.load(), val.load(), train.load_mask() if answers else None,
                         val.load_mask() if answers else None)
    data.check(block_size, source)
    return data
