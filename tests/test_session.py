"""The session's lifecycle (setup, train, save, close), the run-folder claim it takes, the
resume hints it gives, and the size of every function in src/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.run_folder import LOCK_NAME, RunLock, RunPaths, claim_run_folders
from lmtrain.signals import StopRequest
from lmtrain.train.session import Session
from tests.conftest import ROOT

MAX_FUNCTION_LINES = 60
PHASES = ("setup", "train", "save", "close")


def _record_phases(monkeypatch, calls: list[str], failing: str | None = None,
                   error: Exception | None = None) -> object:
    """Replace each phase of :class:`Session` by one that records its call (``failing`` raises
    ``error``); returns what ``save`` returns."""
    summary = object()

    def phase(name: str):
        def run(self):
            calls.append(name)
            if name == failing:
                raise error or UserError(f"{name} failed")
            return summary if name == "save" else None
        return run

    for name in PHASES:
        monkeypatch.setattr(Session, name, phase(name))
    return summary


@pytest.mark.unit
def test_a_session_runs_setup_train_save_then_close(monkeypatch):
    calls: list[str] = []
    summary = _record_phases(monkeypatch, calls)
    assert Session({}, {}, StopRequest()).run() is summary
    assert calls == list(PHASES)


@pytest.mark.unit
@pytest.mark.parametrize("failing", ["setup", "train", "save"])
@pytest.mark.parametrize("error", [UserError("bad"), TrainingInterrupted(2), RuntimeError("x")],
                         ids=["user-error", "stop", "crash"])
def test_close_runs_however_a_phase_ends_and_no_later_phase_does(monkeypatch, failing, error):
    calls: list[str] = []
    _record_phases(monkeypatch, calls, failing, error)
    with pytest.raises(type(error)):
        Session({}, {}, StopRequest()).run()
    assert calls == [*PHASES[:PHASES.index(failing) + 1], "close"]


@pytest.mark.unit
def test_claiming_run_folders_locks_them_for_the_block_and_removes_what_stayed_empty(tmp_path):
    paths = RunPaths.of(str(tmp_path / "ckpt"), str(tmp_path / "logs"), str(tmp_path / "out"),
                        "run")
    with claim_run_folders(paths, outputs=True):
        assert (paths.checkpoints / LOCK_NAME).is_file() and (paths.logs / LOCK_NAME).is_file()
        with pytest.raises(UserError, match="in use by"):
            RunLock(paths.logs).acquire("LOG_DIR")
        assert paths.outputs.is_dir()
        (paths.logs / "train.log").write_text("kept")
    assert not paths.checkpoints.exists()  # created here and left empty: removed
    assert (paths.logs / "train.log").is_file()
    with RunLock(paths.logs).acquire("LOG_DIR"):  # released
        pass


@pytest.mark.unit
def test_a_refused_claim_fails_on_every_rank_and_leaves_no_folder(tmp_path):
    paths = RunPaths.of(str(tmp_path / "ckpt"), str(tmp_path / "logs"), str(tmp_path / "out"),
                        "run")
    shared: list[object] = []

    def agree(value):  # what rank 0 says, as the process group would share it
        shared.append(value)
        return value

    with RunLock(paths.logs).acquire("LOG_DIR"):
        with pytest.raises(UserError, match="in use by"), claim_run_folders(paths, agree=agree):
            pass  # pragma: no cover
        assert shared and "in use by" in str(shared[0])
        assert not paths.checkpoints.exists()  # its lock was taken first, then let go
    with pytest.raises(UserError, match="in use by"), claim_run_folders(
            paths, is_main=False, agree=lambda _: "run folder 'x' is in use by pid 1"):
        pass  # pragma: no cover


@pytest.mark.unit
def test_resume_hints_point_at_the_newest_checkpoint_on_disk(tmp_path):
    from lmtrain.checkpoint import checkpoint_filename
    from lmtrain.progress import TrainProgress
    from lmtrain.train.resume import ResumeHints

    progress = TrainProgress(step=7)
    hints = ResumeHints(start=4, end=10, resumed_from="old.pt", checkpoint_dir=tmp_path,
                        training_steps=20)
    assert hints.checkpoint_on_disk(progress) == (4, "old.pt")
    progress.saved_steps = [6]
    assert hints.checkpoint_on_disk(progress) == (6, tmp_path / checkpoint_filename(6))
    assert hints.resume_steps(6) == 4  # a plain resume would run to 20
    error = hints.with_resume_command(UserError("disk full"), progress)
    assert str(error).startswith("disk full; resume with: CHECKPOINT_PATH=")
    assert "RESUME_STEPS=4" in str(error)
    stop = hints.interrupted(TrainingInterrupted(15), progress)
    assert (stop.step, stop.resume_steps) == (6, 4)
    fresh = ResumeHints(start=0, end=20, resumed_from=None, checkpoint_dir=tmp_path,
                        training_steps=20)
    assert fresh.interrupted(TrainingInterrupted(2), TrainProgress()).step is None  # not begun


def _long_functions(root: Path) -> list[str]:
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    return long


@pytest.mark.unit
def test_no_function_in_src_is_over_60_lines():
    assert not _long_functions(ROOT / "src"), _long_functions(ROOT / "src")


def _count_validations(monkeypatch) -> list[object]:
    """Record every validation of a whole config (``TrainingConfig.model_validate``)."""
    from lmtrain.config import TrainingConfig

    calls: list[object] = []
    real = TrainingConfig.model_validate.__func__  # type: ignore[attr-defined]

    def counted(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(TrainingConfig, "model_validate", classmethod(counted))
    return calls


@pytest.mark.integration
def test_a_run_validates_its_config_once(corpus, run_dirs, tiny_checkpoint, monkeypatch):
    from lmtrain.checkpoint import load_run
    from lmtrain.config import check_settings, explicit_settings
    from lmtrain.train.session import train

    calls = _count_validations(monkeypatch)
    fresh = explicit_settings(flags={"training_data_source": str(corpus), **run_dirs,
                                     "training_steps": 2, "max_new_tokens": 0}, env={})
    check_settings(*fresh)  # the front end's early check: each value alone
    train(*fresh)
    assert len(calls) == 1
    calls.clear()
    load_run(tiny_checkpoint)  # reading a checkpoint checks the settings saved in it
    reading = len(calls)
    calls.clear()
    resumed = explicit_settings(flags={"checkpoint_path": str(tiny_checkpoint), **run_dirs,
                                       "resume_steps": 1, "max_new_tokens": 0}, env={})
    check_settings(*resumed)
    train(*resumed)
    assert len(calls) == reading + 1  # the checkpoint read once, the merged settings once


@pytest.mark.unit
def test_only_the_session_places_the_process():
    """The process group is joined once, by the session (``Placement.join``); nothing below
    it falls back to joining it."""
    src = ROOT / "src" / "lmtrain"
    calls: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(getattr(func, "value", None), "id", "")
                if name == "init_distributed" or (owner, name) == ("Placement", "join"):
                    calls.setdefault(name, set()).add(str(path.relative_to(src)))
    assert calls == {"init_distributed": {"train/state.py"}, "join": {"train/session.py"}}
