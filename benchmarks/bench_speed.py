"""Training speed of lmtrain against a plain PyTorch loop of the same model, in one invocation.

    python benchmarks/bench_speed.py           # the figures for the README (~15 min on 2 cores)
    python benchmarks/bench_speed.py --quick   # a few steps of each part (smoke run, ~1 min)
    python benchmarks/bench_speed.py --device cuda --precision bf16 [--compile]   # on a GPU
    python benchmarks/bench_speed.py --parts process --repeats 5   # whole processes only

Five parts, each printed as a markdown table:

a. From-scratch GPT, 6 layers, 6 heads, N_EMBD=384, BLOCK_SIZE=256, BATCH_SIZE=16 on the
   bundled corpus: lmtrain's own session assembly and loop (``assemble`` + ``run_training``
   with ``PRECISION=auto`` and ``COMPILE`` as given) against a plain fp32 loop of the same model
   class (``torch.optim.AdamW`` defaults, no autocast). Same initial weights, same batches, same
   constant learning rate; target tokens/s ratio >= 2.0 and final val loss within 0.05.
b. The 4-layer reference config (4 layers, 4 heads, N_EMBD=128, BLOCK_SIZE=64, BATCH_SIZE=12):
   lmtrain >= 1.0x the plain fp32 loop, and the trainer's overhead over a bare loop with
   identical settings (same precision, same optimizer) < 5%.
c. Matmul throughput measured here (fp32 and bf16) and the MFU of each side against it. The
   bf16/fp32 matmul ratio bounds what bf16 autocast can give a whole training step.
d. Saving a checkpoint of the 6-layer model (< 0.5 s) and going from that checkpoint to the
   end of the first resumed step (< 3 s; in-process, so Python imports are excluded).
e. Whole processes, the trainer tax: ``python training.py`` (ARCH=gpt2, the 6-layer shape of
   part a, DROPOUT=0, 40 steps, checkpoints, evaluation and the sample off, PRECISION=auto)
   against ``benchmarks/plain_loop.py``, a self-contained nanoGPT-style loop of the same model,
   batches, schedule and optimizer in bf16 autocast, each timed from launch to exit, the sides
   taking turns; target >= 0.95x. Both print the mean training loss of the run, which must
   agree (the same work). Evaluation off is EVAL_ITERS=0 (a large EVAL_INTERVAL alone leaves
   the evaluation at the end of the run). lmtrain runs with OPTIMIZER=adamw, the plain loop's
   optimizer: the default, Muon, is another algorithm (Newton-Schulz iterations on every
   hidden matrix, about a third more arithmetic per step here), which ``--with-muon`` times as
   a side of its own. ``--baseline DIR`` adds another checkout's ``training.py`` (e.g. the code
   before a change) as a side.

The sides run interleaved, a chunk of steps at a time, so that load from other processes on
a shared machine hits them alike; each side keeps its own dropout RNG stream.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0
SIX = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 16}
FOUR = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}


# ---------------------------------------------------------------- the sides being compared


@dataclass
class Side:
    """One way of training: ``step(n)`` runs n optimizer steps; time is summed over chunks."""

    name: str
    precision: str
    run: Callable[[int], None]
    model: torch.nn.Module
    seconds: float = 0.0
    steps: int = 0
    rng: torch.Tensor = field(default_factory=torch.get_rng_state)

    def chunk(self, n: int, timed: bool) -> None:
        torch.set_rng_state(self.rng)  # each side has its own dropout stream
        t0 = time.perf_counter()
        self.run(n)
        synchronize()
        if timed:
            self.seconds += time.perf_counter() - t0
            self.steps += n
        self.rng = torch.get_rng_state()


def synchronize() -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def lmtrain_context(shape: dict[str, int], args: argparse.Namespace, workdir: Path,
                    compile_model: bool) -> Any:
    """A run assembled by lmtrain's own session code (fresh run, PRECISION=auto)."""
    from lmtrain.config import explicit_settings
    from lmtrain.train.build import assemble
    from lmtrain.train.plan import resolve_plan
    from lmtrain.train.state import Placement

    # the GPT-2 architecture and AdamW on every side: this measures the trainer, not the recipe
    flags = {**shape, "arch": "gpt2", "optimizer": "adamw",
             "learning_rate": LR, "lr_scheduler": "none", "warmup_steps": 0,
             "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "dropout": args.dropout,
             "seed": args.seed, "precision": args.precision, "device": args.device,
             # the harness measures val loss itself: the loop evaluates nothing (EVAL_ITERS=0),
             # not even at the end of each chunk of steps
             "compile": compile_model, "enable_checkpoints": False, "eval_iters": 0,
             "log_interval": 10**9, "max_new_tokens": 0, "training_steps": 10**6,
             "run_name": "bench", "checkpoint_dir": str(workdir / "ckpt"),
             "log_dir": str(workdir / "logs"), "cache_dir": str(workdir / "cache")}
    values, sources = explicit_settings(flags=flags, env={})
    plan = resolve_plan(values, sources)
    return Lmtrain(plan.config, assemble(plan, Placement.join(plan.config.run.device)))


