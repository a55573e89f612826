"""Loss per wall-second: lmtrain's recipes against nanoGPT's CPU config, in one invocation.

    python benchmarks/bench_recipe.py --out bench-out          # the table + plot of docs/recipe.md
    python benchmarks/bench_recipe.py --quick --out /tmp/r     # a smoke run (~1 min)
    python benchmarks/bench_recipe.py --only reference,default --device cuda --compile

The reference is a plain PyTorch loop of nanoGPT's CPU config (4 layers, 4 heads, width 128,
block 64, batch 12, dropout 0, AdamW lr 1e-3 with betas (0.9, 0.99), warmup 100, cosine to
1e-4 at 2000 steps; fp32 on the CPU, bf16 autocast on GPUs that have it), on lmtrain's
``gpt2`` architecture (nanoGPT's model, with GPT-2's biases). Every other run is lmtrain's own
model, optimizer, schedule and precision, built from a ``TrainingConfig``: ``default`` is
whatever ``make run`` trains, the rest vary architecture, optimizer, size and learning rate.

All runs read the bundled corpus with the same character vocabulary and 90/10 split, and are
evaluated every 100 steps on the same 40 fixed validation batches (12 x 64). They run
interleaved, 100 steps of each in turn, so load from other processes hits them alike; only
training steps are timed, and not a run's first (compilation and start-up). For each run:
seconds until its val loss first reaches the
reference's final val loss (interpolated between evaluations), and its own final val loss.
Writes ``table.md``, ``results.json`` and ``recipe.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmtrain.config import DEFAULT_CORPUS, TrainingConfig
from lmtrain.device import autocast_dtype, select_device
from lmtrain.models import build_model
from lmtrain.models.gpt import GPT, GPTConfig
from lmtrain.train.lm_loss import compute_loss
from lmtrain.train.optim import build_optimizer, set_learning_rate

BLOCK, BATCH, SEED = 64, 12, 1337
EVAL_EVERY, EVAL_BATCHES = 100, 40
REFERENCE_STEPS = 2000

DEFAULTS = TrainingConfig.from_flat()
#: name -> (what it changes, TrainingConfig settings over lmtrain's defaults). Runs in
#: ``RUNS`` make the default invocation (~8 min on the 2-core machine, estimated); the others run
#: when named in ``--only``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("lmtrain's defaults (`make run`)", {}),
    "gpt2-adamw": ("gpt2 arch, AdamW", {"arch": "gpt2", "optimizer": "adamw"}),
    "gpt2-muon": ("gpt2 arch", {"arch": "gpt2"}),
    "llama-adamw": ("AdamW", {"optimizer": "adamw"}),
    "muon-lr-half": ("half Muon lr",
                     {"muon_learning_rate": DEFAULTS.optimization.muon_learning_rate / 2}),
    "2x128": ("2 layers", {"n_layer": 2}),
    "no-qk-norm": ("no QK-norm", {"qk_norm": False}),
    "muon-lr-double": ("double Muon lr",
                       {"muon_learning_rate": DEFAULTS.optimization.muon_learning_rate * 2}),
    "4x96": ("width 96, 3 heads", {"n_embd": 96, "n_head": 3}),
    "6x192": ("6 layers, 6 heads, width 192", {"n_layer": 6, "n_head": 6, "n_embd": 192}),
    "batch-12": ("batch 12, 2000 steps", {"batch_size": 12, "training_steps": 2000}),
    "first-release": ("first release's `make run`",
                      {"arch": "gpt2", "optimizer": "adamw", "learning_rate": 1e-3,
                       "batch_size": 12, "training_steps": 4000, "warmup_steps": 100,
                       "dropout": 0.1}),
}
RUNS = ("default", "gpt2-adamw", "gpt2-muon", "llama-adamw", "muon-lr-half", "2x128", "no-qk-norm")


@dataclass
class Run:
    """One side: a step function, its eval curve and its timed training seconds."""

    name: str
    recipe: str
    steps: int
    model: torch.nn.Module
    step: Callable[[int], float]
    autocast: Callable[[], contextlib.AbstractContextManager]
    done: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, val


def load_data() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = Path(DEFAULT_CORPUS).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def batch(data: torch.Tensor, gen: torch.Generator, device: torch.device, size: int = BATCH
          ) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - BLOCK - 1, (size,), generator=gen)
    offsets = torch.arange(BLOCK + 1)
    chunk = data[ix[:, None] + offsets]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(dtype: torch.dtype | None, device: torch.device
                 ) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def reference_run(train: torch.Tensor, vocab: int, device: torch.device, compile_: bool,
                  steps: int) -> Run:
    """nanoGPT's CPU config as a plain loop (its schedule, its optimizer, its precision)."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=4, n_head=4, n_embd=128,
                          arch="gpt2")).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99),
                            fused=True if device.type == "cuda" else None)
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    autocast = autocast_for(torch.bfloat16 if native else None, device)
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator().manual_seed(SEED)
    warmup, lr, min_lr = steps // 20, 1e-3, 1e-4

    def step(it: int) -> float:
        if it < warmup:
            now = lr * (it + 1) / (warmup + 1)
        else:
            ratio = (it - warmup) / (steps - warmup)
            now = min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
        for g in opt.param_groups:
            g["lr"] = now
        x, y = batch(train, gen, device)
        with autocast():
            logits = fwd(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return Run("reference", "nanoGPT CPU config, plain PyTorch loop", steps, model, step,
               autocast)


def lmtrain_run(name: str, recipe: str, settings: dict[str, Any], train: torch.Tensor,
                vocab: int, device: torch.device, precision: str, compile_: bool,
                scale: float) -> Run:
    """A run built from lmtrain's own model, optimizer, schedule and precision choice."""
    cfg = TrainingConfig.from_flat(**{**DEFAULTS.flat(), "block_size": BLOCK,
                            "precision": precision, "compile": compile_, **settings})
    steps = max(int(cfg.optimization.training_steps * scale), 10)
    cfg = cfg.model_copy(update={"training_steps": steps,
                                 "warmup_steps": int(cfg.optimization.warmup_steps * scale)})
    torch.manual_seed(SEED)
    model = build_model(cfg.model, vocab).to(device)
    optimization = cfg.optimization
    opt = build_optimizer(model, optimization, device)
    autocast = autocast_for(autocast_dtype(cfg.run.precision, device, model), device)
    fwd = torch.compile(model) if compile_ else model
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(SEED)

    def step(it: int) -> float:
        set_learning_rate(opt, it, optimization)
        x, y = batch(train, gen, device, cfg.optimization.batch_size)
        with autocast():
            loss = compute_loss(fwd, x, y)
        loss.backward()
        if cfg.optimization.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optimization.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    opt = cfg.optimization
    shape = (f"{cfg.model.arch} {cfg.model.n_layer}x{cfg.model.n_embd}, batch {opt.batch_size}, "
             f"{opt.optimizer}")
    lr = (f"lr {opt.learning_rate:g}" + (f", muon lr {opt.muon_learning_rate:g}"
                                         if opt.optimizer == "muon" else ""))
    return Run(name, f"{recipe}: {shape}, {lr}, {cfg.optimization.training_steps} steps", steps,
               model,
               step, autocast)


@torch.no_grad()
def evaluate(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    run.model.eval()
    total = 0.0
    for x, y in batches:
        with run.autocast():
            logits = run.model(x)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1)).item()
    run.model.train()
    return total / len(batches)


