"""Loss estimates over fixed evaluation batches that never touch the training RNG."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmtrain.data.dataset import TokenData
from lmtrain.train.lm_loss import compute_loss

EVAL_SEED_OFFSET = 10_007


@torch.no_grad()
def estimate_loss(
    model: nn.Module, data: TokenData, batch_size: int, block_size: int, eval_iters: int,
    device: torch.device, seed: int, autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean train and val loss over ``eval_iters`` batches drawn by a generator of its own.

    The same seed gives the same batches at every evaluation, so values are comparable across
    steps, and neither the sampler's generator nor the global RNG (dropout) moves.
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
            total = torch.zeros((), device=device)
            for _ in range(eval_iters):
                x, y = data.get_batch(split, batch_size, block_size, gen, device)
                with autocast or contextlib.nullcontext():
                    total += compute_loss(model, x, y)
            out[split] = (total / eval_iters).item()
    finally:
        model.train(was_training)
    return out
