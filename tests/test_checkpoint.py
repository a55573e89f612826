"""Checkpoint files: safe loading, validation, auto-resume, rotation and compatibility."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import (
    checkpoint_filename,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from lmtrain.checkpoint_format import FORMAT_VERSION
from lmtrain.cli import main
from lmtrain.durable import remove_stale_temp_files
from lmtrain.errors import UserError
from tests.conftest import ROOT, run_entrypoint

SRC = ROOT / "src" / "lmtrain"


def copy_checkpoint(src: Path, dest: Path, **changes) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt.update(changes)
    save_checkpoint(dest, ckpt)
    return dest


class RunsCode:
    """Unpickling this would call ``os.system`` and create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- safe loading -------------------------------------------------------------------------

@pytest.mark.integration
def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, tiny_checkpoint):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**ckpt, "payload": RunsCode(marker)}, evil)
    with pytest.raises(UserError, match=r"refused and nothing in it was run.*posix.system"):
        load_checkpoint(evil)
    assert not marker.exists()
    assert main(["inspect", str(evil)]) == 2
    assert main(["train", "--resume", str(evil)]) == 2
    assert not marker.exists()


@pytest.mark.unit
def test_plain_pickle_file_is_not_a_checkpoint_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(RunsCode(marker)))  # not a torch.save archive at all
    with pytest.raises(UserError, match=r"not a checkpoint: not a torch\.save archive"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.unit
@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b""])
def test_file_that_is_not_a_checkpoint_is_told_apart_from_unsafe(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a checkpoint") as err:
        load_checkpoint(path)
    assert "refused" not in str(err.value)


@pytest.mark.unit
def test_truncated_checkpoint_is_reported(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"(not a checkpoint|truncated or corrupt)"):
            load_checkpoint(path)


@pytest.mark.unit
def test_torch_file_that_is_not_an_lmtrain_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds a Tensor, not a dict"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"step": 3}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="lacks format_version"):
        load_checkpoint(tmp_path / "partial.pt")


@pytest.mark.unit
def test_future_format_version_asks_for_an_upgrade(tmp_path, tiny_checkpoint):
    future = copy_checkpoint(tiny_checkpoint, tmp_path / "future.pt",
                             format_version=FORMAT_VERSION + 1)
    with pytest.raises(UserError, match=rf"format version {FORMAT_VERSION + 1}, newer .* upgrade"):
        load_checkpoint(future)
    assert main(["train", "--resume", str(future)]) == 2


@pytest.mark.unit
def test_every_torch_load_in_the_code_base_is_weights_only():
    """``torch.load`` only with ``weights_only=True``; no raw pickle loading at all."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            name = f"{getattr(owner, 'id', '?')}.{node.func.attr}"
            if name in ("pickle.load", "pickle.loads", "torch.load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
                if not safe or name != "torch.load":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []


# --- leftovers, auto-resume ------------------------------------------------------------------

@pytest.mark.unit
def test_stale_temp_files_are_ignored_and_removed(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint, tmp_path / checkpoint_filename(4))
    dead = tmp_path / ".tmp-999999999-abc.part"  # no such process
    legacy = tmp_path / ".tmp-xyz.part"
    live = tmp_path / f".tmp-{os.getppid()}-abc.part"  # a writer that is still running
    from lmtrain.durable import _host_tag

    dead_here = tmp_path / f".tmp-999999999@{_host_tag()}-abc.part"
    other_host = tmp_path / ".tmp-999999999@some_other_node-abc.part"  # cannot be checked
    for p in (dead, legacy, live, dead_here, other_host):
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([dead, legacy, dead_here])
    assert live.exists() and other_host.exists()
    assert (tmp_path / checkpoint_filename(4)).exists()


@pytest.mark.unit
def test_find_resumable_skips_a_corrupt_newest_file(tmp_path, tiny_checkpoint):
    for step in (4, 8, 12):
        copy_checkpoint(tiny_checkpoint, tmp_path / checkpoint_filename(step), step=step)
    data = (tmp_path / checkpoint_filename(12)).read_bytes()
    (tmp_path / checkpoint_filename(12)).write_bytes(data[: len(data) // 3])
    (tmp_path / checkpoint_filename(16)).write_text("garbage")
    path, ckpt, problems = find_resumable(tmp_path)
    assert path == tmp_path / checkpoint_filename(8) and ckpt.step == 8
    assert [p.split(":")[0] for p in problems] == ["skipped step_0000016.pt",
                                                   "skipped step_0000012.pt"]
    assert find_resumable(tmp_path / "missing") == (None, None, [])


@pytest.mark.integration
def test_auto_resume_starts_fresh_then_resumes_the_newest_valid(train_run, tmp_path):
    first = train_run(checkpoint_path="auto", training_steps=6, checkpoint_interval=3)
    assert first.run_name == "from_scratch-corpus"  # stable: no timestamp
    assert first.checkpoint_dir == tmp_path / "ckpt" / "from_scratch-corpus"
    assert first.start_step == 0
    assert "no usable checkpoint" in first.log_file.read_text()

    second = train_run(checkpoint_path="auto", training_steps=9, checkpoint_interval=3)
    assert (second.run_name, second.start_step, second.end_step) == (first.run_name, 6, 9)
    assert "CHECKPOINT_PATH=auto: resuming" in second.log_file.read_text()

    newest = second.checkpoint_dir / checkpoint_filename(9)
    newest.write_bytes(newest.read_bytes()[:1000])  # torn newest file
    third = train_run(checkpoint_path="auto", training_steps=10, checkpoint_interval=3)
    assert (third.start_step, third.end_step) == (6, 10)
    text = third.log_file.read_text()
    assert "skipped step_0000009.pt" in text and "resuming" in text
    load_checkpoint(third.checkpoint_dir / checkpoint_filename(10))


@pytest.mark.integration
def test_auto_resume_uses_run_name_when_given(train_run, tmp_path):
    run = train_run(checkpoint_path="auto", run_name="nightly", training_steps=3)
    assert run.checkpoint_dir == tmp_path / "ckpt" / "nightly"
    again = train_run(checkpoint_path="auto", run_name="nightly", training_steps=5)
    assert (again.start_step, again.run_name) == (3, "nightly")


# --- rotation ----------------------------------------------------------------------------

@pytest.mark.unit
def test_rotate_keeps_newest_and_protected(tmp_path):
    for step in range(1, 8):
        (tmp_path / checkpoint_filename(step)).write_bytes(b"x")
    deleted = rotate_checkpoints(tmp_path, keep_last=3, protect={2})
    assert sorted(p.name for p in deleted) == [checkpoint_filename(s) for s in (1, 3, 4)]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 5, 6, 7]


@pytest.mark.unit
def test_rotate_ignores_steps_after_the_current_one(tmp_path):
    """A resumed run's new files are not rotated away in favour of a stale or corrupt later one."""
    for step in (3, 4, 5, 9):
        (tmp_path / checkpoint_filename(step)).write_bytes(b"x")
    rotate_checkpoints(tmp_path, keep_last=2, protect=set(), upto=5)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 9]


