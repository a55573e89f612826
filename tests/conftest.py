"""Shared fixtures: a small corpus and a helper that runs a real training session in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
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
    # the first release's recipe; tests of ARCH=llama / OPTIMIZER=muon set them
    "arch": "gpt2", "optimizer": "adamw", "dropout": 0.1,
}


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file as plain data (``weights_only``), on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def train_losses(metrics_file: Path, since: int = 0) -> dict[int, float]:
    """Step -> logged training loss, for the steps after ``since``."""
    from lmtrain.reporting import read_metrics

    return {r["step"]: r["train_loss"] for r in read_metrics(metrics_file)
            if r.get("kind") == "train" and r["step"] > since}


def whole_and_resumed(train_run, total: int = 14, split: int = 6, **common: Any):
    """``total`` steps in one run, and ``split`` steps then a resume of the rest:
    (whole, part, resumed) run summaries, for exact-resume tests."""
    whole = train_run(training_steps=total, run_name="whole", **common)
    part = train_run(training_steps=split, run_name="part", **common)
    resumed = train_run(checkpoint_path=str(part.checkpoint_dir / f"step_{split:07d}.pt"),
                        resume_steps=total - split, **common)
    return whole, part, resumed


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the default token cache (under the user cache dir) inside the test's tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


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
            "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}


@pytest.fixture
def train_run(corpus: Path, run_dirs: dict[str, str]):
    """Run a real session in-process with TINY settings plus overrides given as flags."""
    from lmtrain.train.session import train

    def run(**overrides: Any):
        tiny = dict(TINY)
        if overrides.get("model_type") == "gpt2" or overrides.get("checkpoint_path"):
            for name in ("n_layer", "n_head", "n_embd"):  # the model's / the checkpoint's
                tiny.pop(name)
        flags = {**tiny, "training_data_source": str(corpus), **run_dirs, **overrides}
        values, sources = explicit_settings(flags=flags, env={})
        return train(values, sources)

    return run


def tiny_env(**overrides: Any) -> dict[str, str]:
    """``TINY`` (with ``overrides``) as the environment variables of ``python training.py``."""
    values = {**TINY, **overrides}
    return {k.upper(): str(int(v)) if isinstance(v, bool) else str(v) for k, v in values.items()}


#: What a child process keeps of this one's environment: no stray settings, and the test's own
#: XDG_CACHE_HOME (see ``_private_user_cache``), so no child writes to the user's cache.
CHILD_BASICS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE", "PYTHONPATH", "XDG_CACHE_HOME")


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: the basics of this one, then ``env``."""
    return {**{k: v for k, v in os.environ.items() if k in CHILD_BASICS}, **(env or {})}


def run_entrypoint(args: list[str], env: dict[str, str], cwd: Path,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with only ``env`` (plus :func:`child_env`'s basics) set."""
    return subprocess.run([sys.executable, *args], env=child_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, corpus_text: str) -> Path:
    """One real checkpoint (step 4 of a TINY run with an evaluation at step 4); do not modify."""
    from lmtrain.train.session import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    (root / "corpus.txt").write_text(corpus_text, encoding="utf-8")
    flags = {**TINY, "training_data_source": str(root / "corpus.txt"), "training_steps": 4,
             "eval_interval": 4, "checkpoint_interval": 4, "max_new_tokens": 0,
             "run_name": "tiny", "checkpoint_dir": str(root / "ckpt"),
             "log_dir": str(root / "logs"), "output_dir": str(root / "out")}
    values, sources = explicit_settings(flags=flags, env={})
    summary = train(values, sources)
    return summary.checkpoint_dir / "step_0000004.pt"


def save_tiny_gpt2(folder: Path, seed: int = 0, vocab_size: int = 50257, n_embd: int = 64) -> Path:
    """A tiny random ``GPT2LMHeadModel`` (2 layers, width 64, 64 positions) in ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, n_positions=64, vocab_size=vocab_size)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 saved with ``save_pretrained``, real vocabulary size; do not modify."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture
def qa_corpus(tmp_path: Path) -> Path:
    """A few KB of question/answer lines."""
    pairs = [("What is the capital of France?", "Paris."), ("Who wrote Hamlet?", "Shakespeare."),
             ("How many legs has a spider?", "Eight."), ("What colour is the sky?", "Blue."),
             ("What is two plus two?", "Four."), ("Where do penguins live?", "Antarctica.")]
    lines = [f"QUESTION: {q} ANSWER: {a}" for _ in range(25) for q, a in pairs]
    path = tmp_path / "qa.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
