"""SIGINT / SIGTERM: a clean stop with a checkpoint and the command that resumes it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain.checkpoint import checkpoint_filename, list_checkpoints, load_checkpoint
from lmtrain.cli import run_guarded
from lmtrain.errors import TrainingInterrupted
from lmtrain.reporting import read_metrics
from lmtrain.signals import interruption_report, resume_commands
from tests.conftest import ROOT, child_env, run_entrypoint, tiny_env

SIG_ENV = tiny_env(batch_size=2, eval_iters=1, eval_interval=1_000_000, max_new_tokens=0,
                   training_steps=1_000_000, checkpoint_interval=1_000_000, warmup_steps=1,
                   run_name="sig")


def train_until_running(env: dict[str, str], metrics: Path) -> subprocess.Popen:
    """Start ``python training.py`` and return once it has logged a training step."""
    proc = subprocess.Popen([sys.executable, "training.py"], env=child_env(env),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (metrics.exists() and any(r.get("kind") == "train"
                                        for r in read_metrics(metrics))):
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.05)
    return proc


def send_self(signum: int) -> None:
    """Signal this test process, but only while lmtrain's handler would catch it."""
    assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
    os.kill(os.getpid(), signum)


def sigterm_during_step(monkeypatch: pytest.MonkeyPatch, step: int = 3) -> None:
    """SIGTERM this process during the ``step``-th training step's loss (in-process runs)."""
    import lmtrain.train.loop as loop

    real, calls = loop.compute_loss, []

    def compute_loss(model, x, y):
        calls.append(1)
        if len(calls) == step:
            send_self(signal.SIGTERM)  # arrives during that step
        return real(model, x, y)

    monkeypatch.setattr(loop, "compute_loss", compute_loss)


@pytest.fixture
def sig_env(tmp_path, corpus):
    return {**SIG_ENV, "TRAINING_DATA_SOURCE": str(corpus),
            "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "LOG_DIR": str(tmp_path / "logs")}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_prints_the_resume_command_and_exits(tmp_path, sig_env, signum, status):
    proc = train_until_running(sig_env, tmp_path / "logs" / "sig" / "metrics.jsonl")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err + out
    steps = [s for s, _ in list_checkpoints(tmp_path / "ckpt" / "sig")]
    assert len(steps) == 1
    ckpt_path = tmp_path / "ckpt" / "sig" / checkpoint_filename(steps[0])
    assert load_checkpoint(ckpt_path)["step"] == steps[0] > 0
    assert f"interrupted by {signal.Signals(signum).name} at step {steps[0]}" in err
    env_cmd, cli_cmd = resume_commands(ckpt_path)
    assert env_cmd in err and cli_cmd in err
    if signum != signal.SIGINT:
        return
    # The printed command resumes the run (with a short RESUME_STEPS for the test).
    words = shlex.split(env_cmd)
    assert words[-2:] == ["python", "training.py"]
    resume_env = dict(w.split("=", 1) for w in words[:-2])
    resumed = run_entrypoint(["training.py"], {**sig_env, **resume_env, "RESUME_STEPS": "2"},
                             ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {steps[0]} for 2 steps" in resumed.stdout


@pytest.mark.integration
def test_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from lmtrain.signals import stop_on_signals\n"
        "with stop_on_signals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.signum == signal.SIGTERM\n"
        "    print('first handled', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('still running')\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 130
    assert "first handled" in proc.stdout and "still running" not in proc.stdout
    assert "SIGINT again: exiting now" in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 0.01, 0.05, 0.2, 0.5, 1.0])
