"""Token arrays split into train/val, and random batches drawn from them by a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmtrain.errors import UserError


@dataclass
class TokenData:
    """The train and validation token arrays (in memory or memory-mapped)."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def split(cls, tokens: np.ndarray, train_split: float, block_size: int,
              source: str = "") -> TokenData:
        n = int(len(tokens) * train_split)
        data = cls(tokens[:n], tokens[n:])
        data.check(block_size, source)
        return data

    def check(self, block_size: int, source: str = "") -> None:
        """A clear error when either split is shorter than one block plus its target."""
        need = block_size + 1
        for name, arr in (("training", self.train), ("validation", self.val)):
            if len(arr) < need:
                raise UserError(
                    f"TRAINING_DATA_SOURCE={source!r}: the {name} split holds {len(arr)} tokens, "
                    f"fewer than one block (BLOCK_SIZE={block_size} + 1); give more text, lower "
                    f"BLOCK_SIZE or change TRAIN_SPLIT")

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``batch_size`` random windows (inputs, next-token targets) drawn with ``generator``."""
        arr = self.train if split == "train" else self.val
        starts = torch.randint(len(arr) - block_size, (batch_size,), generator=generator).numpy()
        # one gather of (batch, block + 1) ids: only those pages of a memory map are read
        windows = arr[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
        xy = torch.from_numpy(windows)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.contiguous().to(device), y.contiguous().to(device)
