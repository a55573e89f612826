"""Peak memory and step time of a full GPT-2 fine-tune with and without GRADIENT_CHECKPOINTING.

    python benchmarks/bench_grad_ckpt.py            # GPT2Config() defaults: 124M parameters
    python benchmarks/bench_grad_ckpt.py --quick    # a tiny model (smoke run)

Each setting runs in a fresh process (so peak RSS is its own) through lmtrain's ``load_gpt2``,
``build_optimizer`` and ``compute_loss`` on random weights and tokens, batch 8 x 128, fp32.
Prints one markdown table row per setting; on CUDA the peak is torch's allocated memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def save_random_gpt2(folder: Path, quick: bool) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128) if quick else GPT2Config()
    GPT2LMHeadModel(config).save_pretrained(folder)


def run_steps(folder: str, checkpointing: bool, steps: int, batch: int, block: int,
              device_name: str) -> dict[str, float]:
    """Train ``steps`` steps in this process; returns peak memory (MiB) and seconds per step."""
    import torch

    from lmtrain.config import TrainingConfig
    from lmtrain.models.gpt2 import load_gpt2
    from lmtrain.train.lm_loss import compute_loss
    from lmtrain.train.optim import build_optimizer

    device = torch.device(device_name)
    cfg = TrainingConfig.from_flat(model_type="gpt2", gpt2_model_name=folder,
                                   tokenization_method="gpt2",
                         block_size=block, batch_size=batch, learning_rate=5e-5,
                         gradient_checkpointing=checkpointing, device=device_name)
    model = load_gpt2(cfg.model, 50257).to(device).train()
    optimizer = build_optimizer(model, cfg.optimization, device)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        xy = torch.randint(0, 50257, (batch, block + 1), generator=gen).to(device)
        t0 = time.perf_counter()
        compute_loss(model, xy[:, :-1], xy[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    later = times[1:] or times  # the first step warms up
    return {"peak_mib": peak, "s_per_step": sum(later) / len(later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        folder, on = args.child
        print(json.dumps(run_steps(folder, on == "1", args.steps, args.batch, args.block,
                                   args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_random_gpt2(Path(tmp), args.quick)
        rows = {}
        for on in ("0", "1"):
            cmd = [sys.executable, __file__, "--child", tmp, on, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--block", str(args.block),
                   "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[on] = json.loads(out.strip().splitlines()[-1])
    base = rows["0"]
    print("| GRADIENT_CHECKPOINTING | peak memory | s/step |")
    print("| --- | ---: | ---: |")
    for on, row in rows.items():
        saving = f" ({row['peak_mib'] / base['peak_mib'] - 1:+.0%})" if on == "1" else ""
        print(f"| {on} | {row['peak_mib']:,.0f} MiB{saving} | {row['s_per_step']:.2f} |")


if __name__ == "__main__":
    main()
