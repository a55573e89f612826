"""``benchmarks/plain_loop.py``, the yardstick of ``bench_speed.py``'s whole-process part, does
lmtrain's work: the same model (weights from the same seed, outputs), batches and schedule."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from lmtrain.config import TrainingConfig
from lmtrain.data.dataset import TokenData
from lmtrain.models.gpt import GPT, GPTConfig
from lmtrain.train.optim import lr_multiplier
from tests.conftest import load_script

pytestmark = pytest.mark.unit


def plain_loop():
    return load_script("benchmarks/plain_loop.py")


def test_the_plain_loop_builds_lmtrains_gpt2_model():
    plain = plain_loop()
    shape = {"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 48}
    torch.manual_seed(7)
    ours = GPT(GPTConfig(**shape, arch="gpt2")).eval()
    torch.manual_seed(7)
    theirs = plain.GPT(*shape.values()).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    idx = torch.randint(65, (3, 32))
    assert torch.equal(ours(idx), theirs(idx))


def test_the_plain_loop_draws_lmtrains_batches_and_schedule():
    plain = plain_loop()
    tokens = np.arange(1000, dtype=np.uint16)
    ours = TokenData(tokens, tokens).get_batch("train", 4, 32, torch.Generator().manual_seed(3),
                                               torch.device("cpu"))
    theirs = plain.get_batch(tokens, 4, 32, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))

    config = TrainingConfig.from_flat(training_steps=40).optimization  # warmup 50 outlasts the run
    args = argparse.Namespace(lr=config.learning_rate, warmup_steps=config.warmup_steps,
                              steps=40, min_lr_ratio=config.min_lr_ratio)
    longer = TrainingConfig.from_flat(training_steps=90, warmup_steps=10).optimization
    args_longer = argparse.Namespace(lr=longer.learning_rate, warmup_steps=10, steps=90,
                                     min_lr_ratio=longer.min_lr_ratio)
    for step in range(100):
        assert plain.get_lr(step, args) == config.learning_rate * lr_multiplier(step, config)
        assert (plain.get_lr(step, args_longer)
                == longer.learning_rate * lr_multiplier(step, longer))
