"""The test suite's own hygiene: no test or child process reaches the user's cache or settings."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import child_env, run_entrypoint

PRINT_CACHE = "from lmtrain.data.prepare import default_cache_dir; print(default_cache_dir())"


def test_the_default_token_cache_is_private_to_the_test(tmp_path):
    from lmtrain.data.prepare import default_cache_dir

    assert default_cache_dir().is_relative_to(tmp_path)


def test_child_processes_get_the_private_cache_too(tmp_path):
    proc = run_entrypoint(["-c", PRINT_CACHE], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(tmp_path)


def test_child_processes_get_no_stray_settings(monkeypatch):
    monkeypatch.setenv("TRAINING_STEPS", "99")
    monkeypatch.setenv("CHECKPOINT_PATH", "auto")
    env = child_env({"N_LAYER": "1"})
    assert "TRAINING_STEPS" not in env and "CHECKPOINT_PATH" not in env
    assert env["N_LAYER"] == "1" and "XDG_CACHE_HOME" in env