@pytest.mark.integration
def test_rotation_keeps_last_k_plus_the_best_checkpointed_step(train_run, monkeypatch):
    """The best val loss measured at a step without a checkpoint cannot be the protected one."""
    import lmtrain.train.loop as loop

    val = {2: 1.0, 3: 0.5, 4: 0.9, 6: 0.8, 8: 0.95, 10: 0.97, 12: 0.99}  # step 3: no ckpt
    calls = []

    def fake_estimate(*args, **kwargs):
        step = len(calls) + 1
        calls.append(step)
        return {"train": 1.0, "val": val.get(step, 2.0)}

    monkeypatch.setattr(loop, "estimate_loss", fake_estimate)
    summary = train_run(training_steps=12, eval_interval=1, checkpoint_interval=2,
                        keep_last_checkpoints=2, max_new_tokens=0)
    assert [s for s, _ in list_checkpoints(summary.checkpoint_dir)] == [6, 10, 12]
    last = load_checkpoint(summary.checkpoint_dir / checkpoint_filename(12))
    assert (last[fmt.BEST_STEP_KEY], last[fmt.BEST_VAL_LOSS_KEY]) == (6, 0.8)


@pytest.mark.integration
def test_checkpoints_are_not_rotated_when_the_new_one_fails(train_run, monkeypatch, tmp_path):
    import lmtrain.train.checkpointing as checkpointing

    real_save = checkpointing.save_checkpoint

    def failing_save(path, payload):
        if payload[fmt.STEP_KEY] == 8:
            raise OSError(28, "No space left on device")
        return real_save(path, payload)

    monkeypatch.setattr(checkpointing, "save_checkpoint", failing_save)
    with pytest.raises(UserError, match=r"step 8 checkpoint failed .* step 6 checkpoint is intact"):
        train_run(training_steps=10, checkpoint_interval=2, keep_last_checkpoints=2,
                  run_name="full")
    folder = tmp_path / "ckpt" / "full"
    assert [s for s, _ in list_checkpoints(folder)] == [4, 6]  # nothing rotated for step 8
    assert load_checkpoint(folder / checkpoint_filename(6))["step"] == 6
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")] == []


# --- compatibility -------------------------------------------------------------------------

@pytest.mark.integration
def test_other_model_type_than_the_checkpoint_stops_clearly(tmp_path, tiny_checkpoint):
    env = {"CHECKPOINT_PATH": str(tiny_checkpoint), "MODEL_TYPE": "gpt2", "RESUME_STEPS": "1",
           "LOG_DIR": str(tmp_path / "logs"), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    proc = run_entrypoint(["training.py"], env, ROOT)
    assert proc.returncode == 2
    assert "MODEL_TYPE='gpt2' (from env) contradicts the checkpoint" in proc.stderr
    assert "MODEL_TYPE='from_scratch'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.unit
def test_checkpoint_files_get_the_umask_permissions_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / checkpoint_filename(1), {"step": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600


@pytest.mark.unit
def test_fields_of_the_wrong_type_are_a_damaged_checkpoint(tmp_path, tiny_checkpoint):
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "bad.pt", step="4", hyperparameters=[])
    with pytest.raises(UserError, match=r"damaged: step, hyperparameters have the wrong type"):
        load_checkpoint(bad)
    assert main(["inspect", str(bad)]) == 2  # one error line, not a traceback
