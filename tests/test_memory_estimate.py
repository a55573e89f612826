"""One byte count for a model's weights: the estimate from the settings (``check_memory``) and
the FSDP check of the built model (``check_shards_fit``) agree."""

from __future__ import annotations

import pytest
import torch

from lmtrain import memory_estimate
from lmtrain.config import ModelSettings
from lmtrain.errors import UserError
from lmtrain.memory_estimate import check_memory, check_shards_fit, estimate
from lmtrain.models import build_model

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
VOCAB = 40  # the bigram model: exactly VOCAB x VOCAB weights, as the settings count them


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_settings_and_the_built_model_count_the_same_bytes(world: int) -> None:
    settings = ModelSettings(n_layer=0)
    model = build_model(settings, VOCAB)
    need = estimate(settings, VOCAB, shards=world)
    per_process = need.weights + need.training_state
    check_shards_fit(model, world, CPU, available=per_process)  # exactly enough
    with pytest.raises(UserError, match=f"PARALLEL=fsdp with {world} process"):
        check_shards_fit(model, world, CPU, available=per_process - 1)


def test_frozen_weights_are_counted_without_gradients_or_optimizer_state() -> None:
    model = torch.nn.Linear(100, 100)  # 10,100 weights
    model.weight.requires_grad_(False)  # a frozen base: 10,000 of them
    trained_only = torch.nn.Linear(100, 100)
    trained_need = sum(memory_estimate.parameter_bytes(10_100, 0, 2))
    frozen_need = sum(memory_estimate.parameter_bytes(100, 10_000, 2))
    assert frozen_need < trained_need
    check_shards_fit(model, 2, CPU, available=frozen_need)
    with pytest.raises(UserError, match=r"launch at least \d+ processes"):
        check_shards_fit(model, 2, CPU, available=frozen_need - 1)
    with pytest.raises(UserError):
        check_shards_fit(trained_only, 2, CPU, available=frozen_need)


def test_shards_split_the_state_but_every_process_builds_the_whole_model(monkeypatch) -> None:
    settings = ModelSettings(n_layer=0)
    vocab = 1000
    whole = estimate(settings, vocab, shards=1)
    many = estimate(settings, vocab, shards=64)
    assert many.weights + many.training_state < whole.weights + whole.training_state
    assert many.whole_model == whole.weights  # built in fp32 before it is sharded
    monkeypatch.setattr(memory_estimate, "device_memory", lambda *_: whole.weights)
    check_memory(settings, vocab, "cpu", shards=64)  # the whole model fits, and so do shards
    monkeypatch.setattr(memory_estimate, "device_memory", lambda *_: whole.weights - 1)
    with pytest.raises(UserError, match="built by every process before FSDP shards them"):
        check_memory(settings, vocab, "cpu", shards=64)
