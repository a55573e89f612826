"""Autoregressive sampling with temperature and top-k, on a generator of its own."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lmtrain.config import TrainingConfig
from lmtrain.data.tokenizers import GPT2_EOT, CharTokenizer, GPT2FilesTokenizer, Tokenizer
from lmtrain.errors import UserError
from lmtrain.models import model_logits


def start_context(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token, or id 0."""
    if prompt:
        if isinstance(tokenizer, CharTokenizer):
            unknown = sorted(set(prompt) - set(tokenizer.chars))
            if unknown:
                raise UserError(
                    f"PROMPT={prompt!r} holds characters outside the training vocabulary "
                    f"({', '.join(map(repr, unknown[:20]))}); use characters of the training text")
        return tokenizer.encode(prompt)
    if tokenizer.kind == "gpt2":
        return [GPT2_EOT]
    if isinstance(tokenizer, GPT2FilesTokenizer):  # a folder's own BPE: its own ids
        eot = tokenizer.tok.token_to_id("<|endoftext|>")
        return [0 if eot is None else eot]
    return [0]


def default_prompt(config: TrainingConfig) -> str:
    """``PROMPT`` when set; else GPT-2 runs start in-domain (``QUESTION: ``), others empty."""
    if config.prompt is not None:
        return config.prompt
    return "QUESTION: " if config.model_type == "gpt2" else ""


@torch.no_grad()
def sample_tokens(
    model: nn.Module, context: list[int], max_new_tokens: int, block_size: int,
    device: torch.device, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled ids one at a time after ``context`` (non-empty)."""
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([context], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = model_logits(model, idx[:, -block_size:])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).to(device)
            idx = torch.cat([idx, nxt], dim=1)[:, -block_size:]  # only what the model sees
            yield int(nxt.item())
    finally:
        model.train(was_training)


def generate_text(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, block_size: int,
    device: torch.device,
    temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
) -> str:
    """Prompt plus ``max_new_tokens`` sampled tokens, decoded."""
    gen = torch.Generator().manual_seed(seed)
    new = list(sample_tokens(model, start_context(tokenizer, prompt), max_new_tokens, block_size,
                             device, temperature, top_k, gen))
    return prompt + tokenizer.decode(new)
