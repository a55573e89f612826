"""`lmtrain export`: Hugging Face folders whose model and tokenizer match the checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtrain.cli import main
from lmtrain.inference import load_trained_model
from lmtrain.models import model_logits

pytestmark = pytest.mark.integration

TEXT = "QUESTION: What is the capital of France? ANSWER: Paris.\n"


def assert_round_trip(ckpt: Path, out: Path) -> None:
    """The exported model's logits and tokens equal the in-process model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(ckpt), str(out)]) == 0
    loaded = load_trained_model(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = loaded.tokenizer.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == TEXT
    x = torch.tensor([ids[: loaded.config.model.block_size]])
    with torch.no_grad():
        ours, theirs = model_logits(loaded.model, x), hf_model(x).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    out_ids = hf_model.generate(x[:, :4], max_new_tokens=3, do_sample=False)
    assert out_ids.shape == (1, 7)
    assert hf_model.config.n_positions >= loaded.config.model.block_size


def test_export_gpt2_lora_merged(train_run, tmp_path, tiny_gpt2_dir, qa_corpus):
    summary = train_run(model_type="gpt2", use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                        training_data_source=str(qa_corpus), training_steps=3,
                        checkpoint_interval=3, learning_rate=1e-2)
    out = tmp_path / "hf"
    assert_round_trip(summary.checkpoint_dir / "step_0000003.pt", out)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(out / "model.safetensors"))


def test_export_from_scratch_gpt2_bpe(train_run, tmp_path):
    summary = train_run(tokenization_method="gpt2", n_layer=2, training_steps=2,
                        checkpoint_interval=2)
    assert_round_trip(summary.checkpoint_dir / "step_0000002.pt", tmp_path / "hf")


def test_export_from_scratch_custom_bpe_lora(train_run, tmp_path):
    summary = train_run(tokenization_method="custom_bpe", custom_vocab_size=300, use_lora=True,
                        training_steps=2, checkpoint_interval=2, learning_rate=1e-2)
    assert_round_trip(summary.checkpoint_dir / "step_0000002.pt", tmp_path / "hf")


def test_character_checkpoint_is_refused(train_run, tmp_path, capsys):
    summary = train_run(training_steps=1)
    out = tmp_path / "hf"
    assert main(["export", str(summary.checkpoint_dir / "step_0000001.pt"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TOKENIZATION_METHOD=character") and "\n" not in err
    assert not out.exists()


def test_bigram_checkpoint_is_refused(train_run, tmp_path, capsys):
    summary = train_run(tokenization_method="custom_bpe", custom_vocab_size=300, n_layer=0,
                        training_steps=1)
    assert main(["export", str(summary.checkpoint_dir / "step_0000001.pt"),
                 str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: N_LAYER=0")
    assert not (tmp_path / "hf").exists()


def gpt2_lora_checkpoint(train_run, base: Path, qa_corpus: Path) -> Path:
    summary = train_run(model_type="gpt2", use_lora=True, gpt2_model_name=str(base),
                        training_data_source=str(qa_corpus), training_steps=3,
                        checkpoint_interval=3, learning_rate=1e-2)
    return summary.checkpoint_dir / "step_0000003.pt"


def test_adapter_export_loads_in_peft_with_the_same_logits(train_run, tmp_path, tiny_gpt2_dir,
                                                           qa_corpus):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    ckpt = gpt2_lora_checkpoint(train_run, tiny_gpt2_dir, qa_corpus)
    out = tmp_path / "adapter"
    assert main(["export", str(ckpt), "--adapter", str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_gpt2_dir)
    loaded = load_trained_model(ckpt)
    x = torch.tensor([loaded.tokenizer.encode(TEXT)])
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        plain = base(x).logits
        peft_model = PeftModel.from_pretrained(base, out).eval()
        ours, theirs = model_logits(loaded.model, x), peft_model(x).logits
    assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_adapter_export_refuses_what_has_no_peft_adapter(train_run, tmp_path, tiny_gpt2_dir,
                                                         qa_corpus, capsys):
    full = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir), run_name="full",
                     training_data_source=str(qa_corpus), training_steps=1)
    scratch = train_run(use_lora=True, tokenization_method="gpt2", training_steps=1,
                        run_name="scratch")
    for summary, expected in ((full, "full fine-tune"), (scratch, "from-scratch GPT")):
        out = tmp_path / f"adapter-{summary.run_name}"
        assert main(["export", str(summary.checkpoint_dir / "step_0000001.pt"),
                     "--adapter", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --adapter:") and expected in err and "\n" not in err
        assert not out.exists()
    assert main(["export", str(full.checkpoint_dir / "step_0000001.pt")]) == 2
    assert "OUT_DIR" in capsys.readouterr().err
