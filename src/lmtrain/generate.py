"""Autoregressive sampling with temperature and top-k, on a generator of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from lmtrain.models import model_logits


@torch.no_grad()
def sample_tokens(
    model: nn.Module, context: list[int], max_new_tokens: int, block_size: int,
    device: torch.device, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled ids one at a time (the model is left in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([context or [0]], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = model_logits(model, idx[:, -block_size:])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).to(device)
            idx = torch.cat([idx, nxt], dim=1)
            yield int(nxt.item())
    finally:
        model.train(was_training)


def generate_text(
    model: nn.Module, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
    prompt: str, max_new_tokens: int, block_size: int, device: torch.device,
    temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
) -> str:
    """Prompt plus ``max_new_tokens`` sampled tokens, decoded."""
    gen = torch.Generator().manual_seed(seed)
    context = encode(prompt) if prompt else []
    new = list(sample_tokens(model, context, max_new_tokens, block_size, device,
                             temperature, top_k, gen))
    return prompt + decode(new)
