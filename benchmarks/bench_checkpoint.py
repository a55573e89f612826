"""What integrity and validation cost: the 6-layer / 384-wide GPT checkpoint saved with and
without its content digest, loaded with and without validation, and resumed to one step.

    python benchmarks/bench_checkpoint.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.checkpoint_format import content_digest
from lmtrain.config import explicit_settings
from lmtrain.durable import atomic_write
from lmtrain.train.build import assemble
from lmtrain.train.loop import run_training
from lmtrain.train.plan import resolve_plan
from lmtrain.train.state import LiveRun, Placement

SIX = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 8}


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _assembled(flags: dict) -> LiveRun:
    plan = resolve_plan(*explicit_settings(flags=flags, env={}))
    return assemble(plan, Placement(torch.device("cpu")))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    dirs = {"checkpoint_dir": str(work / "ckpt"), "log_dir": str(work / "logs"),
            "cache_dir": str(work / "cache"), "device": "cpu"}
    flags = {**SIX, **dirs, "precision": "fp32", "run_name": "six", "max_new_tokens": 0,
             "training_steps": 2, "checkpoint_interval": 100, "eval_iters": 1}
    run = _assembled(flags)
    run_training(*run, 1)  # the optimizer state exists

    def build_checkpoint() -> dict:
        return run.services.checkpointer.state_dict(run.parts, run.progress)

    payload = build_checkpoint()
    path = work / "ckpt" / "six" / "step_0000001.pt"
    plain = timed(lambda: atomic_write(path, lambda fh: torch.save(payload, fh)))
    digest = timed(lambda: content_digest(payload))
    sealed = timed(lambda: save_checkpoint(path, build_checkpoint()))
    bare = timed(lambda: torch.load(path, weights_only=True), 3)
    checked = timed(lambda: load_checkpoint(path), 3)
    resume = {**dirs, "checkpoint_path": str(path), "resume_steps": 1, "eval_iters": 1,
              "enable_checkpoints": False}
    t0 = time.perf_counter()
    plan = resolve_plan(*explicit_settings(flags=resume, env={}))
    t_plan = time.perf_counter() - t0
    resumed = assemble(plan, Placement(torch.device("cpu")))
    t_ready = time.perf_counter() - t0
    run_training(*resumed, 1)
    t_step = time.perf_counter() - t0
    print(f"checkpoint {path.stat().st_size / 1e6:.1f} MB, torch {torch.__version__}")
    print(f"save: {plain:.3f}s plain, {sealed:.3f}s with digest (digest alone {digest:.3f}s)")
    print(f"load: {bare:.3f}s bare torch.load, {checked:.3f}s validated + digest checked")
    print(f"resume: plan {t_plan:.2f}s, ready to train {t_ready:.2f}s, first step done "
          f"{t_step:.2f}s")


if __name__ == "__main__":
    main()
