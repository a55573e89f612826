"""The last line of defence (issue 27): an internal error is one line naming what failed and
where its traceback was written, exit status 1; ``--debug`` / ``LMTRAIN_DEBUG=1`` show it; a
closed stdout ends quietly; bad input stays exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lmtrain.cli import main, run_guarded
from lmtrain.crash_report import BROKEN_PIPE, INTERNAL_ERROR
from lmtrain.errors import UserError
from tests.conftest import TINY


def _boom() -> int:
    raise ZeroDivisionError("the bug")


@pytest.mark.unit
def test_an_internal_error_is_one_line_and_its_traceback_a_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("LMTRAIN_DEBUG", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert run_guarded(_boom) == INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("internal error: ZeroDivisionError: the bug in lmtrain/")
    written = Path(err.split("the full traceback is in ")[1].split(";")[0])
    assert written.parent == tmp_path
    assert "Traceback" in written.read_text() and "_boom" in written.read_text()


@pytest.mark.unit
@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path, how):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    if how == "env":
        monkeypatch.setenv("LMTRAIN_DEBUG", "1")
    assert run_guarded(_boom, debug=how == "flag") == INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "internal error:" in err


@pytest.mark.unit
def test_bad_input_stays_exit_2_and_a_closed_pipe_is_quiet(capsys):
    def bad() -> int:
        raise UserError("TRAINING_STEPS='x' is not a number")

    assert run_guarded(bad) == 2
    assert capsys.readouterr().err == "error: TRAINING_STEPS='x' is not a number\n"

    def pipe() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    assert run_guarded(pipe) == BROKEN_PIPE


@pytest.mark.unit
def test_debug_flag_is_taken_anywhere_and_left_out_of_the_command(capsys):
    assert main(["--debug", "inspect", "/nonexistent/x.pt"]) == 2
    assert main(["inspect", "/nonexistent/x.pt", "--debug"]) == 2
    assert "unrecognized" not in capsys.readouterr().err


@pytest.mark.integration
def test_a_bug_in_a_training_run_is_logged_in_the_runs_log(corpus, run_dirs, monkeypatch,
                                                            capsys):
    import lmtrain.train.session as session

    def broken(*args, **kwargs):
        raise RuntimeError("loop bug")

    monkeypatch.setattr(session, "run_training", broken)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, **run_dirs}.items()
             if not isinstance(v, bool)]
    assert main(["train", *flags, f"--data={corpus}", "--training-steps=2"]) == INTERNAL_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("internal error: RuntimeError: loop bug")
    log_file = Path(err.split("the full traceback is in ")[1].split(";")[0])
    assert log_file.parent.parent == Path(run_dirs["log_dir"])
    assert "Traceback" in log_file.read_text() and "loop bug" in log_file.read_text()


@pytest.mark.integration
def test_inspect_into_a_closed_pipe_exits_quietly(tiny_checkpoint, tmp_path):
    import subprocess

    from tests.conftest import child_env

    lm = [sys.executable, "-m", "lmtrain", "inspect", str(tiny_checkpoint)]
    inspect = subprocess.Popen(lm, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=child_env(), cwd=tmp_path)
    assert inspect.stdout is not None
    inspect.stdout.read(5)
    inspect.stdout.close()  # as `| head -c5` does
    _, err = inspect.communicate(timeout=120)
    assert b"Traceback" not in err and b"Broken pipe" not in err, err
    assert inspect.returncode in (0, BROKEN_PIPE)
