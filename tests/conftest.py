"""Shared fixtures, the two test lanes, and the rule that tests write only to temporary folders.

Lanes
-----
Every test is in exactly one lane, chosen with a mark:

``unit``
    In-process and quick (well under a second): no child process and no training run. A unit
    test may start a session that is refused before its first step, and may read the shared
    ``tiny_checkpoint`` (one short run per session). ``make test-fast`` (``pytest -m unit``,
    one thread) runs this lane in under a minute on two cores.
``integration``
    Everything else: child processes (``python training.py``, ``lmtrain …``, torchrun), crash
    and signal tests, training runs in-process or not, pretrained-model folders, anything slow.
``fuzz``
    Hypothesis drawing hostile settings, records and checkpoints (``tests/test_fuzz.py``): a
    fixed, derandomized budget under three minutes in ``make test``; ``make fuzz`` runs many
    more examples. ``make test`` runs all three lanes (and ruff).

A file whose tests share a lane says so once (``pytestmark = pytest.mark.unit``); a file with
both marks each test. A test with no lane, or both, stops collection with its name. ``slow``
marks the heaviest integration tests (several processes, many steps) for ``-m "not slow"``.

Temporary folders only
----------------------
Before any test module is imported, ``pytest_configure`` points ``HOME`` and the XDG folders
(cache, config, data, state) at a fresh temporary folder, and moves hypothesis' example store
and matplotlib's font cache there too; variables that would send output elsewhere
(``CACHE_DIR``, ``HF_HOME``, …) are dropped. Every test then gets its own ``HOME`` under its
``tmp_path`` (so the default token cache, ``<XDG_CACHE_HOME>/lmtrain/tokens``, is the test's
own), and :func:`child_env` hands those variables to every child process. At the end of the
session, :func:`_nothing_written_outside_temporary_folders` fails if anything landed in the
session's ``HOME`` (a session fixture or import that missed its own folder) or in the
repository's working tree (``checkpoints/``, ``logs/``, ``outputs/``, ``.hypothesis/``, …).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from lmtrain.config import DEFAULT_CORPUS, explicit_settings

ROOT = Path(__file__).resolve().parents[1]
LANES = frozenset({"unit", "integration", "fuzz"})

#: Variables that send output somewhere of the developer's choosing: dropped for the session.
WRITES_ELSEWHERE = ("CACHE_DIR", "CHECKPOINT_DIR", "LOG_DIR", "OUTPUT_DIR", "HF_HOME",
                    "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME",
                    "TIKTOKEN_CACHE_DIR", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                    "WANDB_DATA_DIR", "MLFLOW_TRACKING_URI")
#: Folders a run writes relative to its working directory (lmtrain's defaults, the trackers',
#: hypothesis'): none may appear in, or gain files in, the repository's working tree.
OUTPUT_FOLDERS = ("checkpoints", "logs", "outputs", "runs", "mlruns", "wandb", ".hypothesis")
#: What the working tree may gain from tools themselves.
TOOL_CACHES = frozenset({".pytest_cache", "__pycache__", ".ruff_cache", ".mypy_cache"})
SANDBOX = pytest.StashKey[Path]()


def home_variables(home: Path) -> dict[str, str]:
    """``HOME`` and the XDG base folders (cache, config, data, state), all inside ``home``."""
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state")}


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported: a temporary HOME for the whole session (see above)."""
    sandbox = Path(tempfile.mkdtemp(prefix="lmtrain-tests-"))
    config.add_cleanup(lambda: shutil.rmtree(sandbox, ignore_errors=True))
    config.stash[SANDBOX] = sandbox
    (sandbox / "home").mkdir()
    for name in WRITES_ELSEWHERE:
        os.environ.pop(name, None)
    os.environ.update(home_variables(sandbox / "home"))
    os.environ["MPLCONFIGDIR"] = str(sandbox / "matplotlib")  # its font cache, for all tests
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(sandbox / "hypothesis")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is in exactly one lane (before ``-m`` picks one)."""
    wrong = []
    for item in items:
        lanes = sorted({mark.name for mark in item.iter_markers() if mark.name in LANES})
        if len(lanes) != 1:
            wrong.append(f"  {item.nodeid}: {' and '.join(lanes) or 'no lane'}")
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one lane, @pytest.mark.unit, @pytest.mark.integration "
            "or @pytest.mark.fuzz "
            "(see tests/conftest.py):\n" + "\n".join(wrong))


def _working_tree_outputs() -> set[str]:
    """The working tree's top-level entries and everything in its output folders."""
    found = {p.name for p in ROOT.iterdir() if p.name not in TOOL_CACHES}
    for name in OUTPUT_FOLDERS:
        found |= {str(p.relative_to(ROOT)) for p in (ROOT / name).rglob("*")}
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_outside_temporary_folders(pytestconfig: pytest.Config) -> Iterator[None]:
    """Fails the session if anything reached its shared HOME or the repository's working tree."""
    before = _working_tree_outputs()
    yield
    home = pytestconfig.stash[SANDBOX] / "home"
    problems = []
    if stray := sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir()):
        problems.append(f"written to the session's HOME {home}, outside every test's tmp_path "
                        f"(a session fixture or an import missed its own folder): {stray}")
    if litter := sorted(_working_tree_outputs() - before):
        problems.append(f"written into the working tree {ROOT}: {litter}")
    assert not problems, "\n".join(problems)


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
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HOME`` and the XDG folders of each test inside its tmp_path: the default token cache
    (``<XDG_CACHE_HOME>/lmtrain/tokens``) and anything else a library keeps there are its own."""
    (tmp_path / "home").mkdir()
    for name, value in home_variables(tmp_path / "home").items():
        monkeypatch.setenv(name, value)


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


def token_data(cfg: Any) -> Any:
    """The run's (tokenizer, token data) for config ``cfg``, as a training run loads them."""
    from lmtrain.data.prepare import load_token_data

    return load_token_data(cfg.data, block_size=cfg.model.block_size)