def test_a_second_sigint_always_exits_at_once_and_cleanly(tmp_path, sig_env, gap):
    """Whenever the second signal lands (while saving, while reporting, while the interpreter
    shuts down): exit status 130, no traceback, every checkpoint on disk whole."""
    proc = train_until_running(sig_env, tmp_path / "logs" / "sig" / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    proc.send_signal(signal.SIGINT)  # no-op once the process is gone
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err + out
    assert "SIGINT again: exiting now" in err or "resume it with:" in err
    for step, path in list_checkpoints(tmp_path / "ckpt" / "sig"):
        assert load_checkpoint(path)["step"] == step


@pytest.mark.integration
def test_handlers_are_restored_after_training(train_run):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train_run(training_steps=2, max_new_tokens=0)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.integration
def test_signal_in_process_stops_after_the_current_step(train_run, tmp_path, monkeypatch):
    sigterm_during_step(monkeypatch)
    with pytest.raises(TrainingInterrupted) as err:
        train_run(training_steps=50, checkpoint_interval=100, run_name="inproc")
    exc = err.value
    assert (exc.signum, exc.step, exc.exit_code) == (signal.SIGTERM, 3, 143)
    assert exc.checkpoint == tmp_path / "ckpt" / "inproc" / checkpoint_filename(3)
    assert exc.resume_steps is None  # a plain resume runs the 47 planned steps
    assert load_checkpoint(exc.checkpoint)["step"] == 3


@pytest.mark.unit
def test_signal_before_training_starts(train_run, monkeypatch, capsys):
    import lmtrain.train.session as session

    real = session.assemble

    def prepare_with_signal(*args, **kwargs):
        send_self(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "assemble", prepare_with_signal)
    status = run_guarded(lambda: train_run(training_steps=5, run_name="early") and 0)
    assert status == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT before training started; nothing was written" in err


@pytest.mark.unit
def test_signal_before_a_resumed_run_starts_points_back_to_its_checkpoint(
        train_run, tiny_checkpoint, monkeypatch):
    import lmtrain.train.session as session

    real = session.assemble
    monkeypatch.setattr(session, "assemble", lambda *a, **k: (
        send_self(signal.SIGTERM), real(*a, **k))[1])
    with pytest.raises(TrainingInterrupted) as err:
        train_run(checkpoint_path=str(tiny_checkpoint), resume_steps=7)
    exc = err.value
    assert (str(exc.checkpoint), exc.step, exc.resume_steps) == (str(tiny_checkpoint), 4, 7)
    report = interruption_report(exc)
    assert "RESUME_STEPS=7 python training.py" in report and "--resume-steps 7" in report


@pytest.mark.unit
def test_resume_commands_quote_paths():
    env_cmd, cli_cmd = resume_commands(Path("/runs/my run/step_0000010.pt"), 25)
    assert env_cmd == "CHECKPOINT_PATH='/runs/my run/step_0000010.pt' RESUME_STEPS=25 " \
                      "python training.py"
    assert cli_cmd == "lmtrain train --resume '/runs/my run/step_0000010.pt' --resume-steps 25"


@pytest.mark.unit
def test_interrupted_without_checkpoints_says_so():
    exc = TrainingInterrupted(signal.SIGINT, None, step=12)
    assert "no checkpoint was written" in interruption_report(exc)


@pytest.mark.unit
def test_a_stop_agreed_between_ranks_stops_the_rank_that_saw_no_signal():
    from lmtrain.signals import StopRequest

    request = StopRequest()
    request.share(None)  # no rank saw a signal
    request.check()  # nothing asked for
    request.share(signal.SIGTERM)  # another rank's signal, shared by the loop every step
    with pytest.raises(TrainingInterrupted) as err:
        request.check()
    assert err.value.signum == signal.SIGTERM


def _start_and_wait_for(env: dict[str, str], log_dir: Path, text: str) -> subprocess.Popen:
    """Start ``python training.py``; return once its log holds ``text``."""
    proc = subprocess.Popen([sys.executable, "training.py"], env=child_env(env), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not any(text in p.read_text(errors="replace") for p in log_dir.rglob("*.log")):
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        assert time.monotonic() < deadline, f"the run never logged {text!r}"
        time.sleep(0.05)
    return proc


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_during_the_end_of_run_sample_stops_promptly(tmp_path, sig_env):
    env = {**sig_env, "TRAINING_STEPS": "2", "EVAL_ITERS": "1",
           "MAX_NEW_TOKENS": "1000000", "CHECKPOINT_INTERVAL": "2"}
    proc = _start_and_wait_for(env, tmp_path / "logs", "final: val loss")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, "the sample was not cut short"
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted by SIGTERM at step 2" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt" / "sig")] == [2]


@pytest.mark.integration
@pytest.mark.slow
def test_sigint_during_a_long_evaluation_stops_promptly(tmp_path, sig_env):
    env = {**sig_env, "EVAL_INTERVAL": "3", "EVAL_ITERS": "1000000"}
    proc = _start_and_wait_for(env, tmp_path / "logs", "step 3/")
    time.sleep(0.5)  # inside the evaluation of step 3
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, "the evaluation was not cut short"
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted by SIGINT at step 3" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt" / "sig")] == [3]
