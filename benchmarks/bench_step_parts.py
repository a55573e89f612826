"""Where one training step's time goes, per recipe: batch, forward+backward, clip, optimizer.

    python benchmarks/bench_step_parts.py --device cuda
    python benchmarks/bench_step_parts.py --only default,llama-adamw --steps 30

Builds each run exactly as ``bench_recipe.py`` does (lmtrain's model, optimizer, schedule and
precision; the reference is nanoGPT's CPU config as a plain loop), then times ``--steps``
steps after a warm-up, synchronising the device between the parts so each part's time is its
own. On a GPU a small model is bound by kernel launches, not arithmetic, so this shows which
part of the recipe pays for it. ``--compile-optimizer`` also times the optimizer step under
``torch.compile``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench_recipe import BATCH, DEFAULTS, SEED, VARIANTS, autocast_for, batch, load_data, sync
from lmtrain.config import TrainingConfig
from lmtrain.device import autocast_dtype, select_device
from lmtrain.models import build_model
from lmtrain.models.gpt import GPT, GPTConfig
from lmtrain.train.lm_loss import compute_loss
from lmtrain.train.optim import build_optimizer

PARTS = ("batch", "forward+backward", "clip", "optimizer")


def build(name: str, vocab: int, device: torch.device, precision: str):
    """(model, optimizer, autocast, batch size, grad clip, loss function) for one run."""
    torch.manual_seed(SEED)
    if name == "reference":
        model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128,
                              arch="gpt2")).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99),
                                fused=True if device.type == "cuda" else None)
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(
            including_emulation=False)
        autocast = autocast_for(torch.bfloat16 if native else None, device)

        def loss_of(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = m(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))

        return model, opt, autocast, BATCH, 1.0, loss_of
    cfg = TrainingConfig.from_flat(**{**DEFAULTS.flat(), "block_size": 64,
                                      "precision": precision,
                            **VARIANTS[name][1]})
    model = build_model(cfg.model, vocab).to(device)
    opt = build_optimizer(model, cfg.optimization, device)
    autocast = autocast_for(autocast_dtype(cfg.run.precision, device, model), device)
    opt_cfg = cfg.optimization
    return model, opt, autocast, opt_cfg.batch_size, opt_cfg.grad_clip, compute_loss


def time_parts(name: str, train: torch.Tensor, vocab: int, device: torch.device,
               precision: str, steps: int, compile_opt: bool) -> dict[str, float]:
    """Mean milliseconds per part over ``steps`` timed steps (5 warm-up steps first)."""
    model, opt, autocast, size, clip, loss_of = build(name, vocab, device, precision)
    step_fn = torch.compile(opt.step) if compile_opt else opt.step
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(SEED)
    totals = dict.fromkeys(PARTS, 0.0)
    for it in range(steps + 5):
        marks = [time.perf_counter()]
        x, y = batch(train, gen, device, size)
        sync(device)
        marks.append(time.perf_counter())
        with autocast():
            loss = loss_of(model, x, y)
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        sync(device)
        marks.append(time.perf_counter())
        step_fn()
        opt.zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        if it >= 5:
            for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True):
                totals[part] += (b - a) * 1000
    return {part: ms / steps for part, ms in totals.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="lmtrain runs' PRECISION")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per run")
    ap.add_argument("--only", default="reference,default,llama-adamw,gpt2-muon,gpt2-adamw",
                    help="comma-separated runs: reference or any of " + ",".join(VARIANTS))
    ap.add_argument("--compile-optimizer", action="store_true",
                    help="also time each optimizer step under torch.compile")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    device = select_device(args.device)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(VARIANTS) - {"reference"}
    if unknown:
        ap.error(f"--only: unknown runs {sorted(unknown)}")
    train, _, vocab = load_data()
    print(f"device {device}, torch {torch.__version__}, {args.steps} timed steps, ms per step\n")
    print("| run | optimizer step | " + " | ".join(PARTS) + " | total |")
    print("| --- | --- |" + " ---: |" * (len(PARTS) + 1))
    modes = [False, True] if args.compile_optimizer else [False]
    for name in names:
        for compiled in modes:
            try:
                ms = time_parts(name, train, vocab, device, args.precision, args.steps,
                                compiled)
            except Exception as exc:  # a compile failure is a finding, not a crash
                print(f"| {name} | {'compiled' if compiled else 'eager'} | failed: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]} |", flush=True)
                continue
            cells = " | ".join(f"{ms[p]:.2f}" for p in PARTS)
            print(f"| {name} | {'compiled' if compiled else 'eager'} | {cells} | "
                  f"{sum(ms.values()):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
