"""Autoregressive sampling: KV cache, temperature, top-k, top-p, stop at end of text, token
healing, on a generator of its own.

GPT-2 decodes through ``transformers``' own cache; the from-scratch GPT through its
``make_kv_cache``; the bigram model (and any other) re-reads its window. When the context
outgrows ``block_size`` it is cropped to the last ``block_size`` tokens and a fresh cache is
filled from them, so cached and uncached decoding see the same tokens at the same positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtrain.config import GenerationSettings
from lmtrain.data.tokenizers import GPT2_EOT, CharTokenizer, GPT2FilesTokenizer, Tokenizer
from lmtrain.device import autocast_context
from lmtrain.errors import UserError
from lmtrain.healing import heal_prompt, stream_text, token_bytes
from lmtrain.models import hf_model, model_logits


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


def default_prompt(config: GenerationSettings, model_type: str) -> str:
    """``PROMPT`` when set; else GPT-2 runs start in-domain (``QUESTION: ``), others empty."""
    if config.prompt is not None:
        return config.prompt
    return "QUESTION: " if model_type == "gpt2" else ""


def greedy(max_new_tokens: int) -> GenerationSettings:
    """Settings for greedy decoding (argmax; ``top_k=1``) of up to ``max_new_tokens`` tokens."""
    return GenerationSettings(max_new_tokens=max_new_tokens, top_k=1)


def pick_token(logits: torch.Tensor, sampling: GenerationSettings,
               generator: torch.Generator | None, allowed: torch.Tensor | None = None) -> int:
    """One id from next-token ``logits`` ``(vocab,)``; only ``allowed`` ids when given.

    ``sampling.top_k == 1`` is greedy decoding (argmax; the temperature does not matter).
    """
    logits = logits.float()
    if allowed is not None:
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[allowed] = False
        logits = logits.masked_fill(mask, float("-inf"))
    if sampling.top_k == 1:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:  # the smallest set of most likely ids holding top_p of the mass
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # the first one stays
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def model_kind(model: nn.Module) -> str:
    """How a model decodes: ``hf`` (``transformers``' cache), ``gpt`` (its own
    ``make_kv_cache``) or ``plain`` (re-reads its window every token)."""
    if hf_model(model) is not None:
        return "hf"
    return "gpt" if hasattr(model, "make_kv_cache") else "plain"


def cache_argument(hf: nn.Module) -> str:
    """The name of the cache argument of a ``transformers`` model's ``forward`` (transformers 5
    renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def context_window(model: nn.Module, block_size: int) -> int:
    """The tokens the model attends to: ``block_size``, or fewer when its positions end sooner."""
    positions = getattr(getattr(hf_model(model), "config", None), "n_positions", None)
    return min(block_size, positions) if positions else block_size


def low_precision(model: nn.Module) -> torch.dtype | None:
    """The dtype to autocast to when the model holds bf16/fp16 weights (a bf16 LoRA run keeps
    its frozen base in bf16: :mod:`lmtrain.train.frozen`); ``None`` for an fp32 model."""
    low = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    return low.pop() if low else None


class Decoder:
    """Next-token logits for a growing sequence, reusing a KV cache where the model has one."""

    def __init__(self, model: nn.Module, block_size: int, device: torch.device,
                 use_cache: bool = True) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        hf = hf_model(model)
        self.kind = model_kind(model)
        if not use_cache:
            self.kind = "plain" if self.kind == "gpt" else self.kind + "_nocache"
        if hf is not None:
            self._cache_arg = cache_argument(hf)
        self.cache: Any = None
        self.start = self.length = 0  # the cache holds ids[start:start + length]

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits ``(vocab,)`` for the token after ``ids`` (seeing its last ``block_size``)."""
        start = max(len(ids) - self.block_size, 0)
        if self.cache is None or start != self.start:  # only "hf" and "gpt" keep a cache
            self.cache, self.start, self.length = None, start, 0  # crop: prefill a fresh cache
        new = ids[start + self.length:]
        idx = torch.tensor([new], dtype=torch.long, device=self.device)
        if self.kind == "hf":
            out = self.model(input_ids=idx, use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: self.cache})
            self.cache = getattr(out, self._cache_arg)
            logits = out.logits
        elif self.kind == "hf_nocache":
            logits = self.model(input_ids=idx, use_cache=False, logits_to_keep=1).logits
        elif self.kind == "gpt":
            if self.cache is None:
                self.cache = self.model.make_kv_cache(1, self.block_size)
            out = self.model(idx, kv_cache=self.cache)
            logits = out[0] if isinstance(out, tuple) else out
        else:
            logits = model_logits(self.model, idx)
        self.length += len(new)
        return logits[0, -1]


@torch.no_grad()
def sample_tokens(
    model: nn.Module, context: list[int], sampling: GenerationSettings, block_size: int,
    device: torch.device, generator: torch.Generator | None = None, *,
    stop_id: int | None = None, first_allowed: list[int] | None = None, use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to ``sampling.max_new_tokens`` ids after ``context`` (non-empty), one at a time.

    Stops early, without yielding it, when ``stop_id`` is sampled; the first token is drawn
    from ``first_allowed`` when given (token healing).
    """
    allowed = (torch.tensor(first_allowed, dtype=torch.long, device=device)
               if first_allowed is not None else None)
    decoder = Decoder(model, block_size, device, use_cache)
    low = low_precision(model)
    ids = list(context)
    was_training = model.training
    model.eval()
    try:
        for _ in range(sampling.max_new_tokens):
            with autocast_context(device, low):
                logits = decoder.next_logits(ids)
            token = pick_token(logits, sampling, generator, allowed)
            allowed = None
            if token == stop_id:
                return
            ids.append(token)
            yield token
    finally:
        model.train(was_training)


def stream_sample(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: GenerationSettings,
    block_size: int, device: torch.device, generator: torch.Generator | None = None,
    table: list[bytes] | None = None,
) -> Iterator[str]:
    """The text that follows ``prompt``, piece by piece as tokens are sampled.

    The prompt is token-healed; pass ``table`` (:func:`token_bytes`) to reuse it across samples.
    """
    table = table if table is not None else token_bytes(tokenizer)
    healed = heal_prompt(start_context(tokenizer, prompt), table)  # one id: left as it is
    ids = sample_tokens(model, healed.context, sampling, block_size, device, generator,
                        stop_id=tokenizer.eot_id if sampling.stop_at_eot else None,
                        first_allowed=healed.allowed)
    yield from stream_text(ids, table, healed.prefix)


def generate_text(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: GenerationSettings,
    block_size: int, device: torch.device, seed: int = 0,
) -> str:
    """Prompt plus up to ``sampling.max_new_tokens`` sampled tokens, decoded."""
    gen = torch.Generator().manual_seed(seed)
    return prompt + "".join(stream_sample(model, tokenizer, prompt, sampling, block_size,
                                          device, gen))
