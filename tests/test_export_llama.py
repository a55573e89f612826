"""ARCH=llama exports to Hugging Face Llama (Qwen3 with QK-norm) with the same logits."""

from __future__ import annotations

import pytest
import torch

from lmtrain.models.export_llama import llama_to_hf
from lmtrain.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("qk_norm", [False, True])
def test_hf_model_gives_the_same_logits(tmp_path, qk_norm):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=41, block_size=24, n_layer=2, n_head=2, n_embd=32,
                          arch="llama", qk_norm=qk_norm)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped mapping shows
        for name, p in model.named_parameters():
            if "ln_" in name or "norm" in name:
                p.uniform_(0.5, 1.5)
    llama_to_hf(model, eot_id=None).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    idx = torch.randint(0, 41, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and Hugging Face's own KV-cached greedy decoding agrees with ours
        out = hf.generate(idx[:1, :4], max_new_tokens=6, do_sample=False)
    ids = idx[:1, :4]
    for _ in range(6):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_lmtrain_export_of_a_llama_lora_run(train_run, tmp_path):
    """A trained ARCH=llama checkpoint (BPE, LoRA merged) round-trips through `lmtrain export`."""
    transformers = pytest.importorskip("transformers")
    from lmtrain.cli import main
    from lmtrain.inference import load_trained_model
    from lmtrain.models import model_logits

    summary = train_run(arch="llama", qk_norm=False, use_lora=True,
                        tokenization_method="custom_bpe", training_steps=3,
                        checkpoint_interval=3, learning_rate=1e-2)
    ckpt, out = summary.checkpoint_dir / "step_0000003.pt", tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    loaded = load_trained_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.tensor([loaded.tokenizer.encode("ROMEO: but soft")[:16]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model_logits(loaded.model, x),
                                   atol=1e-5, rtol=1e-4)