def advance(run: Run, n: int, device: torch.device) -> None:
    """``n`` training steps, timed except a run's first (it holds torch.compile's compilation
    and the device's start-up, which are paid once and are not the recipe's speed)."""
    if run.done == 0 and n > 0:
        float(run.step(0).detach())
        sync(device)
        run.done, n = 1, n - 1
    sync(device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(n):
        loss = run.step(run.done)
        run.done += 1
    if loss is not None:
        float(loss.detach())  # wait for the last step
    sync(device)
    run.seconds += time.perf_counter() - t0


def seconds_to(run: Run, target: float) -> float | None:
    """Training seconds at which the val loss first reaches ``target``, interpolated linearly
    between the two evaluations around that point (none before the first evaluation)."""
    prev = None
    for _, seconds, val in run.curve:
        if val <= target:
            if prev is None:
                return seconds
            (s0, v0), s1 = prev, seconds
            return s0 + (v0 - target) / (v0 - val) * (s1 - s0)
        prev = seconds, val
    return None


def table(runs: list[Run], target: float, ref_seconds: float) -> str:
    lines = ["| run | recipe | s/step | train s | s to ref loss | of ref time | final val |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        hit = seconds_to(r, target)
        share = f"{100 * hit / ref_seconds:.0f}%" if hit is not None else "—"
        lines.append(f"| {r.name} | {r.recipe} | {r.seconds / max(r.done - 1, 1) * 1000:.1f} ms | "
                     f"{r.seconds:.1f} | {'—' if hit is None else f'{hit:.1f}'} | {share} | "
                     f"{r.curve[-1][2]:.4f} |")
    return "\n".join(lines)


def plot(runs: list[Run], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        ax.plot([s for _, s, _ in r.curve], [v for _, _, v in r.curve], label=r.name,
                linewidth=2.5 if r.name in ("reference", "default") else 1.2)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8,
               label=f"reference final {target:.3f}")
    ax.set_xlabel("training wall seconds")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(3.0, max(v for r in runs for _, _, v in r.curve)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="lmtrain runs' PRECISION")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--quick", action="store_true",
                    help="a twentieth of the steps, 5 eval batches")
    ap.add_argument("--only", default="", help="comma-separated run names (the reference "
                    "always runs); default: " + ",".join(RUNS))
    ap.add_argument("--out", default="bench-recipe", help="folder for table, json and plot")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    device = select_device(args.device)
    scale = 0.05 if args.quick else 1.0
    names = list(RUNS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip() not in ("", "reference")]
        unknown = set(names) - set(VARIANTS)
        if unknown:
            ap.error(f"--only: unknown runs {sorted(unknown)}; choose from reference, "
                     f"{', '.join(VARIANTS)}")
    train, val, vocab = load_data()
    gen = torch.Generator().manual_seed(SEED + 1)
    batches = [batch(val, gen, device) for _ in range(5 if args.quick else EVAL_BATCHES)]
    runs = [reference_run(train, vocab, device, args.compile, int(REFERENCE_STEPS * scale))]
    runs += [lmtrain_run(n, *VARIANTS[n], train, vocab, device, args.precision, args.compile,
                         scale) for n in names]
    every = max(int(EVAL_EVERY * scale), 1)
    print(f"device {device}, {len(runs)} runs, eval every {every} steps on "
          f"{len(batches)} fixed val batches", flush=True)
    while any(r.done < r.steps for r in runs):
        for r in runs:
            if r.done < r.steps:
                advance(r, min(every, r.steps - r.done), device)
                r.curve.append((r.done, r.seconds, evaluate(r, batches)))
        print(" ".join(f"{r.name}:{r.done}/{r.steps}={r.curve[-1][2]:.3f}" for r in runs),
              flush=True)
    ref = runs[0]
    target, ref_seconds = ref.curve[-1][2], ref.seconds
    text = table(runs, target, ref_seconds)
    print(f"\nreference final val loss {target:.4f} after {ref_seconds:.1f} s\n\n{text}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({
        "device": str(device), "target": target, "reference_seconds": ref_seconds,
        "runs": [{"name": r.name, "recipe": r.recipe, "steps": r.done, "seconds": r.seconds,
                  "seconds_to_target": seconds_to(r, target), "curve": r.curve}
                 for r in runs]}, indent=1), encoding="utf-8")
    plot(runs, target, out / "recipe.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'recipe.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
