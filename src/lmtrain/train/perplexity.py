"""Loss and perplexity over a whole token split: every token scored once, not a sample."""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import torch
from torch import nn

from lmtrain.data.dataset import IGNORE_INDEX, windows
from lmtrain.train.lm_loss import compute_loss


def perplexity(loss: float) -> float:
    """``exp(loss)`` (mean next-token cross-entropy in nats); ``inf`` past float range."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def split_loss(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
               device: torch.device,
               autocast: contextlib.AbstractContextManager | None = None,
               mask: np.ndarray | None = None, progress: bool | None = False,
               ) -> tuple[float, int]:
    """(mean cross-entropy per scored token, number of scored tokens) over ``tokens``.

    The split is cut into consecutive, non-overlapping windows of ``block_size`` inputs (the
    last one shorter), so each of its ``len(tokens) - 1`` next-token targets counts once. With
    ``mask`` (``LOSS_ON=answers``: True at the answer tokens) only those targets are scored,
    as training scores them; the inputs stay whole. ``progress``: a bar on stderr, in tokens
    (``None``: when stderr is a terminal).
    """
    from tqdm import tqdm

    n_targets = len(tokens) - 1
    n_scored = int(mask[1:].sum()) if mask is not None else n_targets
    if n_targets < 1 or n_scored < 1:
        return math.nan, 0
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    full = np.arange(0, n_targets - block_size + 1, block_size)  # whole windows' first tokens
    tail = n_targets - n_targets % block_size  # a shorter last window starts here, if any
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=n_targets, unit="tok", unit_scale=True, desc="eval", disable=not progress)
    try:
        for i in range(0, len(full), batch_size):
            index = full[i:i + batch_size, None] + np.arange(block_size + 1)
            total += _summed_loss(model, _windows(tokens, mask, index, device), autocast)
            bar.update(len(index) * block_size)
        if tail < n_targets:
            index = np.arange(tail, len(tokens))[None]
            total += _summed_loss(model, _windows(tokens, mask, index, device), autocast)
            bar.update(n_targets - tail)
    finally:
        bar.close()
        model.train(was_training)
    return (total / n_scored).item(), n_scored


def _windows(tokens: np.ndarray, mask: np.ndarray | None, index: np.ndarray,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lmtrain.data.dataset.windows` on ``device``."""
    x, y = windows(tokens, mask, index)
    return x.to(device), y.to(device)


def _summed_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 autocast: contextlib.AbstractContextManager | None) -> torch.Tensor:
    """Summed next-token loss of the windows: training's loss (GPT-2 without materialising the
    logits, ignored targets skipped) times the targets it scored."""
    x, y = batch
    with autocast or contextlib.nullcontext():
        return compute_loss(model, x, y).double() * (y != IGNORE_INDEX).sum()