def data_config(source: Path | str, tmp_path: Path, **settings: Any) -> Any:
    """A config that reads ``source`` and caches tokens under ``tmp_path`` (flat settings)."""
    from lmtrain.config import TrainingConfig

    return TrainingConfig.from_flat(**{"training_data_source": str(source),
                                       "cache_dir": str(tmp_path / "cache"), **settings})


def load_script(relative: str, name: str | None = None) -> Any:
    """A script of the repository (``benchmarks/…``, ``tools/…``) imported as a module; under
    ``name`` in ``sys.modules`` when given (dataclasses look their module up)."""
    import importlib.util

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    if name:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """``records`` as JSON lines at ``path``."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def live_run(values: dict[str, Any], sources: dict[str, str]) -> Any:
    """A run assembled as the session assembles it, in one CPU process: its components,
    progress, loop settings and services (``parts, progress, settings, services``)."""
    from types import SimpleNamespace

    import torch

    from lmtrain.train.build import prepare_run
    from lmtrain.train.checkpointing import Checkpointer
    from lmtrain.train.plan import resolve_plan
    from lmtrain.train.state import LoopSettings, Placement, RunServices

    plan = resolve_plan(values, sources)
    parts, progress = prepare_run(plan, Placement(torch.device("cpu")))
    return SimpleNamespace(plan=plan, parts=parts, progress=progress,
                           settings=LoopSettings.of(plan.config),
                           services=RunServices(Checkpointer.of(plan)))


def tiny_env(**overrides: Any) -> dict[str, str]:
    """``TINY`` (with ``overrides``) as the environment variables of ``python training.py``."""
    values = {**TINY, **overrides}
    return {k.upper(): str(int(v)) if isinstance(v, bool) else str(v) for k, v in values.items()}


#: What a child process keeps of this one's environment: no stray settings, and the test's own
#: HOME and XDG folders (see ``_private_home``), so no child writes to the user's.
CHILD_BASICS = ("PATH", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                "PYTHONPATH", *home_variables(Path()), "MPLCONFIGDIR")


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
             "log_dir": str(root / "logs"), "output_dir": str(root / "out"),
             "cache_dir": str(root / "cache")}
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
