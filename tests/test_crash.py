"""Crashes and faults: kill -9 at any moment, full disks, unwritable folders, non-finite losses."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import (
    checkpoint_filename,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
)
from lmtrain.durable import remove_stale_temp_files
from lmtrain.errors import UserError
from tests.conftest import ROOT, child_env, tiny_env

CRASH_ENV = tiny_env(batch_size=2, eval_iters=1, eval_interval=1_000_000, max_new_tokens=0,
                     training_steps=1_000_000, checkpoint_interval=1, log_interval=1000,
                     warmup_steps=1, keep_last_checkpoints=3, checkpoint_path="auto",
                     run_name="crash")


def start_training(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "training.py"], env=child_env(env), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def newest_step(folder: Path) -> int:
    found = list_checkpoints(folder)
    return found[-1][0] if found else 0


def assert_every_checkpoint_loads(folder: Path) -> list[int]:
    steps = []
    for step, path in list_checkpoints(folder):
        assert load_checkpoint(path)["step"] == step
        steps.append(step)
    return steps


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_bad_checkpoint(tmp_path, corpus):
    """Each launch auto-resumes the same run; SIGKILL lands mid-step or mid-write."""
    env = {**CRASH_ENV, "TRAINING_DATA_SOURCE": str(corpus),
           "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "LOG_DIR": str(tmp_path / "logs")}
    folder = tmp_path / "ckpt" / "crash"
    reached = []
    for delay in (0.0, 0.13, 0.37):
        before = newest_step(folder)
        proc = start_training(env)
        deadline = time.monotonic() + 90
        while newest_step(folder) <= before:  # wait until this launch has saved something
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        steps = assert_every_checkpoint_loads(folder)
        assert 1 <= len(steps) <= 4  # KEEP_LAST_CHECKPOINTS=3 (+ a best one)
        reached.append(steps[-1])
    assert reached == sorted(reached) and reached[-1] > reached[0]  # each launch resumed
    remove_stale_temp_files(folder)
    assert [p.name for p in folder.iterdir() if not p.name.startswith("step_")] == [".lock"]
    _, ckpt, problems = find_resumable(folder)
    assert problems == [] and ckpt.step == reached[-1]


@pytest.mark.integration
def test_kill_9_in_the_middle_of_a_write_keeps_the_old_file(tmp_path, tiny_checkpoint):
    target = tmp_path / checkpoint_filename(4)
    target.write_bytes(tiny_checkpoint.read_bytes())
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from lmtrain.durable import atomic_write\n"
        "def write(fh):\n"
        "    fh.write(b'PK\\x03\\x04 half of a new checkpoint')\n"
        "    fh.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(Path(sys.argv[1]), write)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert load_checkpoint(target)["step"] == 4  # the old file, whole
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]  # the leftover is ignored
    assert remove_stale_temp_files(tmp_path) == leftovers
    assert not leftovers[0].exists()


@pytest.mark.integration
def test_disk_full_mid_run_reports_and_keeps_the_previous_checkpoint(train_run, tmp_path,
                                                                     monkeypatch):
    real_save = torch.save
    calls = []

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(UserError) as err:
        train_run(training_steps=6, checkpoint_interval=1, run_name="full")
    message = str(err.value)
    assert "writing the step 2 checkpoint failed (No space left on device)" in message
    assert "step 1 checkpoint is intact" in message and "CHECKPOINT_DIR=" in message
    folder = tmp_path / "ckpt" / "full"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", checkpoint_filename(1)]
    assert load_checkpoint(folder / checkpoint_filename(1))["step"] == 1
    assert "resume with: CHECKPOINT_PATH=" in message and "step_0000001.pt" in message


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["checkpoint_dir", "log_dir"])
def test_uncreatable_folder_is_found_before_training(train_run, tmp_path, setting):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=rf"{setting.upper()}='.*a_file/.*' cannot be written"):
        train_run(training_steps=3, run_name="blocked", **{setting: str(blocker / "sub")})
    assert not list(tmp_path.rglob("metrics.jsonl"))  # training never started


@pytest.mark.unit
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write to read-only folders")
def test_read_only_checkpoint_dir_is_found_before_training(train_run, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"CHECKPOINT_DIR=.* cannot be written"):
            train_run(training_steps=3, checkpoint_dir=str(folder))
    finally:
        folder.chmod(0o700)


def nan_at_step(monkeypatch, bad_step: int) -> None:
    """Make the training loss non-finite at one optimizer step (1-based)."""
    import lmtrain.train.loop as loop

    real = loop.compute_loss
    calls = []

    def compute_loss(model, x, y):
        calls.append(1)
        loss = real(model, x, y)
        return loss * float("nan") if len(calls) == bad_step else loss

    monkeypatch.setattr(loop, "compute_loss", compute_loss)


def all_finite(ckpt) -> bool:
    return all(torch.isfinite(t).all() for t in ckpt[fmt.MODEL_STATE_KEY].values()
               if t.is_floating_point())


@pytest.mark.integration
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        train_run, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    with pytest.raises(UserError, match=r"loss became nan at step 3.*ON_NAN=skip"):
        train_run(training_steps=6, checkpoint_interval=1, run_name="nan", on_nan="stop")
    folder = tmp_path / "ckpt" / "nan"
    assert [s for s, _ in list_checkpoints(folder)] == [1, 2]
    assert all_finite(load_checkpoint(folder / checkpoint_filename(2)))


@pytest.mark.integration
def test_nan_loss_is_skipped_with_on_nan_skip(train_run, monkeypatch):
    nan_at_step(monkeypatch, 3)
    summary = train_run(training_steps=6, checkpoint_interval=3, on_nan="skip")
    assert summary.end_step == 6
    assert "step 3: loss is nan, step skipped (ON_NAN=skip)" in summary.log_file.read_text()
    assert all_finite(load_checkpoint(summary.checkpoint_dir / checkpoint_filename(6)))
