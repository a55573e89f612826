"""Token arrays split into train/val, and random batches drawn from them by a seeded generator.

With ``LOSS_ON=answers`` each split also carries a mask of the answer tokens: for question/answer
records the one their structure gives (:mod:`lmtrain.data.qa_format`), for plain text those after
``ANSWER_PREFIX``, up to and including the next end of text. The targets outside it are
``IGNORE_INDEX``, which the cross-entropy skips, so the loss needs no change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmtrain.errors import UserError

if TYPE_CHECKING:
    from lmtrain.data.qa_source import HeldOutSource
    from lmtrain.data.tokenizers import Tokenizer

#: Target id that the cross-entropy ignores (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
MASK_CHUNK = 1 << 22  # tokens per piece when computing an answer mask


def prefix_variants(tokenizer: Tokenizer, prefix: str) -> list[list[int]]:
    """The ids ``prefix`` has in running text: alone (after a newline or end of text) and after
    a space, which byte-level BPEs fold into the next token."""
    text = prefix.strip() or prefix
    variants = []
    for ids in (tokenizer.encode(text), tokenizer.encode(" " + text)):
        if ids and ids not in variants:
            variants.append(ids)
    return variants


def _starts(window: np.ndarray, variants: Sequence[Sequence[int]]) -> np.ndarray:
    """Positions in ``window`` just after an occurrence of any variant."""
    found = []
    for ids in variants:
        n = len(ids)
        if len(window) < n:
            continue
        hit = window[: len(window) - n + 1] == ids[0]
        for j in range(1, n):
            hit &= window[j: len(window) - n + 1 + j] == ids[j]
        found.append(np.flatnonzero(hit) + n)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def answer_mask(tokens: np.ndarray, variants: Sequence[Sequence[int]], eot_id: int,
                chunk: int = MASK_CHUNK) -> np.ndarray:
    """True for answer tokens: after a prefix variant, up to and including the next ``eot_id``.

    Works through ``tokens`` (a memory map is fine) ``chunk`` tokens at a time.
    """
    mask = np.zeros(len(tokens), dtype=bool)
    back = max(len(v) for v in variants)  # a prefix ending just before the chunk
    inside = False  # in an answer at the start of the chunk
    for lo in range(0, len(tokens), chunk):
        hi = min(lo + chunk, len(tokens))
        start = max(lo - back, 0)
        window = np.asarray(tokens[start:hi])
        starts = _starts(window, variants) + start
        starts = starts[(starts >= lo) & (starts < hi)] - lo
        part = window[lo - start:]
        last_start = np.full(hi - lo, -1, dtype=np.int64)
        last_start[starts] = starts
        last_eot = np.full(hi - lo, -1, dtype=np.int64)  # the last end of text *before* t
        eots = np.flatnonzero(part[:-1] == eot_id)
        last_eot[eots + 1] = eots
        last_start = np.maximum.accumulate(last_start)
        last_eot = np.maximum.accumulate(last_eot)
        seen = (last_start >= 0) | (last_eot >= 0)
        mask[lo:hi] = np.where(seen, last_start > last_eot, inside)
        inside = bool(mask[hi - 1]) and part[-1] != eot_id
    return mask


def windows(tokens: np.ndarray, mask: np.ndarray | None,
            index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (contiguous int64 CPU tensors) of the windows at ``index``
    (rows of ``block_size + 1`` positions); targets outside ``mask`` are ``IGNORE_INDEX``.

    One gather of the rows' ids: only those pages of a memory map are read.
    """
    rows = tokens[index].astype(np.int64)
    targets = rows[:, 1:]
    if mask is not None:
        targets = np.where(mask[index[:, 1:]], targets, IGNORE_INDEX)
    return (torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            torch.from_numpy(np.ascontiguousarray(targets)))


@dataclass
class TokenData:
    """The train and validation token arrays (in memory or memory-mapped)."""

    train: np.ndarray
    val: np.ndarray
    #: LOSS_ON=answers: True where a token counts as a target (see :func:`answer_mask`)
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None
    #: question/answer records: the questions of the validation records (else ``None``)
    held_out: HeldOutSource | None = None

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

    def mask_answers(self, tokenizer: Tokenizer, prefix: str) -> None:
        """Count only answer tokens as targets from now on (``LOSS_ON=answers``)."""
        eot = tokenizer.eot_id
        if eot is None:
            raise UserError(
                f"LOSS_ON=answers ends each answer at the end-of-text token, which the "
                f"{tokenizer.kind} tokenizer lacks; use TOKENIZATION_METHOD=gpt2 or custom_bpe "
                f"(or MODEL_TYPE=gpt2), or LOSS_ON=all")
        variants = prefix_variants(tokenizer, prefix)
        self.train_mask = answer_mask(self.train, variants, eot)
        self.val_mask = answer_mask(self.val, variants, eot)
        for name, mask in (("training", self.train_mask), ("validation", self.val_mask)):
            if not mask.any():
                raise UserError(
                    f"ANSWER_PREFIX={prefix!r} never occurs in the {name} split, so "
                    f"LOSS_ON=answers has nothing to {'learn' if name == 'training' else 'score'}"
                    f"; set ANSWER_PREFIX to the text that starts each answer, or change "
                    f"TRAIN_SPLIT")

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``batch_size`` random windows (inputs, next-token targets) drawn with ``generator``;
        targets outside the answer mask (if any) are ``IGNORE_INDEX``."""
        arr, mask = (self.train, self.train_mask) if split == "train" else (self.val,
                                                                            self.val_mask)
        starts = torch.randint(len(arr) - block_size, (batch_size,), generator=generator).numpy()
        x, y = windows(arr, mask, starts[:, None] + np.arange(block_size + 1))
        if device.type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.to(device), y.to(device)
