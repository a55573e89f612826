"""Data sources: files, folders, globs and .jsonl, streamed in blocks; strict UTF-8 with offsets;
chunking that never changes the GPT-2 ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtrain.data.sources import CorpusStream, iter_chunks, read_corpus, source_digest
from lmtrain.data.tokenizers import train_tokenizer
from lmtrain.errors import UserError

pytestmark = pytest.mark.unit

MIXED = "Plain ASCII, naïve café, Ελληνικά, 東京, emoji 😀🙂 and more.\n" * 3


def test_folder_reads_txt_and_md_sorted_and_recursively(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.md").write_text("first", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.csv").write_text("not text", encoding="utf-8")
    assert read_corpus(str(tmp_path)) == "first\n\nsecond\n\nthird"


def test_glob_source(tmp_path: Path) -> None:
    for name, text in (("x2.txt", "two"), ("x1.txt", "one"), ("y.txt", "nope")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert read_corpus(str(tmp_path / "x*.txt")) == "one\n\ntwo"
    with pytest.raises(UserError, match="matches no files"):
        read_corpus(str(tmp_path / "z*.txt"))


def test_jsonl_uses_text_field(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"body": "Q: 2+2?\nA: 4", "id": 1}, {"body": "¿Qué? 東京", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_corpus(str(path), text_field="body") == "Q: 2+2?\nA: 4\n\n¿Qué? 東京"
    with pytest.raises(UserError, match=r"qa.jsonl line 1 has no text field 'text'.*TEXT_FIELD"):
        read_corpus(str(path))


def test_jsonl_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2 is not JSON"):
        read_corpus(str(path))


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        read_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        read_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=r"holds no \.txt"):
        read_corpus(str(tmp_path / "dir"))


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_streaming_in_tiny_blocks_keeps_every_character(tmp_path: Path, block: int) -> None:
    path = tmp_path / "mixed.txt"
    path.write_text(MIXED, encoding="utf-8")
    stream = CorpusStream(str(path), block_bytes=block)
    assert "".join(stream) == MIXED
    assert stream.bytes_read == stream.total_bytes == len(MIXED.encode("utf-8"))


@pytest.mark.parametrize("block", [4, 1 << 20])
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3(", b"\xe6\x9d"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path, block: int, bad: bytes) -> None:
    good = MIXED.encode("utf-8")
    path = tmp_path / "broken.txt"
    path.write_bytes(good + bad + b"tail" * (0 if bad == b"\xe6\x9d" else 1))
    with pytest.raises(UserError, match=rf"broken.txt is not valid UTF-8 at byte offset "
                                        rf"{len(good)};"):
        "".join(CorpusStream(str(path), block_bytes=block))


def test_invalid_utf8_in_jsonl_counts_bytes_from_file_start(tmp_path: Path) -> None:
    first = json.dumps({"text": "é ok"}).encode() + b"\n"
    path = tmp_path / "rows.jsonl"
    path.write_bytes(first + b'{"text": "bad \xfe"}\n')
    with pytest.raises(UserError, match=rf"rows.jsonl is not valid UTF-8 at byte offset "
                                        rf"{len(first) + 14}"):
        read_corpus(str(path))


def test_chunks_cover_the_text_and_ignore_how_it_arrived(corpus_text: str) -> None:
    whole = list(iter_chunks([corpus_text], 1000))
    assert "".join(whole) == corpus_text
    assert all(0 < len(c) <= 1000 for c in whole)
    assert list(iter_chunks(iter(corpus_text), 1000)) == whole  # one character at a time
    pieces = [corpus_text[i:i + 777] for i in range(0, len(corpus_text), 777)]
    assert list(iter_chunks(pieces, 1000)) == whole


@pytest.mark.parametrize("method", ["gpt2", "custom_bpe"])
def test_chunked_encoding_equals_whole_text_encoding(corpus_text: str, method: str) -> None:
    tok = train_tokenizer(method, [corpus_text], 400)
    text = corpus_text + "\n\n  indented\n\n\nend \n" + MIXED
    ids = [i for a in tok.encode_arrays(list(iter_chunks([text], 300))) for i in a.tolist()]
    assert ids == tok.encode(text)


def test_text_without_newlines_is_still_chunked() -> None:
    text = "x" * 2500
    assert [len(c) for c in iter_chunks([text], 1000)] == [1000, 1000, 500]


def test_source_digest_follows_content_not_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same", encoding="utf-8")
    b.write_text("same", encoding="utf-8")
    assert source_digest([a], "text") == source_digest([b], "text")
    b.write_text("different", encoding="utf-8")
    assert source_digest([a], "text") != source_digest([b], "text")
    assert source_digest([a, b], "text") != source_digest([b, a], "text")
