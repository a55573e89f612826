"""Shared fixtures: a small corpus and a helper that runs a real training session in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmtrain.config import DEFAULT_CORPUS, explicit_settings

ROOT = Path(__file__).resolve().parents[1]

#: Settings for a model small enough that a run takes about a second on one core.
TINY: dict[str, Any] = {
    "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 4,
    "eval_iters": 2, "eval_interval": 5, "log_interval": 1, "checkpoint_interval": 5,
    "max_new_tokens": 5, "warmup_steps": 2, "precision": "fp32", "device": "cpu",
}


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return Path(DEFAULT_CORPUS).read_text(encoding="utf-8")[:40_000]


@pytest.fixture
def corpus(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture
def run_dirs(tmp_path: Path) -> dict[str, str]:
    return {"checkpoint_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
            "output_dir": str(tmp_path / "out")}


@pytest.fixture
def train_run(corpus: Path, run_dirs: dict[str, str]):
    """Run a real session in-process with TINY settings plus overrides given as flags."""
    from lmtrain.train.session import train

    def run(**overrides: Any):
        flags = {**TINY, "training_data_source": str(corpus), **run_dirs, **overrides}
        values, sources = explicit_settings(flags=flags, env={})
        return train(values, sources)

    return run


def run_entrypoint(args: list[str], env: dict[str, str], cwd: Path,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with only ``env`` (plus PATH-like basics) set."""
    base = {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE",
                     "OPENBLAS_L2_SIZE", "PYTHONPATH")}
    return subprocess.run([sys.executable, *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
