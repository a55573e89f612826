"""A plain PyTorch training loop, nanoGPT style: the yardstick for lmtrain's whole-process speed.

    python benchmarks/plain_loop.py --steps 40 --batch-size 16 --block-size 256 \
        --n-layer 6 --n-head 6 --n-embd 384 --precision bf16

Self-contained (torch and numpy only; lmtrain is never imported), so a whole process pays
only for what a hand-written script pays for: importing torch, reading and encoding the
corpus, building the model and the optimizer, the steps, one line at the end.

It does the same work as ``python training.py`` with ``ARCH=gpt2``, ``OPTIMIZER=adamw`` and
the shape above: the same GPT-2-style model (pre-LayerNorm, learned positions, tanh GELU, SDPA
attention, tied embeddings, GPT-2 initialisation; modules built in the same order, so the same
seed gives the same weights), the bundled corpus as a character vocabulary, a 90/10 split,
random windows drawn with a generator seeded like lmtrain's sampler, bf16 autocast, AdamW
(fused kernel, betas 0.9/0.95, weight decay 0.1 on matrices only), gradient clipping at 1.0 and
lmtrain's warmup + cosine schedule. With the same settings its printed mean loss matches
lmtrain's ``step N/N: loss`` line (both average the same steps).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CORPUS = Path(__file__).resolve().parent.parent / "src" / "lmtrain" / "corpus" / "shakespeare.txt"


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(0.0), h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def get_batch(train: np.ndarray, batch_size: int, block_size: int,
              sampler: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size`` inputs and their next-token targets."""
    starts = torch.randint(len(train) - block_size, (batch_size,), generator=sampler).numpy()
    rows = torch.from_numpy(train[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def get_lr(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio`` of the peak at ``steps``."""
    if step < args.warmup_steps:
        multiplier = (step + 1) / (args.warmup_steps + 1)
    elif step >= args.steps:
        multiplier = args.min_lr_ratio
    else:
        progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        multiplier = args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine
    return args.lr * multiplier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=str(CORPUS))
    args = p.parse_args()
    t0 = time.perf_counter()

    text = Path(args.data).read_text(encoding="utf-8")
    codes = np.array(sorted({ord(c) for c in text}), dtype=np.uint32)
    ids = np.searchsorted(codes, np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
    ids = ids.astype(np.uint16)
    train = ids[:int(len(ids) * 0.9)]

    torch.manual_seed(args.seed)
    model = GPT(len(codes), args.block_size, args.n_layer, args.n_head, args.n_embd)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=True)
    sampler = torch.Generator().manual_seed(args.seed)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    losses = []
    model.train()
    t1 = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, args)
        x, y = get_batch(train, args.batch_size, args.block_size, sampler)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    mean = torch.stack(losses).mean().item()
    t2 = time.perf_counter()
    print(f"step {args.steps}/{args.steps}: loss {mean:.4f}")
    print(f"time: setup {t1 - t0:.2f}s, train {t2 - t1:.2f}s, total {t2 - t0:.2f}s")


if __name__ == "__main__":
    main()
