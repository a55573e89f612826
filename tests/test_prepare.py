"""The cached token array (``lmtrain prepare`` and the training path) and tokenizers that
travel with a run through resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.cli import main
from lmtrain.data import prepare
from lmtrain.data.prepare import prepare_tokens
from lmtrain.data.sources import read_corpus
from lmtrain.data.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer
from lmtrain.errors import UserError
from tests.conftest import data_config, token_data


def refuse(*args, **kwargs):
    raise AssertionError("called although the cache holds the result")


@pytest.mark.unit
def test_second_run_is_a_cache_hit(corpus, tmp_path, monkeypatch) -> None:
    cfg = data_config(corpus, tmp_path, tokenization_method="gpt2")
    tok, first = prepare_tokens(cfg.data)
    assert not first.cached
    monkeypatch.setattr(GPT2Tokenizer, "encode_arrays", refuse)
    _, second = prepare_tokens(cfg.data)
    assert second.cached and second.path == first.path
    tokens = second.load()
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode(read_corpus(str(corpus)))


@pytest.mark.unit
def test_sidecar_describes_the_array(corpus, tmp_path) -> None:
    cfg = data_config(corpus, tmp_path, tokenization_method="character")
    tok, arr = prepare_tokens(cfg.data)
    meta = json.loads(arr.path.with_suffix(".json").read_text())
    assert meta["n_tokens"] == len(read_corpus(str(corpus))) == arr.path.stat().st_size // 2
    assert meta["dtype"] == "<u2" and meta["tokenizer"] == "character"
    assert meta["source"] == str(corpus) and meta["vocab_size"] == tok.vocab_size
    assert len(meta["source_sha256"]) == len(meta["tokenizer_sha256"]) == 64
    assert not list(arr.path.parent.glob(".tmp-*"))  # nothing half-written is left behind


@pytest.mark.unit
def test_new_data_or_new_tokenizer_makes_a_new_entry(corpus, tmp_path) -> None:
    _, gpt2 = prepare_tokens(data_config(corpus, tmp_path, tokenization_method="gpt2").data)
    _, chars = prepare_tokens(data_config(corpus, tmp_path, tokenization_method="character").data)
    assert chars.path != gpt2.path
    corpus.write_text(corpus.read_text() + "\nmore text\n", encoding="utf-8")
    _, changed = prepare_tokens(data_config(corpus, tmp_path, tokenization_method="gpt2").data)
    assert not changed.cached and changed.path != gpt2.path
    assert changed.meta["n_tokens"] > gpt2.meta["n_tokens"]


@pytest.mark.unit
def test_damaged_entry_is_rebuilt(corpus, tmp_path) -> None:
    cfg = data_config(corpus, tmp_path, tokenization_method="gpt2")
    _, first = prepare_tokens(cfg.data)
    with first.path.open("r+b") as fh:
        fh.truncate(10)
    _, again = prepare_tokens(cfg.data)
    assert not again.cached and again.path == first.path
    assert again.load().tolist() == GPT2Tokenizer().encode(read_corpus(str(corpus)))


@pytest.mark.unit
@pytest.mark.parametrize("method", ["gpt2", "character", "custom_bpe"])
def test_empty_source_is_a_clear_error(tmp_path, method) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"TRAINING_DATA_SOURCE=.*empty\.txt' is empty"):
        prepare_tokens(data_config(path, tmp_path, tokenization_method=method).data)


@pytest.mark.unit
def test_large_vocabularies_use_uint32(tmp_path) -> None:
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000)
    path = tmp_path / "wide.txt"
    path.write_text(chars, encoding="utf-8")
    tok, arr = prepare_tokens(data_config(path, tmp_path, tokenization_method="character").data)
    assert tok.vocab_size == len(chars) > 65535
    assert arr.meta["dtype"] == "<u4"
    assert tok.decode(arr.load()[-3:].tolist()) == chars[-3:]


@pytest.mark.unit
def test_split_is_on_the_token_array(corpus, tmp_path) -> None:
    cfg = data_config(corpus, tmp_path, tokenization_method="gpt2", train_split=0.8)
    tok, data = token_data(cfg)
    n = len(tok.encode(read_corpus(str(corpus))))
    assert len(data.train) == int(n * 0.8) and len(data.train) + len(data.val) == n
    x, y = data.get_batch("train", 3, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.unit
def test_learned_bpe_sees_only_the_training_split(corpus, tmp_path, monkeypatch) -> None:
    seen: list[str] = []
    real = BPETokenizer.train.__func__

    def spy(cls, texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return real(cls, texts, vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy))
    cfg = data_config(corpus, tmp_path, tokenization_method="custom_bpe", custom_vocab_size=300,
                 train_split=0.75)
    tok, _ = prepare_tokens(cfg.data)
    text = read_corpus(str(corpus))
    assert "".join(seen) == text[:int(len(text) * 0.75)]
    assert tok.vocab_size == 300
    seen.clear()
    again, _ = prepare_tokens(cfg.data)  # the learned tokenizer is cached with the data
    assert seen == [] and again.state() == tok.state()


@pytest.mark.integration
def test_prepare_command_then_training_reuses_the_array(corpus, tmp_path, capsys, train_run):
    args = ["prepare", "--data", str(corpus), "--method", "character",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False and first["tokenizer"] == "character"
    assert first["n_tokens"] == len(read_corpus(str(corpus)))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) | {"seconds": 0} == first | {"cached": True,
                                                                            "seconds": 0}
    summary = train_run(training_steps=2)
    assert f"cache hit {first['path']}" in summary.log_file.read_text()


@pytest.mark.unit
def test_prepare_command_reports_bad_data(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\xff")
    assert main(["prepare", "--data", str(bad), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "bad.txt is not valid UTF-8 at byte offset 10" in capsys.readouterr().err


# tokenizers travel with the run ----------------------------------------------------------------

@pytest.mark.integration
def test_learned_bpe_is_reused_on_resume_never_retrained(train_run, tmp_path, monkeypatch,
                                                        capsys) -> None:
    common = dict(tokenization_method="custom_bpe", custom_vocab_size=300,
                  checkpoint_interval=100, lr_decay_steps=6)
    whole = train_run(training_steps=6, run_name="whole", **common)
    part = train_run(training_steps=4, run_name="part", **common)
    ckpt_path = part.checkpoint_dir / "step_0000004.pt"
    saved = torch.load(ckpt_path, weights_only=True)
    for entry in (tmp_path / "cache").iterdir():  # nothing cached to fall back on
        entry.unlink()
    monkeypatch.setattr(BPETokenizer, "train", classmethod(refuse))
    resumed = train_run(checkpoint_path=str(ckpt_path), resume_steps=2, **common)
    after = torch.load(resumed.checkpoint_dir / "step_0000006.pt", weights_only=True)
    assert after["tokenizer"] == saved["tokenizer"]
    assert json.loads(saved["tokenizer"])["kind"] == "custom_bpe" and saved["vocab_size"] == 300
    final = torch.load(whole.checkpoint_dir / "step_0000006.pt", weights_only=True)
    for key, tensor in final[fmt.MODEL_STATE_KEY].items():  # same tokens -> same weights
        assert torch.equal(tensor, after[fmt.MODEL_STATE_KEY][key]), key

    capsys.readouterr()  # the runs' log lines
    assert main(["tokenize", "--checkpoint", str(ckpt_path), "To be"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == BPETokenizer.from_json(json.loads(saved["tokenizer"])["json"]).encode("To be")


@pytest.mark.integration
def test_character_resume_on_new_data_lists_unseen_characters(train_run, corpus, tmp_path):
    first = train_run(training_steps=2, checkpoint_interval=100)
    ckpt = str(first.checkpoint_dir / "step_0000002.pt")
    vocab = json.loads(torch.load(ckpt, weights_only=True)["tokenizer"])["chars"]
    assert "€" not in vocab and "Ø" not in vocab
    new = tmp_path / "new.txt"
    text = corpus.read_text(encoding="utf-8")
    new.write_text(text[:20_000] + " Ø costs € " + text[20_000:], encoding="utf-8")
    with pytest.raises(UserError, match=r"2 characters outside .*'Ø', '€'.*DROP_UNKNOWN_CHARS=1"):
        train_run(checkpoint_path=ckpt, resume_steps=1, training_data_source=str(new))
    resumed = train_run(checkpoint_path=ckpt, resume_steps=1, training_data_source=str(new),
                        drop_unknown_chars=True)
    assert resumed.end_step == 3
    after = torch.load(resumed.checkpoint_dir / "step_0000003.pt", weights_only=True)
    assert json.loads(after["tokenizer"])["chars"] == vocab


@pytest.mark.unit
def test_character_check_lists_unknowns_from_the_whole_corpus(tmp_path, monkeypatch) -> None:
    path = tmp_path / "long.txt"
    path.write_text("a€" + "ab\n" * 10 + "Ø", encoding="utf-8")
    tok = CharTokenizer("ab\n")
    cfg = data_config(path, tmp_path, tokenization_method="character")
    with pytest.raises(UserError, match=r"2 characters .*'Ø', '€'"):
        prepare_tokens(cfg.data, tok)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 4)  # the two sit in different chunks
    with pytest.raises(UserError, match=r"2 characters .*'Ø', '€'"):
        prepare_tokens(cfg.data, tok)
