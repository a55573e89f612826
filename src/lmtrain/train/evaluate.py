"""Loss estimates over fixed evaluation batches that never touch the training RNG."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.data.dataset import IGNORE_INDEX, TokenData
from lmtrain.models import model_logits
from lmtrain.train.lm_loss import chunked_lm_loss

EVAL_SEED_OFFSET = 10_007


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not ``IGNORE_INDEX`` (0 if there
    are none); GPT-2 in row chunks without materialising the logits
    (:mod:`lmtrain.train.lm_loss`)."""
    loss = chunked_lm_loss(model, x, y)
    if loss is not None:
        return loss
    logits = model_logits(model, x)
    targets = y.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


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
