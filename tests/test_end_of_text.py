"""End of text end to end: GPT-2's and the learned BPE's end-of-text token in the text, between
documents, in ``lmtrain tokenize`` and in exported tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.config import DEFAULT_CORPUS, TrainingConfig
from lmtrain.data.prepare import prepare_tokens
from lmtrain.data.tokenizers import (
    EOT_TEXT,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    document_separator,
    tokenizer_from_state,
)

#: Strings where tokenizers part ways: special tokens, emoji, whitespace runs, code.
HARD_STRINGS = [
    "<|endoftext|>",
    "a <|endoftext|> b",
    "end.<|endoftext|><|endoftext|>\n\nNext",
    "<|endoftext",  # not the special token
    "<|startoftext|> is no GPT-2 token",
    "emoji 🤖👍🏽 👨‍👩‍👧 日本語 naïve",
    "   lots   of\t\t spaces \n\n\n  trailing  ",
    "def f(x):\n    return {'k': x ** 2}  # comment\n\tif x != 0: pass\r\n",
    " ANSWER: 42<|endoftext|>QUESTION: ",
]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """``GPT2TokenizerFast`` built from the genuine GPT-2 files the package ships."""
    from transformers import GPT2TokenizerFast

    from lmtrain.data.tokenizers import gpt2_file

    folder = tmp_path_factory.mktemp("gpt2-files")
    (folder / "vocab.json").write_bytes(gpt2_file("encoder.json"))
    (folder / "merges.txt").write_bytes(gpt2_file("vocab.bpe"))
    return GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.integration
@pytest.mark.parametrize("text", HARD_STRINGS)
def test_gpt2_agrees_with_gpt2_tokenizer_fast(hf_gpt2, text: str, capsys) -> None:
    tok = GPT2Tokenizer()
    expected = hf_gpt2(text)["input_ids"]
    assert tok.encode(text) == expected
    assert tok.encode_arrays([text])[0].tolist() == expected
    assert tok.decode(expected) == text
    assert main(["tokenize", "--method", "gpt2", text]) == 0
    assert json.loads(capsys.readouterr().out) == expected


@pytest.mark.unit
def test_tokenize_command_gives_one_id_for_end_of_text(capsys) -> None:
    assert main(["tokenize", "--method", "gpt2", "<|endoftext|>"]) == 0
    assert json.loads(capsys.readouterr().out) == [50256]


@pytest.mark.unit
def test_eot_ids() -> None:
    assert GPT2Tokenizer().eot_id == 50256
    assert CharTokenizer.train(["abc"]).eot_id is None
    learned = BPETokenizer.train(["hello world, hello there " * 20], 262)
    assert learned.eot_id == 0
    assert document_separator(learned) == document_separator(GPT2Tokenizer()) == EOT_TEXT
    assert document_separator(CharTokenizer.train(["abc"])) == "\n\n"


@pytest.mark.unit
def test_learned_bpe_reserves_end_of_text_and_learns_no_merge_across_it() -> None:
    text = Path(DEFAULT_CORPUS).read_text(encoding="utf-8")[:5000].replace("\n\n", EOT_TEXT)
    tok = BPETokenizer.train([text], 300)
    assert tok.vocab_size == 300
    assert tok.encode("x<|endoftext|>y") == [tok.encode("x")[0], 0, tok.encode("y")[0]]
    assert not [t for t in tok.tok.get_vocab() if "<|" in t and t != EOT_TEXT]
    again = tokenizer_from_state(json.dumps(tok.state()))
    assert again.eot_id == 0 and again.encode(text) == tok.encode(text)


@pytest.mark.unit
def test_an_older_learned_bpe_has_no_end_of_text() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["some text " * 30], trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    old = BPETokenizer(raw)
    assert old.eot_id is None and document_separator(old) == "\n\n"


def _tokens(tmp_path: Path, source: Path, method: str) -> tuple[object, list[int]]:
    cfg = TrainingConfig.from_flat(training_data_source=str(source), tokenization_method=method,
                         custom_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    tokenizer, array = prepare_tokens(cfg.data, progress=False)
    return tokenizer, array.load().tolist()


@pytest.mark.unit
def test_folder_documents_are_separated_by_end_of_text(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(["first doc\n", "second doc", "third"]):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    _, ids = _tokens(tmp_path, folder, "gpt2")
    gpt2 = GPT2Tokenizer()
    assert ids == [*gpt2.encode("first doc\n"), 50256, *gpt2.encode("second doc"), 50256,
                   *gpt2.encode("third")]
    _, chars = _tokens(tmp_path, folder, "character")  # no end of text: a blank line
    char = CharTokenizer.train(["first doc\nsecond doc\nthird"])
    assert chars == char.encode("first doc\n\n\nsecond doc\n\nthird")


@pytest.mark.unit
def test_jsonl_records_are_separated_by_end_of_text(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"text": f"QUESTION: what is {i} plus {i}? ANSWER: {2 * i}. " * 4} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    tok, ids = _tokens(tmp_path, path, "custom_bpe")
    assert tok.eot_id is not None
    arr = np.array(ids)
    assert (arr == tok.eot_id).sum() == len(rows) - 1
    docs = [tok.decode(part) for part in np.split(arr, np.flatnonzero(arr == tok.eot_id))]
    assert docs[0] == rows[0]["text"]
    assert [d.removeprefix(EOT_TEXT) for d in docs[1:]] == [r["text"] for r in rows[1:]]


@pytest.mark.integration
def test_exported_tokenizers_agree_id_for_id(train_run, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for method in ("gpt2", "custom_bpe"):
        summary = train_run(tokenization_method=method, custom_vocab_size=300, n_layer=1,
                            training_steps=1, checkpoint_interval=1, max_new_tokens=0,
                            run_name=method)
        out = tmp_path / f"hf-{method}"
        assert main(["export", str(summary.checkpoint_dir / "step_0000001.pt"), str(out)]) == 0
        hf = AutoTokenizer.from_pretrained(out)
        ckpt = str(summary.checkpoint_dir / "step_0000001.pt")
        from lmtrain.inference import load_trained_model

        ours = load_trained_model(ckpt).tokenizer
        assert hf.eos_token == EOT_TEXT and hf.eos_token_id == ours.eot_id
        for text in HARD_STRINGS:
            assert hf(text)["input_ids"] == ours.encode(text), (method, text)
