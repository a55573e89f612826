"""A LoRA run's frozen base stored in bf16 trains exactly as autocast's per-step casts did."""

from __future__ import annotations

import pytest
import torch

from lmtrain.train.frozen import store_frozen_base_in


def _lora_gpt2(tiny_gpt2_dir):
    from lmtrain.config import TrainingConfig
    from lmtrain.models import build_model

    cfg = TrainingConfig.from_flat(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                                   block_size=16,
                         tokenization_method="gpt2", use_lora=True, dropout=0.0,
                         lora_dropout=0.0)
    torch.manual_seed(0)
    return build_model(cfg.model, 50257)


def _loss_and_grads(model, x, y):
    from lmtrain.train.lm_loss import compute_loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.integration
def test_bf16_base_gives_bit_identical_loss_and_adapter_gradients(tiny_gpt2_dir) -> None:
    model = _lora_gpt2(tiny_gpt2_dir)
    for p in model.parameters():  # nonzero adapters, so every path carries signal
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    x, y = torch.randint(50257, (2, 16)), torch.randint(50257, (2, 16))
    before = _loss_and_grads(model, x, y)
    changed = store_frozen_base_in(model, torch.bfloat16)
    assert changed == 2 * 2 * 4  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj) x (w, b)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight.dtype == (
        torch.bfloat16)
    assert model.base_model.model.transformer.wte.weight.dtype == torch.float32
    after = _loss_and_grads(model, x, y)
    assert torch.equal(before[0], after[0])
    for a, b in zip(before[1], after[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.unit
def test_fp32_runs_and_plain_models_are_left_alone(tiny_gpt2_dir) -> None:
    from lmtrain.models.gpt import GPTConfig, build_from_scratch

    assert store_frozen_base_in(_lora_gpt2(tiny_gpt2_dir), None) == 0
    gpt = build_from_scratch(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1,
                                       n_embd=8))
    assert store_frozen_base_in(gpt, torch.bfloat16) == 0


@pytest.mark.integration
def test_a_bf16_base_still_samples(tiny_gpt2_dir) -> None:
    from lmtrain.generate import sample_tokens

    model = _lora_gpt2(tiny_gpt2_dir)
    store_frozen_base_in(model, torch.bfloat16)
    out = list(sample_tokens(model, [1, 2, 3], 5, 16, torch.device("cpu"), top_k=1))
    assert len(out) == 5


@pytest.mark.integration
def test_a_bf16_lora_session_trains_samples_and_resumes(train_run, tiny_gpt2_dir, qa_corpus):
    common = dict(model_type="gpt2", use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                  tokenization_method="gpt2", training_data_source=str(qa_corpus),
                  block_size=16, precision="bf16", max_new_tokens=5)
    first = train_run(training_steps=2, checkpoint_interval=2, **common)
    assert first.end_step == 2 and first.sample.startswith("QUESTION:")
    again = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000002.pt"),
                      resume_steps=1, **common)
    assert again.end_step == 3


@pytest.mark.integration
def test_a_from_scratch_bf16_run_never_imports_peft_or_transformers(tmp_path, corpus) -> None:
    """Looking for LoRA layers to cast costs a run without LoRA nothing (peft pulls in
    transformers: ~1.5 s of every bf16 start)."""
    import subprocess
    import sys

    from tests.conftest import child_env, tiny_env

    env = tiny_env(precision="bf16", training_data_source=str(corpus), training_steps=2,
                   checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "lg"))
    code = ("import sys\n"
            "from lmtrain.cli import env_entrypoint\n"
            "try:\n"
            "    env_entrypoint()\n"
            "finally:\n"
            "    print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(env), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bfloat16" in out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