@dataclass
class Lmtrain:
    """lmtrain's side: its config and the assembled run."""

    config: Any
    run: Any  # lmtrain.train.state.LiveRun

    @property
    def device(self) -> torch.device:
        return self.run.parts.placement.device

    @property
    def data(self) -> Any:
        return self.run.parts.data

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.run.parts.raw_model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.run.parts.placement.precision


def lmtrain_side(ctx: Lmtrain) -> Side:
    from lmtrain.train.loop import run_training

    def run(n: int) -> None:
        run_training(*ctx.run, n)

    return Side("lmtrain", str(ctx.autocast_dtype or "fp32").replace("torch.", ""), run,
                ctx.raw_model)


def bare_side(name: str, ctx: Any, dtype: torch.dtype | None, lmtrain_optimizer: bool,
              seed: int) -> Side:
    """A nanoGPT-style loop over the same model class, data, batches and learning rate."""
    from lmtrain.models.gpt import GPT
    from lmtrain.train.optim import build_optimizer

    cfg = ctx.config
    device = ctx.device
    torch.manual_seed(seed)  # the same initial weights as lmtrain's side
    model = GPT(ctx.raw_model.config).to(device)
    if lmtrain_optimizer:
        opt = build_optimizer(model, cfg.optimization, device)
    else:  # torch's defaults: the per-tensor loop on the CPU
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR, betas=BETAS,
                                fused=device.type == "cuda" or None)
    train = ctx.data.train
    gen = torch.Generator().manual_seed(seed)
    B, T = cfg.optimization.batch_size, cfg.model.block_size
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype
                else contextlib.nullcontext)

    def run(n: int) -> None:
        model.train()
        for _ in range(n):
            ix = torch.randint(len(train) - T, (B,), generator=gen).tolist()
            x = torch.stack([torch.from_numpy(train[i:i + T].astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + T].astype(np.int64))
                             for i in ix])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

    return Side(name, str(dtype or "fp32").replace("torch.", ""), run, model)


def race(sides: list[Side], warmup: int, steps: int, chunk: int) -> None:
    """Warm every side up, then alternate timed chunks until each has run ``steps``."""
    for side in sides:
        side.chunk(warmup, timed=False)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for side in sides:
            side.chunk(n, timed=True)
        done += n


def val_loss(model: torch.nn.Module, ctx: Any, iters: int) -> float:
    """fp32 validation loss on fixed batches (the same for every side)."""
    from lmtrain.train.evaluate import estimate_loss

    cfg = ctx.config
    return estimate_loss(model, ctx.data, cfg.optimization.batch_size, cfg.model.block_size, iters,
                         ctx.device, cfg.optimization.seed)["val"]


# ---------------------------------------------------------------- FLOPs and matmul peak


