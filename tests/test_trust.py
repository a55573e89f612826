"""Checkpoints are data, never instructions: attacks on the format, the run folders and the
disk, each with what must (not) happen."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import (
    checkpoint_filename,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lmtrain.checkpoint_format import DIGEST_KEY, config_of
from lmtrain.cli import main
from lmtrain.errors import UserError
from tests.conftest import ROOT, child_env, run_entrypoint, tiny_env

_DELETE = object()


def crafted(src: Path, dest: Path, sealed: bool = True, **changes) -> Path:
    """A copy of ``src`` with keys changed (``_DELETE`` removes one), sealed with a valid
    digest unless ``sealed=False`` (then written as torch.save would, digest untouched)."""
    ckpt = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if value is _DELETE:
            ckpt.pop(key, None)
        elif key == fmt.HYPERPARAMETERS_KEY:
            ckpt[key] = {**ckpt[key], **value}
        else:
            ckpt[key] = value
    if sealed:
        save_checkpoint(dest, ckpt)
    else:
        torch.save(ckpt, dest)
    return dest


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --- 2. a checkpoint never decides where lmtrain writes, deletes or downloads ---------------

@pytest.mark.integration
def test_a_crafted_checkpoint_cannot_choose_where_lmtrain_writes_or_deletes(
        tmp_path, tiny_checkpoint, train_run):
    victim = tmp_path / "victim"
    victim.mkdir()
    for step in range(1, 10):
        (victim / checkpoint_filename(step)).write_bytes(b"precious")
    before = snapshot(victim)
    bad = crafted(tiny_checkpoint, tmp_path / "shared.pt", run_name=str(victim),
                  hyperparameters={"run_name": str(victim), "checkpoint_dir": str(victim.parent),
                                   "log_dir": str(victim), "output_dir": str(victim),
                                   "cache_dir": str(victim), "keep_last_checkpoints": 1,
                                   "allow_download": True, "enable_output_to_file": True})
    saved = config_of(torch.load(bad, weights_only=True))
    assert (saved.model.allow_download, saved.checkpointing.keep_last_checkpoints,
            saved.run.run_name) == (False, 3, None)
    assert (saved.checkpointing.checkpoint_dir, saved.data.cache_dir,
            saved.run.enable_output_to_file) == (
        "checkpoints", None, False)
    summary = train_run(checkpoint_path=str(bad), resume_steps=3, checkpoint_interval=1)
    assert snapshot(victim) == before  # nothing written, nothing deleted
    assert summary.checkpoint_dir.parent == tmp_path / "ckpt"
    assert summary.log_file.parent.parent == tmp_path / "logs"
    assert str(victim) not in summary.run_name


@pytest.mark.integration
def test_the_users_run_name_wins_on_resume_and_the_log_says_where_it_came_from(train_run,
                                                                               tmp_path):
    first = train_run(training_steps=4, run_name="A")
    second = train_run(checkpoint_path=str(first.checkpoint_dir / checkpoint_filename(4)),
                       resume_steps=2, run_name="B")
    assert second.run_name == "B" and second.checkpoint_dir == tmp_path / "ckpt" / "B"
    assert "run_name = 'B'  (flag" in second.log_file.read_text()
    assert [s for s, _ in list_checkpoints(first.checkpoint_dir)] == [4]


@pytest.mark.integration
def test_a_data_source_from_the_checkpoint_is_named_in_the_log(train_run, run_dirs):
    from lmtrain.config import explicit_settings
    from lmtrain.train.session import train

    first = train_run(training_steps=4)
    flags = {**run_dirs, "device": "cpu", "resume_steps": 1,
             "checkpoint_path": str(first.checkpoint_dir / checkpoint_filename(4))}
    second = train(*explicit_settings(flags=flags, env={}))  # no TRAINING_DATA_SOURCE given
    assert "TRAINING_DATA_SOURCE=" in second.log_file.read_text()
    assert "comes from the checkpoint" in second.log_file.read_text()


# --- 3. RUN_NAME is one safe path component -------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("name", ["..", ".", "../../x", "/abs/path", "a/b", "a\\b", "x\ny"])
def test_unsafe_run_names_are_refused_before_anything_is_written(train_run, tmp_path, name):
    with pytest.raises(UserError, match="is not a valid run name"):
        train_run(training_steps=2, run_name=name)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.unit
@pytest.mark.parametrize("name", ["shakespeare-small", "run.v2_1", "A-from-10-2", "…ünï"])
def test_ordinary_run_names_are_one_folder_below_the_settings(name):
    from lmtrain.run_folder import RunPaths, check_run_name

    assert check_run_name(name) == name
    paths = RunPaths.of("ck", "lg", "out", name)
    assert (paths.checkpoints, paths.logs) == (Path("ck") / name, Path("lg") / name)


@pytest.mark.unit
def test_rotation_keeps_a_file_it_may_not_delete(tmp_path, monkeypatch):
    from lmtrain.checkpoint import rotate_checkpoints

    for step in range(1, 5):
        (tmp_path / checkpoint_filename(step)).write_bytes(b"x")
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == checkpoint_filename(1):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    deleted = rotate_checkpoints(tmp_path, keep_last=2, protect=set())
    assert [p.name for p in deleted] == [checkpoint_filename(2)]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3, 4]


# --- 4. history is never rewritten ----------------------------------------------------------

@pytest.mark.integration
def test_resuming_an_older_checkpoint_branches_and_replaces_nothing(train_run, tmp_path):
    first = train_run(training_steps=6, checkpoint_interval=2, run_name="A")
    before = snapshot(first.checkpoint_dir)
    older = str(first.checkpoint_dir / checkpoint_filename(2))
    branch = train_run(checkpoint_path=older, resume_steps=4, learning_rate=5e-4)
    assert branch.run_name == "A-from-2"
    assert snapshot(first.checkpoint_dir) == before
    assert [s for s, _ in list_checkpoints(branch.checkpoint_dir)][-1] == 6
    assert "continues as run A-from-2" in branch.log_file.read_text()
    again = train_run(checkpoint_path=older, resume_steps=1, learning_rate=5e-4)
    assert again.run_name == "A-from-2-2"
    newest = train_run(checkpoint_path=str(first.checkpoint_dir / checkpoint_filename(6)),
                       resume_steps=2)
    assert newest.run_name == "A"  # the newest of a run continues the run itself


# --- 5. integrity ---------------------------------------------------------------------------

def flip_inside_largest_tensor(path: Path, n: int = 64) -> None:
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)  # a tensor's storage
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(data[header + 26:header + 28], "little")
    extra_len = int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len + info.file_size // 2
    for i in range(n):
        data[start + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.integration
def test_a_bit_flipped_checkpoint_is_refused_and_auto_skips_it(train_run, tmp_path, capsys):
    first = train_run(training_steps=4, checkpoint_interval=2, run_name="flip")
    newest = first.checkpoint_dir / checkpoint_filename(4)
    flip_inside_largest_tensor(newest)
    with pytest.raises(UserError, match="corrupt: its contents do not match their sha256"):
        load_checkpoint(newest)
    assert main(["inspect", str(newest)]) == 2
    assert "corrupt" in capsys.readouterr().err
    path, _, problems = find_resumable(first.checkpoint_dir)
    assert path == first.checkpoint_dir / checkpoint_filename(2)
    assert problems and "skipped step_0000004.pt" in problems[0] and "sha256" in problems[0]
    again = train_run(checkpoint_path="auto", run_name="flip", training_steps=5)
    assert again.start_step == 2 and "skipped step_0000004.pt" in again.log_file.read_text()


@pytest.mark.unit
def test_a_file_changed_without_its_digest_is_refused(tmp_path, tiny_checkpoint):
    bad = crafted(tiny_checkpoint, tmp_path / "edited.pt", sealed=False, best_step=0)
    with pytest.raises(UserError, match="do not match their sha256"):
        load_checkpoint(bad)
    missing = crafted(tiny_checkpoint, tmp_path / "nodigest.pt", sealed=False,
                      **{DIGEST_KEY: _DELETE})
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(missing)


@pytest.mark.unit
def test_a_format_1_checkpoint_without_digest_or_tracker_ids_still_loads(tmp_path,
                                                                         tiny_checkpoint):
    old = crafted(tiny_checkpoint, tmp_path / "v1.pt", sealed=False, format_version=1,
                  tracker_run_ids=_DELETE, **{DIGEST_KEY: _DELETE})
    assert load_checkpoint(old)["step"] == 4


@pytest.mark.unit
def test_a_checkpoint_from_before_the_recipe_settings_loads_as_what_it_was(tmp_path,
                                                                            tiny_checkpoint):
    """Hyperparameters without ARCH/QK_NORM/OPTIMIZER were a gpt2 + AdamW run: validation,
    sampling/export loading and resuming all read them so (not as today's defaults)."""
    from lmtrain.inference import load_trained_model

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for key in ("arch", "qk_norm", "optimizer"):
        ckpt[fmt.HYPERPARAMETERS_KEY].pop(key)
    old = save_checkpoint(tmp_path / "before-recipe.pt", ckpt)
    cfg = config_of(load_checkpoint(old))
    assert (cfg.model.arch, cfg.model.qk_norm, cfg.optimization.optimizer) == ("gpt2", False,
                                                                               "adamw")
    assert load_trained_model(old).config.model.arch == "gpt2"


@pytest.mark.integration
def test_tracker_run_ids_are_saved_and_restored(train_run, tmp_path, tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint)[fmt.TRACKER_RUN_IDS_KEY] == {}
    start = crafted(tiny_checkpoint, tmp_path / "ids.pt", tracker_run_ids={"wandb": "abc123"})
    summary = train_run(checkpoint_path=str(start), resume_steps=1, run_name="tiny")
    saved = load_checkpoint(summary.checkpoint_dir / checkpoint_filename(5))
    assert saved[fmt.TRACKER_RUN_IDS_KEY] == {"wandb": "abc123"}


# --- 1. every malformed key: one line, exit 2, in train, sample, export and inspect ----------

MALFORMED = {
    "tokenizer not JSON": dict(tokenizer="{not json"),
    "character tokenizer without characters": dict(tokenizer='{"kind": "character"}'),
    "unknown tokenizer kind": dict(tokenizer='{"kind": "morse"}'),
    "optimizer state {}": dict(optimizer_state_dict={}),
    "optimizer state without groups": dict(optimizer_state_dict={"state": {},
                                                                 "param_groups": []}),
    "rng_state missing": dict(rng_state=_DELETE),
    "sampler_state missing": dict(sampler_state=_DELETE),
    "rng_state too short": dict(rng_state=torch.zeros(3, dtype=torch.uint8)),
    "negative step": dict(step=-5),
    "vocab_size 0": dict(vocab_size=0),
    "block_size as text": dict(block_size="16"),
    "bad hyperparameter": dict(hyperparameters={"n_layer": "abc"}),
    "no weights": dict(model_state_dict={}),
    "loss not a number": dict(last_losses={"val": "low"}),
    "tracker id not text": dict(tracker_run_ids={"wandb": 5}),
    "world_size 0": dict(world_size=0),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_key_is_one_line_in_every_command(case, tmp_path, tiny_checkpoint,
                                                          train_run, capsys):
    bad = crafted(tiny_checkpoint, tmp_path / "bad.pt", **MALFORMED[case])
    with pytest.raises(UserError, match="is damaged"):
        load_checkpoint(bad)
    for argv in (["inspect", str(bad)], ["sample", str(bad), "--max-new-tokens", "2"],
                 ["export", str(bad), str(tmp_path / "hf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "damaged" in err and err.count("\n") == 1, argv
    with pytest.raises(UserError, match="is damaged"):
        train_run(checkpoint_path=str(bad), resume_steps=1)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_an_optimizer_state_of_another_model_fails_inspect_and_resume(tmp_path,
                                                                      tiny_checkpoint,
                                                                      train_run, capsys):
    other = train_run(training_steps=2, n_embd=32, run_name="other")
    foreign = torch.load(other.checkpoint_dir / checkpoint_filename(2), weights_only=True)
    bad = crafted(tiny_checkpoint, tmp_path / "mixed.pt",
                  optimizer_state_dict=foreign[fmt.OPTIMIZER_STATE_KEY])
    assert main(["inspect", str(bad)]) == 2
    assert "optimizer state" in capsys.readouterr().err
    with pytest.raises(UserError, match="optimizer state"):
        train_run(checkpoint_path=str(bad), resume_steps=1, run_name="mixed")


@pytest.mark.integration
def test_inspect_fits_a_gpt2_checkpoint_to_its_base(tmp_path, tiny_gpt2_dir, qa_corpus,
                                                    train_run, capsys):
    run = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                    training_data_source=str(qa_corpus), training_steps=1, block_size=32,
                    batch_size=2, n_layer=2, n_head=2, n_embd=64, max_new_tokens=0)
    good = run.checkpoint_dir / checkpoint_filename(1)
    assert main(["inspect", str(good)]) == 0
    capsys.readouterr()
    weights = torch.load(good, weights_only=True)[fmt.MODEL_STATE_KEY]
    key = "transformer.h.0.mlp.c_fc.weight"
    bad = crafted(good, tmp_path / "reshaped.pt",
                  model_state_dict={**weights, key: torch.zeros(64, 8)})
    assert main(["inspect", str(bad)]) == 2
    assert "do not fit the model" in capsys.readouterr().err


# --- 6. one writer per run ------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from lmtrain.run_folder import RunLock
lock = RunLock(Path({folder!r})).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.integration
def test_a_second_process_on_one_run_is_refused_and_kill_9_frees_the_run(train_run, tmp_path):
    folder = tmp_path / "ckpt" / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK.format(src=str(ROOT / "src"), folder=str(folder))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by pid {holder.pid}"):
            train_run(training_steps=2, run_name="shared", checkpoint_path="auto")
        assert not (tmp_path / "logs" / "shared").exists()  # the refused run wrote nothing
        assert [p.name for p in folder.iterdir()] == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    summary = train_run(training_steps=2, run_name="shared", checkpoint_path="auto")
    assert summary.end_step == 2


@pytest.mark.integration
def test_two_training_processes_on_one_run_one_is_refused(tmp_path, corpus):
    env = {"TRAINING_DATA_SOURCE": str(corpus), "N_LAYER": "1", "N_HEAD": "2", "N_EMBD": "16",
           "BLOCK_SIZE": "16", "BATCH_SIZE": "2", "EVAL_ITERS": "1", "MAX_NEW_TOKENS": "0",
           "DEVICE": "cpu", "TRAINING_STEPS": "100000", "CHECKPOINT_INTERVAL": "50",
           "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "LOG_DIR": str(tmp_path / "logs"),
           "CACHE_DIR": str(tmp_path / "cache"), "RUN_NAME": "one",
           "CHECKPOINT_PATH": "auto"}
    first = subprocess.Popen([sys.executable, "training.py"], env=child_env(env), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(tmp_path / "ckpt" / "one"):  # it holds the run now
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run saved nothing in time"
            time.sleep(0.1)
        second = run_entrypoint(["training.py"], env, ROOT, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"error: run folder {str(tmp_path / 'ckpt' / 'one')!r} is in use by pid " \
               f"{first.pid}" in second.stderr
        assert len(list((tmp_path / "logs" / "one").glob("*.log"))) == 1  # only the first's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)


@pytest.mark.unit
def test_the_plan_and_its_checkpoint_are_read_only(tiny_checkpoint, run_dirs):
    from dataclasses import FrozenInstanceError

    from lmtrain.config import explicit_settings
    from lmtrain.train.plan import resolve_plan

    flags = {**run_dirs, "checkpoint_path": str(tiny_checkpoint), "resume_steps": 1}
    plan = resolve_plan(*explicit_settings(flags=flags, env={}))
    with pytest.raises(FrozenInstanceError):
        plan.run_name = "elsewhere"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        plan.resume.checkpoint.where = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.resume.checkpoint.payload["run_name"] = "elsewhere"  # type: ignore[index]
    assert plan.paths.checkpoints == Path(run_dirs["checkpoint_dir"]) / plan.run_name


@pytest.mark.unit
def test_inspect_tells_a_run_extended_past_its_plan(tmp_path, tiny_checkpoint, capsys):
    extended = crafted(tiny_checkpoint, tmp_path / "long.pt", step=60,
                       hyperparameters={"training_steps": 30})
    assert main(["inspect", str(extended)]) == 0
    assert "60 (planned 30; extended with RESUME_STEPS)" in capsys.readouterr().out


# --- 7. storage failures ----------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders (root only, where the kernel lets this process); skip else."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(folder)
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.integration
def test_a_full_checkpoint_disk_stops_with_the_previous_checkpoint_and_the_resume_command(
        train_run, tmpfs):
    disk = tmpfs("full", "512k")
    with pytest.raises(UserError) as err:
        train_run(training_steps=60, checkpoint_interval=1, keep_last_checkpoints=100,
                  checkpoint_dir=str(disk), run_name="full")
    message = str(err.value)
    assert "No space left on device" in message and "resume with: CHECKPOINT_PATH=" in message
    steps = [s for s, _ in list_checkpoints(disk / "full")]
    assert steps and load_checkpoint(disk / "full" / checkpoint_filename(steps[-1]))
    assert checkpoint_filename(steps[-1]) in message
    assert not [p for p in (disk / "full").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.integration
def test_a_full_log_disk_is_a_warning_and_the_run_ends_well(tmpfs, tmp_path, corpus):
    logs = tmpfs("logs", "16k")
    env = tiny_env(batch_size=2, eval_iters=1, eval_interval=250, training_steps=300,
                   checkpoint_interval=150, run_name="logfull", training_data_source=corpus,
                   checkpoint_dir=tmp_path / "ckpt", log_dir=logs, cache_dir=tmp_path / "cache")
    proc = run_entrypoint(["training.py"], env, ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "could not write" in proc.stderr + proc.stdout
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "logfull" / checkpoint_filename(300))


@pytest.mark.integration
def test_a_failing_output_file_is_a_warning(train_run, monkeypatch):
    import lmtrain.durable as durable

    real = durable.atomic_write

    def no_space_for_outputs(path, write):
        if "out" in Path(path).parts[-2:-1]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(durable, "atomic_write", no_space_for_outputs)
    summary = train_run(training_steps=2, enable_output_to_file=True)
    assert summary.output_file is None
    assert "could not write the output file" in summary.log_file.read_text()


@pytest.mark.unit
def test_a_full_token_cache_is_one_line(train_run, monkeypatch, tmp_path):
    import lmtrain.data.prepare as prepare

    def no_space(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "atomic_write", no_space)
    with pytest.raises(UserError, match=r"CACHE_DIR: writing .* failed \(No space left"):
        train_run(training_steps=2)


# --- 8. tied weights stored once ----------------------------------------------------------------

@pytest.mark.unit
def test_tied_gpt2_weights_are_stored_once(tmp_path):
    from transformers import GPT2LMHeadModel

    from lmtrain.config import TrainingConfig
    from lmtrain.models.weights import model_state
    from tests.conftest import save_tiny_gpt2

    model = GPT2LMHeadModel.from_pretrained(save_tiny_gpt2(tmp_path / "g", vocab_size=5000))
    weights = model_state(model, TrainingConfig.from_flat(model_type="gpt2").model)
    assert weights["lm_head.weight"].data_ptr() == weights["transformer.wte.weight"].data_ptr()
    buf = io.BytesIO()
    torch.save(weights, buf)
    unique = sum(t.numel() * t.element_size() for k, t in weights.items() if k != "lm_head.weight")
    assert buf.tell() < unique * 1.05  # one copy of the 5000 x 64 embedding, not two
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "g")
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


# --- issue 15: no clutter, the log holds the error, the resume report ---------------------------

@pytest.mark.unit
def test_a_failed_start_leaves_no_folders(train_run, tmp_path):
    with pytest.raises(UserError, match="TRAINING_DATA_SOURCE"):
        train_run(training_data_source=str(tmp_path / "nonexistent"))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.unit
def test_an_error_after_the_log_is_opened_is_in_the_log(train_run, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("to be or not")
    with pytest.raises(UserError, match="fewer than one block"):
        train_run(training_data_source=str(short), run_name="short")
    logs = list((tmp_path / "logs" / "short").glob("*.log"))
    assert len(logs) == 1 and "error: " in logs[0].read_text()
    assert "fewer than one block" in logs[0].read_text()
    assert not (tmp_path / "ckpt" / "short").exists()  # nothing but its lock: removed


@pytest.mark.integration
def test_the_resume_report_gives_both_losses_their_changes_and_only_changed_settings(
        train_run):
    first = train_run(training_steps=4, learning_rate=1e-3)
    second = train_run(checkpoint_path=str(first.checkpoint_dir / checkpoint_filename(4)),
                       resume_steps=2, learning_rate=2e-3, enable_output_to_file=True)
    text = second.log_file.read_text()
    assert "resumed run: train loss" in text and "resumed run: val loss" in text
    assert "learning_rate = 0.002  (flag; checkpoint: 0.001)" in text
    assert "other settings as in the checkpoint" in text and "n_embd = 16" not in text
    report = second.output_file.read_text()
    assert second.output_file.name.startswith(second.run_name)
    assert f"# lmtrain run {second.run_name}" in report
    for key in ("train_change", "val_change"):
        assert f"{key}: " in report
    change = second.final_losses["val"] - second.start_losses["val"]
    assert f"val_change: {change}" in report

