"""The training loss: :func:`compute_loss`, next-token cross-entropy over the targets that
count, for every model; GPT-2 straight from the final hidden states, in row chunks.

GPT-2's 50,257-way output layer dominates a LoRA step's memory traffic: the plain path keeps
the ``(tokens, vocab)`` logits in bf16, an fp32 copy, the fp32 log-softmax and, in the
backward pass, the fp32 and bf16 gradients of the logits. Here each chunk of rows is projected,
reduced to its loss and turned into its gradient at once (softmax minus one-hot), so only one
``(chunk, vocab)`` block exists at a time and the backward pass is a multiplication by the saved
input gradient. The softmax and its gradient run over a few rows at a time, in the cache. The
matrix products are the same ones, in the same precision as autocast's.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.data.dataset import IGNORE_INDEX
from lmtrain.models import hf_model, model_logits
from lmtrain.sharding import is_sharded

#: Rows per chunk: a (1024 x 50,257) fp32 block is ~206 MB, one batch of 8 x 128 tokens (larger
#: matrix products were faster than 256- or 512-row chunks on the CPU).
CHUNK_ROWS = 1024
#: Rows per step of the softmax and its gradient: a (16 x 50,257) fp32 block is ~3 MB
SOFTMAX_ROWS = 16


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the output projection in."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


#: id(weight) -> ((version, data pointer, dtype), cast copy); an entry goes with its weight
_frozen_casts: dict[int, tuple[tuple[int, int, torch.dtype], torch.Tensor]] = {}


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``; a frozen weight's copy is kept until the weight changes (a
    LoRA run's output layer is cast once, not at every step as autocast would)."""
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    cached = _frozen_casts.get(id(weight))
    if cached is None or cached[0] != key:
        if cached is None:
            weakref.finalize(weight, _frozen_casts.pop, id(weight), None)
        cached = (key, weight.detach().to(dtype))
        _frozen_casts[id(weight)] = cached
    return cached[1]


def _softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, grad: bool,
                   rows: int = SOFTMAX_ROWS) -> torch.Tensor:
    """The fp32 log-probabilities of ``targets`` under ``logits`` (chunk, vocab); with ``grad``,
    ``logits`` is overwritten in place by softmax minus one-hot. A few rows at a time, so each
    block is read from memory once and its fp32 copy, log-sum-exp and exponentials stay in the
    cache."""
    picked = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    for a in range(0, len(logits), rows):
        logp = torch.log_softmax(logits[a:a + rows].float(), dim=-1)
        at = (torch.arange(len(logp), device=logp.device), targets[a:a + rows])
        picked[a:a + rows] = logp[at]
        if grad:
            logp.exp_()[at] -= 1.0
            logits[a:a + rows] = logp
    return picked


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T, targets)`` (mean over targets != ``IGNORE_INDEX``),
    with the gradients computed during the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, chunk: int, need_h: bool, need_w: bool
                ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), _cast_weight(weight, compute_dtype)
            valid = targets != IGNORE_INDEX
            count = valid.sum().clamp(min=1).to(torch.float32)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            for s in range(0, h.shape[0], chunk):
                rows, tgt, ok = h[s:s + chunk], targets[s:s + chunk], valid[s:s + chunk]
                g = rows @ w.t()  # the logits, overwritten with d loss / d logits
                picked = _softmax_grad_(g, tgt.masked_fill(~ok, 0), need_h or need_w)
                total -= (picked * ok).sum()
                if not (need_h or need_w):
                    continue
                # d loss / d logits = (softmax - one-hot) * ok / count; the per-row factor is
                # applied to the (chunk, C) products, not to the (chunk, vocab) block
                scale = (ok.to(torch.float32) / count)[:, None]
                if grad_h is not None:
                    grad_h[s:s + chunk] = (g @ w).to(hidden.dtype) * scale
                if grad_w is not None:
                    grad_w += (g.t() @ (rows * scale).to(compute_dtype)).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = saved.pop(0) * grad_out if need_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (N, C) @ weight.T (C, V)`` against ``targets (N,)``."""
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk,
                                     grad and hidden.requires_grad, grad and weight.requires_grad)


def split_output_layer(model: nn.Module):
    """``(body, head weight)`` for a Hugging Face causal LM, bare or under peft adapters, where
    ``body(x)`` gives the final hidden states; ``None`` for any other model (or wrapper, such as
    DistributedDataParallel, whose forward must run)."""
    base = hf_model(model)  # peft's forward only calls the base model
    if base is None or is_sharded(model):  # our GPT, or a wrapper whose forward must run (FSDP
        return None                        # gathers the root's weights in its forward)
    from transformers import GPT2LMHeadModel

    if not isinstance(base, GPT2LMHeadModel):
        return None

    def body(x: torch.Tensor) -> torch.Tensor:
        return base.transformer(input_ids=x, use_cache=False).last_hidden_state

    return body, base.lm_head.weight


def chunked_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Mean next-token cross-entropy by :func:`linear_cross_entropy`; ``None`` when the model's
    output layer cannot be split off (the caller computes the loss from the logits)."""
    split = split_output_layer(model)
    if split is None:
        return None
    body, weight = split
    hidden = body(x)
    return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), weight, y.reshape(-1))


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not ``IGNORE_INDEX`` (0 if there
    are none); GPT-2 in row chunks without materialising the logits (:func:`chunked_lm_loss`),
    every other model from its logits."""
    loss = chunked_lm_loss(model, x, y)
    if loss is not None:
        return loss
    logits = model_logits(model, x)
    targets = y.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
