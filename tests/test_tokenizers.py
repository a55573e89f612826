"""The three tokenizers: pinned GPT-2 ids (offline), exact learned BPE, character vocabulary,
and the ``lmtrain tokenize`` command."""

from __future__ import annotations

import functools
import json
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtrain.cli import main
from lmtrain.config import DEFAULT_CORPUS
from lmtrain.data import tokenizers
from lmtrain.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2FilesTokenizer,
    GPT2Tokenizer,
    tokenizer_from_state,
    train_tokenizer,
)
from lmtrain.errors import UserError


@functools.cache
def shakespeare(n: int = 60_000) -> str:
    with open(DEFAULT_CORPUS, encoding="utf-8") as fh:
        return fh.read(n)


@functools.cache
def learned_bpe() -> BPETokenizer:
    return BPETokenizer.train([shakespeare()], 400)


# GPT-2 ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_gpt2_ids_are_the_genuine_ones() -> None:
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    eot = tok.enc.encode("<|endoftext|>", allowed_special="all")
    assert eot == [tokenizers.GPT2_EOT] == [50256]
    assert tok.vocab_size == tok.enc.n_vocab == 50257
    assert tok.decode([15496, 995]) == "Hello world"
    # end-of-text in the data is GPT-2's end-of-text token, as in GPT2TokenizerFast
    assert tok.encode("a <|endoftext|> b") == [64, 220, 50256, 275]
    assert tok.eot_id == 50256


@pytest.mark.unit
def test_gpt2_is_built_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the GPT-2 tokenizer tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    tokenizers.gpt2_encoding.cache_clear()
    try:
        assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    finally:
        tokenizers.gpt2_encoding.cache_clear()


@pytest.mark.unit
def test_gpt2_files_are_hash_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tokenizers.GPT2_FILE_SHA256, "vocab.bpe", "0" * 64)
    tokenizers.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match=r"vocab\.bpe has sha256 .* reinstall"):
            GPT2Tokenizer().encode("x")
    finally:
        tokenizers.gpt2_encoding.cache_clear()


@pytest.mark.unit
def test_gpt2_batch_arrays_match_single_encoding() -> None:
    tok = GPT2Tokenizer()
    texts = ["Hello world", "", "naïve café 東京 😀", shakespeare()[:2000]]
    arrays = tok.encode_arrays(texts)
    assert [a.dtype for a in arrays] == [np.uint16] * 4
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]


@pytest.mark.integration
@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_gpt2_round_trips_any_text(text: str) -> None:
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text)) == text


# learned BPE ---------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("size", [260, 333, 1000])
def test_learned_bpe_has_exactly_the_asked_vocabulary(size: int) -> None:
    tok = train_tokenizer("custom_bpe", [shakespeare(30_000)], size)
    assert tok.vocab_size == size == len(tok.tok.get_vocab())
    assert max(tok.encode(shakespeare(30_000))) < size


@pytest.mark.unit
def test_learned_bpe_stops_when_the_text_is_too_small() -> None:
    with pytest.raises(UserError, match=r"CUSTOM_VOCAB_SIZE=5000: the corpus only supports \d+"):
        BPETokenizer.train(["tiny text, tiny text"], 5000)


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_learned_bpe_round_trips_any_unicode(text: str) -> None:
    tok = learned_bpe()
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.unit
def test_learned_bpe_travels_as_json_and_encodes_identically() -> None:
    tok = learned_bpe()
    again = tokenizer_from_state(json.dumps(tok.state()))
    assert isinstance(again, BPETokenizer)
    assert again.state() == tok.state()
    sample = shakespeare()[-3000:] + " ünïcödé 日本語 🙂"
    assert again.encode(sample) == tok.encode(sample)
    assert [a.tolist() for a in again.encode_arrays([sample])] == [tok.encode(sample)]


@pytest.mark.unit
def test_learned_bpe_compresses_its_training_text() -> None:
    tok = learned_bpe()
    text = shakespeare(20_000)
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


# characters ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_character_vocabulary_is_sorted_and_covers_any_plane() -> None:
    tok = CharTokenizer.train(["ba😀", "c\n"])
    assert tok.chars == ["\n", "a", "b", "c", "😀"]
    assert tok.encode("cab😀\n") == [3, 1, 2, 4, 0]
    assert tok.decode([4, 0]) == "😀\n"
    assert tokenizer_from_state(json.dumps(tok.state())).chars == tok.chars


@pytest.mark.unit
def test_character_unknowns_are_listed_or_dropped() -> None:
    state = CharTokenizer.train(["abc "]).state()
    strict = tokenizer_from_state(state)
    with pytest.raises(UserError, match=r"2 characters outside .*'Ø', '€'.*DROP_UNKNOWN_CHARS=1"):
        strict.encode("a€b Ø€")
    lenient = tokenizer_from_state(state, drop_unknown=True)
    assert lenient.decode(lenient.encode("a€b Ø€")) == "ab "


# start of generation -------------------------------------------------------------------------

@pytest.mark.unit
def test_start_context_ids_are_inside_the_vocabulary() -> None:
    from lmtrain.generate import start_context

    assert start_context(GPT2Tokenizer(), "") == [tokenizers.GPT2_EOT]
    own = GPT2FilesTokenizer(learned_bpe().tok)  # a model folder's own 400-token BPE
    assert start_context(own, "") == [0]
    char = CharTokenizer.train(["abc"])
    assert start_context(char, "cab") == [2, 0, 1]
    with pytest.raises(UserError, match=r"^PROMPT='a€' holds characters .*'€'"):
        start_context(char, "a€")


# lmtrain tokenize ----------------------------------------------------------------------------

@pytest.mark.unit
def test_tokenize_command_prints_gpt2_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--method", "gpt2", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [15496, 995]
    assert main(["tokenize", "--method", "gpt2", "--decode", "[15496, 995]"]) == 0
    assert capsys.readouterr().out == "Hello world\n"


@pytest.mark.unit
def test_tokenize_command_rejects_bad_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--decode", "[1, 99999]"]) == 2
    assert "99999" in capsys.readouterr().err
    assert main(["tokenize", "--decode", "hello"]) == 2
    assert "JSON list" in capsys.readouterr().err


@pytest.mark.unit
def test_tokenize_command_learns_from_data(tmp_path, capsys) -> None:
    data = tmp_path / "d.txt"
    data.write_text("hello there\n", encoding="utf-8")
    args = ["tokenize", "--method", "character", "--data", str(data),
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "the"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == [sorted(set("hello there\n")).index(c) for c in "the"]
