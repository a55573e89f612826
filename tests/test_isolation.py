"""The test suite's own hygiene: no test or child process reaches the user's HOME, cache or
settings, or the repository's working tree (see tests/conftest.py)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, home_variables, run_entrypoint

PRINT_HOME = ("import json, os; from lmtrain.data.prepare import default_cache_dir; "
              "print(json.dumps({'cache': str(default_cache_dir()), "
              "'env': {k: os.environ.get(k) for k in %r}}))")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


@pytest.mark.unit
def test_home_and_the_default_token_cache_are_private_to_the_test(tmp_path):
    from lmtrain.data.prepare import default_cache_dir

    assert default_cache_dir().is_relative_to(tmp_path)
    assert Path.home().is_relative_to(tmp_path)
    assert Path("~").expanduser() != Path(pwd.getpwuid(os.getuid()).pw_dir)
    for name in home_variables(Path()):
        assert Path(os.environ[name]).is_relative_to(tmp_path), name
    assert "CACHE_DIR" not in os.environ


@pytest.mark.unit
def test_child_processes_get_no_stray_settings(monkeypatch):
    monkeypatch.setenv("TRAINING_STEPS", "99")
    monkeypatch.setenv("CHECKPOINT_PATH", "auto")
    env = child_env({"N_LAYER": "1"})
    assert "TRAINING_STEPS" not in env and "CHECKPOINT_PATH" not in env
    assert env["N_LAYER"] == "1"
    assert {name: env[name] for name in home_variables(Path())} == {
        name: os.environ[name] for name in home_variables(Path())}


@pytest.mark.integration
def test_child_processes_get_the_private_home_and_cache_too(tmp_path):
    import json

    names = list(home_variables(Path()))
    proc = run_entrypoint(["-c", PRINT_HOME % names], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert Path(seen["cache"]).is_relative_to(tmp_path)
    assert all(Path(seen["env"][name]).is_relative_to(tmp_path) for name in names), seen


@pytest.mark.integration
def test_training_py_with_a_fresh_home_writes_nothing_there(tmp_path):
    """``python training.py`` with TEST_MODE=1, run as the suite runs children but with a fresh,
    empty HOME: the token cache goes to the test's XDG cache, the run's folders to the working
    directory, and the fresh HOME stays empty."""
    fresh, work = tmp_path / "fresh-home", tmp_path / "work"
    fresh.mkdir()
    work.mkdir()
    proc = run_entrypoint([str(ROOT / "training.py")], {"HOME": str(fresh), "TEST_MODE": "1"},
                          work, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert files_under(fresh) == []
    assert files_under(Path(os.environ["XDG_CACHE_HOME"]) / "lmtrain" / "tokens")
    assert {p.name for p in work.iterdir()} <= {"checkpoints", "logs", "outputs"}
