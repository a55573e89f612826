"""Sequences decoding together: one left-padded batch, one KV cache, rows that join and leave
between steps.

Every row ends at the same cache slot, ``width``; row ``b`` starts after ``pad[b]`` empty slots,
its first real token sits at position 0 and no token attends to an empty slot, so each row is
computed as it would be alone (the from-scratch GPT through ``KVCache.left_pad``, GPT-2 through
``attention_mask`` and ``position_ids``). :mod:`lmtrain.answers` decodes its questions through
it, and the server's engine (:mod:`lmtrain.serve.engine`). Rows that join are
prefilled as a batch of their own and then put beside the running rows, the narrower cache
shifted right; when rows leave, the padding every remaining row shares is dropped, so ``width``
is always the longest row's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.generate import cache_argument
from lmtrain.models import hf_model


class PaddedBatch:
    """The rows decoding together and their KV cache (``kind``: ``gpt`` or ``hf``, see
    :func:`lmtrain.generate.model_kind`). No row may grow past ``window`` tokens."""

    def __init__(self, model: nn.Module, kind: str, window: int, device: torch.device) -> None:
        if kind not in ("gpt", "hf"):
            raise ValueError(f"a {kind!r} model has no KV cache to batch through")
        self.model, self.kind, self.window, self.device = model, kind, window, device
        self.pad = torch.zeros(0, dtype=torch.long, device=device)
        self.width = 0
        self.cache: Any = None
        hf = hf_model(model)
        self.arg = cache_argument(hf) if hf is not None else ""

    @property
    def rows(self) -> int:
        return int(self.pad.numel())

    def add(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill ``contexts`` as new rows after the present ones; their next-token logits."""
        joining = PaddedBatch(self.model, self.kind, self.window, self.device)
        logits = joining._prefill(contexts)
        self._take_in(joining)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``(rows,)``); the next-token logits ``(rows, vocab)``."""
        return self._forward(tokens[:, None].to(self.device))

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the padding they all share."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.pad, self.width, self.cache = self.pad[:0], 0, None
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.pad = self.pad[index]
        tensors = [t.index_select(self._batch_dim, index) for t in self._tensors()]
        shared = int(self.pad.min())
        if shared:
            tensors = [t.narrow(self._time_dim, shared, self.width - shared) for t in tensors]
            self.pad, self.width = self.pad - shared, self.width - shared
        self._set_tensors(tensors)  # one copy of the cache, not one per change

    def _prefill(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        lengths = [len(c) for c in contexts]
        self.width = max(lengths)
        self.pad = torch.tensor([self.width - n for n in lengths], device=self.device)
        ids = torch.zeros(len(contexts), self.width, dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, self.width - len(context):] = torch.tensor(list(context), dtype=torch.long)
        if self.kind == "gpt":
            self.cache = self.model.make_kv_cache(len(contexts), self.window)
        self.width = 0  # nothing is cached yet; _forward counts the prefill in
        return self._forward(ids.to(self.device))

    def _forward(self, new: torch.Tensor) -> torch.Tensor:
        n = new.shape[1]
        if self.kind == "gpt":
            self.cache.left_pad = self.pad  # always a tensor: one code path, alone or batched
            out = self.model(new, kv_cache=self.cache)
            logits = out[0] if isinstance(out, tuple) else out
        else:
            slots = torch.arange(self.width + n, device=self.device)
            attention = (slots[None] >= self.pad[:, None]).long()
            positions = (slots[None, self.width:] - self.pad[:, None]).clamp(min=0)
            out = self.model(input_ids=new, attention_mask=attention, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self.arg: self.cache})
            self.cache, logits = getattr(out, self.arg), out.logits
        self.width += n
        return logits[:, -1]

    def _take_in(self, other: PaddedBatch) -> None:
        """Put ``other``'s rows after these, shifting the narrower cache right."""
        if not self.rows:
            self.pad, self.width, self.cache = other.pad, other.width, other.cache
            return
        width = max(self.width, other.width)
        size = self.window if self.kind == "gpt" else width  # the GPT's buffers: whole windows,
        # padded here once rather than again by _set_tensors
        mine, theirs = self._tensors(), other._tensors()
        merged = [torch.cat([_shift(a, width - self.width, self._time_dim, size),
                             _shift(b, width - other.width, self._time_dim, size)],
                            dim=self._batch_dim) for a, b in zip(mine, theirs, strict=True)]
        self.pad = torch.cat([self.pad + width - self.width, other.pad + width - other.width])
        self.width = width
        self._set_tensors(merged)

    # The cache's tensors: the GPT's KVCache holds (layers, batch, heads, slots, head_dim)
    # buffers of ``window`` slots; a transformers cache one (batch, heads, slots, head_dim)
    # tensor per layer and per keys / values.
    @property
    def _batch_dim(self) -> int:
        return 1 if self.kind == "gpt" else 0

    @property
    def _time_dim(self) -> int:
        return 3 if self.kind == "gpt" else 2

    def _tensors(self) -> list[torch.Tensor]:
        if self.kind == "gpt":
            return [self.cache.k[:, :, :, :self.width], self.cache.v[:, :, :, :self.width]]
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def _set_tensors(self, tensors: list[torch.Tensor]) -> None:
        if self.kind == "gpt":
            k, v = tensors
            self.cache.k = _shift(k, 0, 3, self.window).contiguous()
            self.cache.v = _shift(v, 0, 3, self.window).contiguous()
            self.cache.max_len, self.cache.length = self.window, self.width
            return
        for layer, (k, v) in zip(self.cache.layers, zip(tensors[::2], tensors[1::2],
                                                        strict=True), strict=True):
            layer.keys, layer.values = k.contiguous(), v.contiguous()


def _shift(t: torch.Tensor, left: int, time_dim: int, size: int) -> torch.Tensor:
    """``t`` with ``left`` empty slots before its slots and empty ones after, up to ``size``."""
    after = size - left - t.shape[time_dim]
    if not left and not after:
        return t
    widths = [0, 0] * (t.dim() - 1 - time_dim) + [left, after]
    return F.pad(t, widths)
