"""Direct value tests: the learning-rate schedule, and the from-scratch model's shapes and ties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmtrain.config import TrainingConfig
from lmtrain.models import build_model, count_parameters
from lmtrain.train.optim import lr_multiplier

pytestmark = pytest.mark.unit


def schedule(**values) -> list[float]:
    cfg = TrainingConfig.from_flat(**{"warmup_steps": 4, "lr_decay_steps": 14, "min_lr_ratio": 0.1,
                            **values})
    return [lr_multiplier(step, cfg.optimization) for step in range(20)]


def test_warmup_ramps_linearly_to_the_peak():
    lrs = schedule()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)  # the first step after warmup runs at the peak


def test_cosine_falls_from_peak_to_floor_through_its_midpoint():
    lrs = schedule()
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through steps 4..14
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a > b for a, b in itertools.pairwise(lrs[4:15]))
    assert lrs[13] > 0.1


def test_the_floor_holds_after_the_horizon():
    assert schedule()[14:] == [0.1] * 6
    assert schedule(min_lr_ratio=0.0)[14:] == [0.0] * 6


def test_no_warmup_starts_at_the_peak_and_none_is_constant():
    assert schedule(warmup_steps=0)[0] == pytest.approx(1.0)
    assert schedule(lr_scheduler="none") == [1.0] * 20


def tiny_model(**values) -> torch.nn.Module:
    cfg = TrainingConfig.from_flat(**{"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8,
                            "dropout": 0.0, **values})
    torch.manual_seed(0)
    return build_model(cfg.model, vocab_size=11)


def test_gpt2_arch_parameter_count_matches_its_shapes():
    c, v, t, layers = 16, 11, 8, 2
    block = (2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (2 * c) + (c * 4 * c + 4 * c) \
        + (4 * c * c + c)
    expected = v * c + t * c + layers * block + 2 * c  # the head shares the embedding
    assert count_parameters(tiny_model(arch="gpt2")) == (expected, expected)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama_arch_parameter_count_matches_its_shapes(qk_norm):
    """No biases, no position table, RMSNorm weights only, SwiGLU, an untied head; QK-norm adds
    one RMSNorm weight per head dimension for queries and one for keys in each block."""
    c, v, layers, head_dim = 16, 11, 2, 8
    hidden = 64  # 8/3 * 16 = 42.7, rounded up to a multiple of 32
    block = c + (c * 3 * c) + (c * c) + c + (c * 2 * hidden) + (hidden * c)
    block += 2 * head_dim if qk_norm else 0
    expected = v * c + layers * block + c + c * v
    model = tiny_model(arch="llama", qk_norm=qk_norm)
    assert count_parameters(model) == (expected, expected)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())


def test_the_head_is_the_embedding_and_learns_as_one_tensor():
    model = tiny_model(arch="gpt2")
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    assert head is wte and head.shape == (11, 16)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 11)
    logits[0, -1, 5].backward()
    assert wte.grad is not None and wte.grad[5].abs().sum() > 0  # through the head


def test_bigram_model_is_one_table():
    model = tiny_model(n_layer=0)
    assert count_parameters(model) == (11 * 11, 11 * 11)
    assert model(torch.tensor([[4, 7]])).shape == (1, 2, 11)
