"""Peak memory per process of a full AdamW training run: DDP against FSDP (``PARALLEL``), the
same model, settings and number of processes, launched one after the other by torchrun.

    python benchmarks/bench_memory.py                      # GPT-2 medium shape (355M), 2 CPU procs
    python benchmarks/bench_memory.py --shape small --steps 3
    python benchmarks/bench_memory.py --device cuda        # torch.cuda.max_memory_allocated too
    python benchmarks/bench_memory.py --repeats 3          # interleaved launches, median step

The model is lmtrain's GPT with ``ARCH=gpt2`` in GPT-2's shapes (``medium``: 24 layers, width
1024, 16 heads, 1024 positions, GPT-2's 50,257-token vocabulary: 355M parameters, random
weights), trained by lmtrain's own session (fp32, AdamW, no evaluation or checkpoints). Each
worker reports its peak resident set (``ru_maxrss``: weights, gradients, optimizer state,
activations and the interpreter) and, on a GPU, ``torch.cuda.max_memory_allocated``; the table
shows the largest of the processes. Step time is the session's ``train`` time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: GPT-2's shapes (n_layer, n_embd, n_head); all use 1024 positions and 50,257 tokens.
SHAPES = {"tiny": (2, 64, 2), "small": (12, 768, 12), "medium": (24, 1024, 16),
          "large": (36, 1280, 20), "xl": (48, 1600, 25)}


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: train, then write this rank's peaks as JSON."""
    from lmtrain.host_memory import huge_pages_for_sharded_run

    huge_pages_for_sharded_run(args.parallel)  # what `lmtrain train` does before torch loads
    import torch

    from lmtrain.config import explicit_settings
    from lmtrain.train.session import train

    n_layer, n_embd, n_head = SHAPES[args.shape]
    flags = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "block_size": args.block,
             "batch_size": args.batch, "tokenization_method": "gpt2", "arch": "gpt2",
             "optimizer": "adamw", "precision": "fp32", "device": args.device,
             "parallel": args.parallel, "training_steps": args.steps, "eval_iters": 0,
             "max_new_tokens": 0, "enable_checkpoints": False, "log_interval": args.steps,
             "warmup_steps": 0, "dropout": 0.0, "run_name": f"mem-{args.parallel}",
             "log_dir": str(Path(args.work) / "logs"), "cache_dir": str(Path(args.work) / "cache"),
             "checkpoint_dir": str(Path(args.work) / "ckpt")}
    values, sources = explicit_settings(flags=flags, env={})
    summary = train(values, sources)
    rank = int(os.environ.get("RANK", "0"))
    cuda = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            and args.device.startswith("cuda") else None)
    result = {"rank": rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "cuda_peak": cuda, "step_s": summary.timings["train"] / max(args.steps, 1)}
    Path(args.work, f"{args.parallel}-{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, parallel: str, work: Path) -> list[dict]:
    """One torchrun launch of ``--nproc`` workers; their JSON results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc_per_node={args.nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{_free_port()}", __file__, "--worker",
           "--parallel", parallel, "--work", str(work), "--shape", args.shape,
           "--steps", str(args.steps), "--batch", str(args.batch), "--block", str(args.block),
           "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{parallel} launch failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(work.glob(f"{parallel}-*.json"))]


def table(results: dict[str, list[list[dict]]], args: argparse.Namespace) -> str:
    """The markdown table, per mode: the largest peak of any process in any launch, and the
    median over launches of the slowest process's step time; then the ratios."""
    gib = 2 ** 30
    from lmtrain.config import ModelSettings
    from lmtrain.data.tokenizers import GPT2_VOCAB_SIZE
    from lmtrain.memory_estimate import parameter_count

    n_layer, n_embd, n_head = SHAPES[args.shape]
    params = parameter_count(ModelSettings(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                           block_size=args.block), GPT2_VOCAB_SIZE)
    rows = [f"{args.shape} shape (~{params / 1e6:.0f}M parameters), {args.nproc} processes on "
            f"{args.device}, batch {args.batch} x {args.block} tokens, fp32 AdamW, "
            f"{args.steps} steps, {args.repeats} launch(es) per mode, interleaved", "",
            "| PARALLEL | peak RSS / process | CUDA peak / process | step time (median) |",
            "| --- | ---: | ---: | ---: |"]
    peak = {m: max(r["peak_rss"] for rs in runs for r in rs) for m, runs in results.items()}
    steps = {m: [max(r["step_s"] for r in rs) for rs in runs] for m, runs in results.items()}
    step = {m: statistics.median(v) for m, v in steps.items()}
    cuda = {m: max(r["cuda_peak"] or 0 for rs in runs for r in rs) for m, runs in results.items()}
    for m in results:
        gpu = f"{cuda[m] / gib:.2f} GiB" if cuda[m] else "-"
        each = ", ".join(f"{t:.2f}" for t in steps[m])
        rows.append(f"| {m} | {peak[m] / gib:.2f} GiB | {gpu} | {step[m]:.2f} s ({each}) |")
    if {"ddp", "fsdp"} <= set(results):
        pairs = ", ".join(f"{f / d:.2f}" for d, f in zip(steps["ddp"], steps["fsdp"],
                                                          strict=True))
        rows += ["", f"FSDP / DDP: peak RSS {peak['fsdp'] / peak['ddp']:.2f}x, step time "
                     f"{step['fsdp'] / step['ddp']:.2f}x (per launch pair: {pairs})"
                 + (f", CUDA peak {cuda['fsdp'] / cuda['ddp']:.2f}x" if cuda["ddp"] else "")]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="medium")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="ddp,fsdp", help="comma list, in launch order")
    p.add_argument("--repeats", type=int, default=1,
                   help="launches per mode, interleaved (ddp, fsdp, ddp, fsdp, ...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    modes = args.modes.split(",")
    results: dict[str, list[list[dict]]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes:
            work = Path(tempfile.mkdtemp(prefix=f"bench-memory-{mode}-{repeat}-"))
            results[mode].append(launch(args, mode, work))
            print(f"{mode} launch {repeat + 1}/{args.repeats}: step "
                  f"{max(r['step_s'] for r in results[mode][-1]):.2f} s", file=sys.stderr)
    print(table(results, args))


if __name__ == "__main__":
    main()