def flops_per_token(model: Any) -> float:
    """Training FLOPs per token, as in the PaLM appendix / nanoGPT: 6N + 12·L·E·T."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


def matmul_tflops(dtype: torch.dtype, n: int, repeats: int, device: str = "cpu") -> float:
    """Best-of-``repeats`` TFLOPS of an n x n matmul in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize()
    best = min(_timed(lambda: (a @ b, synchronize())) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the four parts


def part_six(args: argparse.Namespace, workdir: Path) -> tuple[list[Side], Any, dict]:
    ctx = lmtrain_context(SIX, args, workdir / "six", args.compile)
    ours = lmtrain_side(ctx)
    plain = bare_side("plain loop", ctx, None, lmtrain_optimizer=False, seed=args.seed)
    for name, tensor in plain.model.state_dict().items():  # a fair start
        assert torch.equal(tensor, ctx.raw_model.state_dict()[name]), name
    race([ours, plain], args.warmup, args.steps, args.chunk)
    losses = {s.name: val_loss(s.model, ctx, args.eval_iters) for s in (ours, plain)}
    return [ours, plain], ctx, losses


def part_four(args: argparse.Namespace, workdir: Path) -> list[Side]:
    ctx = lmtrain_context(FOUR, args, workdir / "four", compile_model=False)
    ours = lmtrain_side(ctx)
    plain = bare_side("plain loop", ctx, None, lmtrain_optimizer=False, seed=args.seed)
    bare = bare_side("bare loop, same settings", ctx, ctx.autocast_dtype,
                     lmtrain_optimizer=True, seed=args.seed)
    race([ours, plain, bare], args.warmup, args.ref_steps, args.ref_chunk)
    return [ours, plain, bare]


def part_checkpoint(ctx: Lmtrain, workdir: Path, repeats: int) -> tuple[float, float]:
    """(median seconds to save the 6-layer checkpoint, seconds from it to one resumed step)."""
    from lmtrain.checkpoint import save_checkpoint
    from lmtrain.config import explicit_settings
    from lmtrain.train.build import assemble
    from lmtrain.train.loop import run_training
    from lmtrain.train.plan import resolve_plan
    from lmtrain.train.state import Placement

    path = workdir / "six" / "bench.pt"
    parts, progress, _, services = ctx.run
    saves = [_timed(lambda: save_checkpoint(path, services.checkpointer.state_dict(parts,
                                                                                    progress)))
             for _ in range(repeats)]
    t0 = time.perf_counter()
    values, sources = explicit_settings(
        flags={"checkpoint_path": str(path), "resume_steps": 1, "compile": False,
               "eval_iters": 0}, env={})  # to the end of the step, no evaluation around it
    plan = resolve_plan(values, sources)
    run_training(*assemble(plan, Placement.join(plan.config.run.device)), 1)
    return statistics.median(saves), time.perf_counter() - t0


# ---------------------------------------------------------------- e. whole processes

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Process:
    """One side of the whole-process race: a command line and what its runs reported."""

    name: str
    command: list[str]
    env: dict[str, str]
    optimizer: str
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # user + system seconds, all threads
    timings: list[dict[str, float]] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    precision: str = ""

    def run(self, tag: str, timed: bool) -> None:
        env = {**self.env, "RUN_NAME": f"{re.sub(r'[^a-z0-9]+', '-', self.name)}{tag}"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(self.command, env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = done.stdout + done.stderr
        if done.returncode:
            raise SystemExit(f"{self.name} failed ({done.returncode}):\n{out[-3000:]}")
        if not timed:
            return
        self.walls.append(wall)
        self.cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if m := re.search(r"^time: (.*)$", out, re.M):
            self.timings.append({k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", m[1])})
        if m := re.search(r"step (\d+)/\1: loss ([\d.na]+)", out):
            self.losses.append(m[2])
        if m := re.search(r"precision (\S+),", out):
            self.precision = m[1].replace("torch.", "").replace("bfloat16", "bf16")


def _setting_env() -> set[str]:
    from lmtrain.config import FIELDS, env_name

    return {env_name(name) for name in FIELDS}


def process_sides(args: argparse.Namespace, workdir: Path) -> list[Process]:
    """lmtrain's ``training.py`` (this checkout's, and ``--baseline``'s) and the plain loop."""
    shape = {"ARCH": "gpt2", "N_LAYER": SIX["n_layer"], "N_HEAD": SIX["n_head"],
             "N_EMBD": SIX["n_embd"], "BLOCK_SIZE": SIX["block_size"],
             "BATCH_SIZE": SIX["batch_size"], "DROPOUT": 0, "SEED": args.seed,
             "TRAINING_STEPS": args.process_steps, "ENABLE_CHECKPOINTS": 0,
             "EVAL_INTERVAL": 10**9, "MAX_NEW_TOKENS": 0, "PRECISION": args.precision,
             "DEVICE": args.device,
             "LOG_DIR": workdir / "logs", "CACHE_DIR": workdir / "cache"}
    clean = {k: v for k, v in os.environ.items() if k not in _setting_env()}
    clean.pop("PYTHONPATH", None)  # each training.py puts its own src/ first anyway

    def lmtrain(name: str, root: Path, optimizer: str, eval_iters: int) -> Process:
        env = {**clean, **{k: str(v) for k, v in shape.items()}, "OPTIMIZER": optimizer,
               "EVAL_ITERS": str(eval_iters)}
        return Process(name, [sys.executable, str(root / "training.py")], env, optimizer)

    sides = [lmtrain("lmtrain", ROOT, "adamw", args.process_eval_iters)]
    if args.baseline:
        sides.append(lmtrain(f"baseline (EVAL_ITERS={args.baseline_eval_iters})",
                             Path(args.baseline), "adamw", args.baseline_eval_iters))
    if args.with_muon:
        sides.append(lmtrain("lmtrain default optimizer", ROOT, "muon", args.process_eval_iters))
    plain = [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"),
             "--steps", str(args.process_steps), "--seed", str(args.seed)]
    precisions = ["bf16", "fp32"] if args.with_fp32 else ["bf16"]
    for precision in precisions:
        side = Process(f"plain loop {precision}", [*plain, "--precision", precision], clean,
                       "adamw", precision=precision)
        sides.append(side)
    return sides


def part_process(args: argparse.Namespace, workdir: Path) -> tuple[list[Process], tuple, tuple]:
    """Every side once untimed (caches, page cache), then ``--repeats`` rounds, alternating
    the order of the sides from round to round; returns the sides and the load averages."""
    sides = process_sides(args, workdir)
    for side in sides:
        for i in range(args.process_warmup):
            side.run(f"warmup{i}", timed=False)
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side.run(str(r), timed=True)
    return sides, load_before, os.getloadavg()


def report_process(args: argparse.Namespace, sides: list[Process], load_before: tuple,
                   load_after: tuple) -> None:
    plain = next(s for s in sides if s.name == "plain loop bf16")
    ours = sides[0]
    print(f"\n### e. whole processes: 6-layer GPT-2-style model (6 heads, N_EMBD=384, "
          f"BLOCK_SIZE=256, BATCH_SIZE=16, DROPOUT=0), {args.process_steps} steps, "
          f"{args.repeats} interleaved runs per side\n")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.1f}' for x in load_after)}; "
          f"lmtrain: ENABLE_CHECKPOINTS=0, EVAL_ITERS={args.process_eval_iters}, "
          f"MAX_NEW_TOKENS=0, PRECISION={args.precision}\n")
    print("| side | precision | optimizer | wall s (median) | min-max | plain bf16 / side | "
          "CPU s (median) | plain bf16 / side, CPU | mean train loss |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in sides:
        rounds = statistics.median(p / w for p, w in zip(plain.walls, s.walls, strict=True))
        print(f"| {s.name} | {s.precision} | {s.optimizer} | {statistics.median(s.walls):.2f} "
              f"| {min(s.walls):.1f}-{max(s.walls):.1f} "
              f"| {statistics.median(plain.walls) / statistics.median(s.walls):.3f}x "
              f"({rounds:.3f}x) | {statistics.median(s.cpus):.1f} "
              f"| {statistics.median(plain.cpus) / statistics.median(s.cpus):.3f}x "
              f"| {'/'.join(sorted(set(s.losses)))} |")
    keys = ("setup", "data", "train", "eval", "sample", "other", "total")
    print("\nWhere the time goes (medians, seconds):\n")
    print("| side | " + " | ".join(keys) + " | wall - total |")
    print("| --- | " + " | ".join("---:" for _ in keys) + " | ---: |")
    for s in sides:
        parts = [f"{statistics.median(t.get(k, 0.0) for t in s.timings):.2f}"
                 if any(k in t for t in s.timings) else "" for k in keys]
        outside = statistics.median(w - t["total"] for w, t in zip(s.walls, s.timings,
                                                                   strict=True))
        print(f"| {s.name} | " + " | ".join(parts) + f" | {outside:.2f} |")
    ratio = statistics.median(plain.walls) / statistics.median(ours.walls)
    print(f"\nlmtrain {ratio:.3f}x the plain bf16 loop as whole processes "
          f"(target >= 0.95: {verdict(ratio >= 0.95)}). plain bf16 / side: the ratio of the "
          "median wall times (in brackets: the median over rounds of each round's ratio); "
          "CPU s: user + system time of the process, all threads. setup ... total: each "
          "side's own `time:` line, medians (the plain loop's setup runs from its first line "
          "to its first step); wall - total: the interpreter, the imports and the settings "
          "before that, and the exit.")


# ---------------------------------------------------------------- report


def tok_s(side: Side, shape: dict[str, int]) -> float:
    return shape["batch_size"] * shape["block_size"] * side.steps / side.seconds


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from lmtrain.device import cpu_supports_bf16

    if torch.cuda.is_available():
        cpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host {cpu}"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, native bf16: {cpu_supports_bf16()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each part")
    parser.add_argument("--steps", type=int, default=None, help="timed 6-layer steps [40; 2]")
    parser.add_argument("--ref-steps", type=int, default=None, help="timed 4-layer steps "
                        "[300; 6]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first [3; 1]")
    parser.add_argument("--chunk", type=int, default=None, help="6-layer steps per turn [5; 1]")
    parser.add_argument("--ref-chunk", type=int, default=None, help="4-layer steps per turn "
                        "[25; 2]")
    parser.add_argument("--eval-iters", type=int, default=None, help="val batches [20; 2]")
    parser.add_argument("--precision", default="auto", help="lmtrain's PRECISION [auto]")
    parser.add_argument("--compile", action="store_true", help="COMPILE=1 on lmtrain's side")
    parser.add_argument("--dropout", type=float, default=0.1, help="DROPOUT, both sides [0.1]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--parts", default="in-process,process",
                        help="comma list: in-process (parts a-d), process (part e) [both]")
    parser.add_argument("--repeats", type=int, default=None,
                        help="whole-process runs per side [5; 1]")
    parser.add_argument("--process-steps", type=int, default=None,
                        help="TRAINING_STEPS of each whole process [40; 3]")
    parser.add_argument("--process-warmup", type=int, default=None,
                        help="untimed whole-process runs per side first [1; 0]")
    parser.add_argument("--process-eval-iters", type=int, default=0,
                        help="lmtrain's EVAL_ITERS in part e [0: evaluation off]")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="another checkout whose training.py is a side of part e")
    parser.add_argument("--baseline-eval-iters", type=int, default=1,
                        help="--baseline's EVAL_ITERS [1: before EVAL_ITERS=0 turned "
                             "evaluation off, the fewest]")
    parser.add_argument("--with-muon", action="store_true",
                        help="part e: also lmtrain with its default optimizer (Muon)")
    parser.add_argument("--with-fp32", action="store_true",
                        help="part e: also the plain loop in fp32")
    args = parser.parse_args()
    q = args.quick
    for name, full, quick in (("steps", 40, 2), ("ref_steps", 300, 6), ("warmup", 3, 1),
                              ("chunk", 5, 1), ("ref_chunk", 25, 2), ("eval_iters", 20, 2),
                              ("repeats", 5, 1), ("process_steps", 40, 3),
                              ("process_warmup", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    parts = {p.strip() for p in args.parts.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lmtrain").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "process" in parts:  # first: nothing of this process runs beside it
            process = part_process(args, workdir)
        if "in-process" in parts:
            six, six_ctx, losses = part_six(args, workdir)
            four = part_four(args, workdir)
            n = 1024 if q else (8192 if args.device.startswith("cuda") else 2048)
            peak = {"fp32": matmul_tflops(torch.float32, n, 3 if q else 10, args.device),
                    "bfloat16": matmul_tflops(torch.bfloat16, n, 3 if q else 10, args.device)}
            save_s, resume_s = part_checkpoint(six_ctx, workdir, 2 if q else 5)

    print(f"\nmachine: {machine()}" + ("  (--quick: smoke run, not a measurement)" if q else ""))
    if "process" in parts:
        report_process(args, *process)
    if "in-process" not in parts:
        return
    print(f"\n### a. 6-layer GPT (6 heads, N_EMBD=384, BLOCK_SIZE=256, BATCH_SIZE=16, "
          f"DROPOUT={args.dropout}), {args.steps} timed steps\n")
    print("| side | precision | tokens/s | ms/step | MFU | val loss after "
          f"{args.warmup + args.steps} steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    fpt = flops_per_token(six[0].model)
    for s in six:
        rate = tok_s(s, SIX)
        print(f"| {s.name}{' (compile)' if s.name == 'lmtrain' and args.compile else ''} "
              f"| {s.precision} | {rate:,.0f} | {1e3 * s.seconds / s.steps:,.0f} "
              f"| {rate * fpt / (peak[s.precision] * 1e12):.1%} | {losses[s.name]:.4f} |")
    ratio = tok_s(six[0], SIX) / tok_s(six[1], SIX)
    delta = abs(losses["lmtrain"] - losses["plain loop"])
    print(f"\nspeed-up {ratio:.2f}x (target >= 2.0: {verdict(ratio >= 2.0)}); "
          f"|Δ val loss| {delta:.4f} (target < 0.05: {verdict(delta < 0.05)})")

    print(f"\n### b. 4-layer reference (4 heads, N_EMBD=128, BLOCK_SIZE=64, BATCH_SIZE=12), "
          f"{args.ref_steps} timed steps\n")
    print("| side | precision | tokens/s | ms/step | MFU |")
    print("| --- | --- | --- | --- | --- |")
    fpt4 = flops_per_token(four[0].model)
    for s in four:
        rate = tok_s(s, FOUR)
        print(f"| {s.name} | {s.precision} | {rate:,.0f} | {1e3 * s.seconds / s.steps:.1f} "
              f"| {rate * fpt4 / (peak[s.precision] * 1e12):.1%} |")
    ratio4 = tok_s(four[0], FOUR) / tok_s(four[1], FOUR)
    overhead = four[0].seconds / four[2].seconds - 1
    print(f"\nlmtrain vs plain loop {ratio4:.2f}x (target >= 1.0: {verdict(ratio4 >= 1.0)}); "
          f"trainer overhead over the bare loop {overhead:+.1%} "
          f"(target < 5%: {verdict(overhead < 0.05)})")

    print("\n### c. matmul throughput on this machine\n")
    print("| dtype | TFLOPS | vs fp32 |")
    print("| --- | --- | --- |")
    for name, tflops in peak.items():
        print(f"| {name} | {tflops:.3f} | {tflops / peak['fp32']:.2f}x |")
    print("\n(MFU above = model FLOPs/s, 6N + 12·L·E·T per token, over the matmul peak of the "
          "side's dtype; the bf16/fp32 matmul ratio caps the speed-up bf16 autocast can give.)")

    print("\n### d. checkpoints (6-layer model, weights + AdamW state)\n")
    print("| operation | seconds | target |")
    print("| --- | --- | --- |")
    print(f"| save a checkpoint | {save_s:.3f} | < 0.5: {verdict(save_s < 0.5)} |")
    print(f"| checkpoint -> first resumed step (no imports) | {resume_s:.2f} "
          f"| < 3: {verdict(resume_s < 3)} |")


if __name__ == "__main__":
    main()
