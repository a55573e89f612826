"""Loss and perplexity over a whole token split: every token scored once, not a sample."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from lmtrain.train.evaluate import compute_loss


def perplexity(loss: float) -> float:
    """``exp(loss)`` (mean next-token cross-entropy in nats); ``inf`` past float range."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def split_loss(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
               device: torch.device,
               autocast: contextlib.AbstractContextManager | None = None) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, number of predicted tokens) over ``tokens``.

    The split is cut into consecutive, non-overlapping windows of ``block_size`` inputs (the
    last one shorter), so each of its ``len(tokens) - 1`` next-token targets counts once.
    """
    n_targets = len(tokens) - 1
    if n_targets < 1:
        return math.nan, 0
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = list(range(0, n_targets, block_size))
    full = [s for s in starts if s + block_size <= n_targets]
    try:
        for i in range(0, len(full), batch_size):
            batch = np.asarray(full[i:i + batch_size])
            windows = tokens[batch[:, None] + np.arange(block_size + 1)].astype(np.int64)
            total += _summed_loss(model, torch.from_numpy(windows).to(device), autocast)
        if starts and starts[-1] + block_size > n_targets:  # the shorter tail window
            tail = torch.from_numpy(tokens[starts[-1]:].astype(np.int64))[None].to(device)
            total += _summed_loss(model, tail, autocast)
    finally:
        model.train(was_training)
    return (total / n_targets).item(), n_targets


def _summed_loss(model: nn.Module, windows: torch.Tensor,
                 autocast: contextlib.AbstractContextManager | None) -> torch.Tensor:
    """Summed next-token loss of the windows: training's loss (GPT-2 without materialising the
    logits) times its targets, none of which is ignored here."""
    x, y = windows[:, :-1], windows[:, 1:]
    with autocast or contextlib.nullcontext():
        return compute_loss(model, x, y).double() * y.numel()
