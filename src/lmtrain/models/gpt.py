"""The from-scratch GPT in two architectures, and the bigram model (``n_layer=0``).

``gpt2``: pre-LayerNorm blocks, learned positions, GELU MLP, biases, tied embeddings; module
names follow GPT-2's (``c_attn``, ``c_proj``, ``c_fc``) so the Hugging Face export maps one to
one. ``llama``: RMSNorm, rotary positions, SwiGLU MLP, optional QK-norm, no biases, untied
head; it keeps the same module names (``c_attn`` holds q, k, v; ``c_fc`` holds gate and up), so
``LORA_TARGETS`` work for both. Both attend with SDPA and sample through a KV cache
(:meth:`GPT.make_kv_cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHES = ("gpt2", "llama")
ROPE_THETA = 10_000.0
NORM_EPS = 1e-5


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a from-scratch model (``n_layer=0``: the bigram model)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    arch: str = "gpt2"
    qk_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """MLP width: 4x for GELU; ~8/3x (to a multiple of 32) for SwiGLU, the same parameters."""
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)


class KVCache:
    """Keys and values of the tokens seen so far, per layer; ``length`` tokens are filled.

    Made by :meth:`GPT.make_kv_cache`; every call ``model(new_ids, kv_cache=cache)`` appends
    the new tokens' keys and values and advances ``length``.

    ``left_pad`` (``(batch,)`` ids, optional) batches sequences of different lengths: row ``b``
    starts with ``left_pad[b]`` padding slots that no token attends to, and its first real
    token is at position 0, so each row is computed as it would be alone.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.left_pad: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every token (the buffers are reused)."""
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, H, T, D) after the cached tokens; all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)


def rotary_tables(block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim) in the half-split layout Hugging Face Llama uses."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by the positions whose ``cos``/``sin`` rows (T, D) are given."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.layer = layer
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (``(B, 1, T, keys)``, True = attend) replaces the causal mask when given."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):  # in fp32, as Hugging Face's RMSNorm computes it
            q = self.q_norm(q.float()).to(v.dtype)
            k = self.k_norm(k.float()).to(v.dtype)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        given = mask is not None
        if not given and past and T > 1:  # new queries: every cached key, new ones up to their own
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=not given and past == 0 and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU MLP (``gpt2``) or SwiGLU (``llama``: ``c_fc`` yields gate and up halves)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.gated = cfg.arch == "llama"
        hidden = cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(cfg.n_embd)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder trained from scratch (``cfg.arch``: ``gpt2`` or ``llama``)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.arch not in ARCHES:
            raise ValueError(f"unknown arch {cfg.arch!r}; expected one of {ARCHES}")
        self.config = cfg
        llama = cfg.arch == "llama"
        layers: dict[str, nn.Module] = {"wte": nn.Embedding(cfg.vocab_size, cfg.n_embd)}
        if not llama:  # learned positions (first, so parameter order matches GPT-2's)
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        layers.update(drop=nn.Dropout(cfg.dropout),
                      h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)), ln_f=_norm(cfg))
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if llama:
            cos, sin = rotary_tables(cfg.block_size, cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.lm_head.weight = self.transformer.wte.weight  # type: ignore[assignment]  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len <= block_size`` tokens."""
        cfg = self.config
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len={max_len} must be between 1 and block_size={cfg.block_size}")
        weight = self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim,
                       weight.device, weight.dtype)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``.

        With ``kv_cache``, ``idx`` holds only the new tokens, their positions continue after the
        cached ones, and the result is ``(logits, kv_cache)`` with the cache advanced.
        """
        T = idx.shape[1]
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"the KV cache holds {kv_cache.max_len} tokens; {start} are cached "
                             f"and {T} more do not fit")
        x = self.transformer.wte(idx)
        rope, mask = None, None
        slots = torch.arange(start, start + T, device=idx.device)
        pad = None if kv_cache is None else kv_cache.left_pad
        positions = slots if pad is None else (slots[None] - pad[:, None]).clamp(min=0)
        if pad is not None:  # slot s is seen by row b's query q when pad[b] <= s <= q (or s == q)
            keys = torch.arange(start + T, device=idx.device)
            mask = (keys <= slots[:, None]) & ((keys >= pad[:, None, None])
                                               | (keys == slots[:, None]))
            mask = mask[:, None]  # (B, 1, T, keys): the same for every head
        if self.config.arch == "llama":
            rope = self.rope_cos[positions], self.rope_sin[positions]
            if pad is not None:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
                rope = rope[0][:, None], rope[1][:, None]
        else:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, mask)
        logits = self.lm_head(self.transformer.ln_f(x))
        if kv_cache is None:
            return logits
        kv_cache.length += T
        return logits, kv_cache


class BigramLM(nn.Module):
    """The bigram model the GPT grew out of: each token's logits are one row of a table."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def make_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache that only counts tokens: the next token depends on the last one alone."""
        return KVCache(0, batch_size, 1, max_len, 1, self.token_embedding_table.weight.device,
                       self.token_embedding_table.weight.dtype)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        logits = self.token_embedding_table(idx)
        if kv_cache is None:
            return logits
        kv_cache.length += idx.shape[1]
        return logits, kv_cache


def build_from_scratch(cfg: GPTConfig) -> nn.Module:
    """The bigram model when ``n_layer`` is 0, else the GPT."""
    return BigramLM(cfg) if cfg.n_layer == 0 else GPT(cfg)
