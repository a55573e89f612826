"""The LoRA benchmarks: ``guard_lora_step.py`` (issue 28's guard, run here as the benchmark smoke)
passes lmtrain's bf16 LoRA step and fails loudly on the step issue 28 timed; ``environment.py``
describes what a benchmark ran on."""

from __future__ import annotations

import tomllib
from email.message import Message

import pytest
import torch

from tests.conftest import ROOT, load_script, run_entrypoint

pytest.importorskip("peft")
GUARD = str(ROOT / "benchmarks" / "guard_lora_step.py")


def bench_environment():
    return load_script("benchmarks/environment.py")


@pytest.mark.integration
def test_the_guard_passes_lmtrains_lora_bf16_step(tmp_path):
    # one thread: on a loaded machine two OpenMP threads per process wait on each other at
    # every operator, which makes both sides several times slower and the ratio noisy
    result = run_entrypoint([GUARD, "--quick", "--threads", "1"], env={}, cwd=tmp_path,
                            timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: lmtrain ")
    ratio = float(result.stdout.split("lmtrain / plain = ")[1].split()[0])
    assert 0 < ratio <= 1.5


@pytest.mark.integration
def test_the_guard_fails_loudly_on_a_step_that_also_evaluates(tmp_path):
    # issue 28: each timed "step" also evaluated EVAL_ITERS batches of both splits
    result = run_entrypoint([GUARD, "--quick", "--threads", "1", "--steps", "2", "--warmup", "1",
                             "--eval-iters", "20"], env={}, cwd=tmp_path, timeout=280)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: lmtrain's bf16 LoRA step is" in result.stderr
    assert f"torch {torch.__version__}" in result.stdout  # the environment explains the run
    assert "lmtrain extras:" in result.stdout


@pytest.mark.unit
def test_installed_extras_reads_the_packages_metadata(monkeypatch):
    env = bench_environment()
    meta = Message()
    for extra in ("present", "missing", "empty"):
        meta["Provides-Extra"] = extra
    for requirement in ('pytest>=8; extra == "present"', "torch>=2",
                        'pytest; extra == "missing"',
                        'no-such-distribution-lmtrain>=1; extra == "missing"'):
        meta["Requires-Dist"] = requirement
    monkeypatch.setattr(env.metadata, "metadata", lambda name: meta)
    assert env.installed_extras() == {"present": True, "missing": False, "empty": True}


@pytest.mark.unit
def test_installed_extras_names_every_extra_of_pyproject():
    env = bench_environment()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    extras = env.installed_extras()
    if not extras:
        pytest.skip("lmtrain is not installed (only on PYTHONPATH)")
    assert set(extras) == set(declared)
    assert extras["dev"] is True  # pytest, ruff, mypy... run this test


@pytest.mark.unit
def test_describe_names_the_torch_build_threads_and_allocator():
    text = "\n".join(bench_environment().describe())
    assert f"torch {torch.__version__}" in text
    assert f"threads: torch {torch.get_num_threads()}," in text
    assert "allocator: " in text and "native bf16" in text
