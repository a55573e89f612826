"""The chunked output-layer loss equals cross-entropy of the full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.train.lm_loss import (
    _cast_weight,
    _softmax_grad_,
    chunked_lm_loss,
    linear_cross_entropy,
)


def _reference(h, w, y):
    logits = F.linear(h, w).float()
    total = F.cross_entropy(logits, y, reduction="sum")
    return total / (y != -100).sum().clamp(min=1)


@pytest.mark.unit
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_values_and_gradients_match_the_full_logits(bf16, train_head) -> None:
    torch.manual_seed(0)
    h = torch.randn(150, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.3).requires_grad_(train_head)
    y = torch.randint(300, (150,))
    y[::7] = -100
    results = []
    for fn in (_reference, lambda *a: linear_cross_entropy(*a, chunk=64)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn(h, w, y)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
        h.grad = w.grad = None
    (ref, ref_gh, ref_gw), (out, gh, gw) = results
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-7)
    if train_head:
        torch.testing.assert_close(gw, ref_gw, rtol=2e-2 if bf16 else 1e-5, atol=1e-4)
    else:
        assert gw is None


@pytest.mark.unit
def test_no_targets_gives_zero_and_no_gradient() -> None:
    h = torch.randn(8, 4, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(10, 4), torch.full((8,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0


@pytest.mark.unit
def test_without_grad_mode_only_the_loss_is_computed() -> None:
    h, w, y = torch.randn(8, 4), torch.randn(10, 4, requires_grad=True), torch.randint(10, (8,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, w, y).detach())


@pytest.mark.unit
def test_a_frozen_weight_is_cast_once_and_again_after_it_changes() -> None:
    w = torch.randn(10, 4)
    first = _cast_weight(w, torch.bfloat16)
    assert _cast_weight(w, torch.bfloat16) is first
    w.mul_(2)  # an in-place change (load_state_dict, merging) invalidates the copy
    again = _cast_weight(w, torch.bfloat16)
    assert again is not first and torch.equal(again, w.to(torch.bfloat16))
    trained = torch.randn(10, 4, requires_grad=True)
    assert _cast_weight(trained, torch.bfloat16) is not _cast_weight(trained, torch.bfloat16)


@pytest.mark.integration
@pytest.mark.parametrize("lora", [False, True])
def test_gpt2_loss_and_gradients_equal_the_logits_path(tiny_gpt2_dir, lora) -> None:
    from lmtrain.config import TrainingConfig
    from lmtrain.models import build_model, model_logits

    cfg = TrainingConfig.from_flat(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                                   block_size=16,
                         tokenization_method="gpt2", use_lora=lora, dropout=0.0,
                         lora_dropout=0.0)
    model = build_model(cfg.model, 50257)
    x, y = torch.randint(50257, (2, 16)), torch.randint(50257, (2, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    fast = chunked_lm_loss(model, x, y)
    fast_grads = torch.autograd.grad(fast, params)
    logits = model_logits(model, x)
    slow = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    slow_grads = torch.autograd.grad(slow, params)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_other_models_keep_the_logits_path() -> None:
    from lmtrain.models.gpt import GPTConfig, build_from_scratch

    model = build_from_scratch(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1,
                                         n_embd=8))
    assert chunked_lm_loss(model, torch.zeros(1, 8, dtype=torch.long),
                           torch.zeros(1, 8, dtype=torch.long)) is None


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_softmax_gradient_in_row_blocks_equals_softmax_minus_one_hot(dtype, rows) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(21, 37) * 4).to(dtype)
    targets = torch.randint(37, (21,))
    logp = torch.log_softmax(logits.float(), dim=-1)
    expected = (logp.exp() - F.one_hot(targets, 37)).to(dtype)
    out = logits.clone()
    picked = _softmax_grad_(out, targets, True, rows)
    assert picked.dtype == torch.float32
    torch.testing.assert_close(picked, logp[torch.arange(21), targets], rtol=0, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    untouched = logits.clone()
    _softmax_grad_(untouched, targets, False, rows)
    assert torch.equal(untouched, logits)


@pytest.mark.integration
def test_the_from_scratch_loss_never_imports_transformers():
    """The per-step check for a Hugging Face output layer costs a from-scratch run nothing."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from lmtrain.config import TrainingConfig\n"
            "from lmtrain.models import build_model\n"
            "from lmtrain.train.lm_loss import compute_loss\n"
            "cfg = TrainingConfig.from_flat(n_layer=1, n_head=2, n_embd=16, block_size=8)\n"
            "model = build_model(cfg.model, 11)\n"
            "x = torch.zeros(2, 8, dtype=torch.long)\n"
            "compute_loss(model, x, x).backward()\n"
            "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"
