"""``python training.py`` and ``lmtrain train`` as users run them: env contract, flags, errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.checkpoint import list_checkpoints
from tests.conftest import ROOT, run_entrypoint, tiny_env

pytestmark = pytest.mark.integration

TINY_ENV = tiny_env(batch_size=2, eval_iters=1)


@pytest.fixture
def env(tmp_path, corpus):
    return {**TINY_ENV, "TRAINING_DATA_SOURCE": str(corpus),
            "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "LOG_DIR": str(tmp_path / "logs"),
            "OUTPUT_DIR": str(tmp_path / "out")}


def only_run(folder):
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


def test_training_py_fresh_then_resume_via_env(env, tmp_path):
    fresh = run_entrypoint(["training.py"], {**env, "TEST_MODE": "1", "TRAINING_STEPS": "8",
                                             "CHECKPOINT_INTERVAL": "4",
                                             "ENABLE_OUTPUT_TO_FILE": "1"}, ROOT)
    assert fresh.returncode == 0, fresh.stderr
    assert "n_embd = 16  (env)" in fresh.stdout  # explicit settings win over TEST_MODE
    run_dir = only_run(tmp_path / "ckpt")
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 8]
    assert len(list((tmp_path / "out").iterdir())) == 1
    resumed = run_entrypoint(["training.py"], {**env, "CHECKPOINT_PATH": str(
        run_dir / "step_0000004.pt"), "RESUME_STEPS": "6", "LOG_INTERVAL": "1"}, ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 10/10" in resumed.stdout and "step 5/10" in resumed.stdout
    assert "other settings as in the checkpoint" in resumed.stdout  # only changes listed
    assert "n_embd = 16" not in resumed.stdout
    # step 8 exists: resuming step 4 branches instead of rewriting the run's history
    branch = tmp_path / "ckpt" / f"{run_dir.name}-from-4"
    assert f"continues as run {branch.name}" in resumed.stdout
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 8]
    assert [s for s, _ in list_checkpoints(branch)][-1] == 10
    logs = sorted(p.name for p in (tmp_path / "logs" / branch.name).glob("*.log"))
    assert len(logs) == 1 and logs[0].startswith("resume-0000004")


def test_lmtrain_train_flags_beat_env(env, tmp_path):
    proc = run_entrypoint(["-m", "lmtrain", "train", "--training-steps", "3", "--run-name", "r",
                           "--no-enable-checkpoints"], {**env, "TRAINING_STEPS": "50"}, ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "training_steps = 3  (flag)" in proc.stdout
    assert "enable_checkpoints = False  (flag)" in proc.stdout
    assert not (tmp_path / "ckpt").exists()
    metrics = (tmp_path / "logs" / "r" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in metrics) == 3


def test_config_file_sits_between_defaults_and_env(env, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('training_steps = 2\nrun_name = "fromfile"\nlearning_rate = 0.01\n')
    proc = run_entrypoint(["-m", "lmtrain", "train", "--config", str(toml)],
                          {**env, "LEARNING_RATE": "0.002"}, ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "training_steps = 2  (config file)" in proc.stdout
    assert "learning_rate = 0.002  (env)" in proc.stdout
    assert (tmp_path / "ckpt" / "fromfile" / "step_0000002.pt").is_file()


BAD_INPUTS = [
    ({"TRAINING_DATA_SOURCE": "/no/such/corpus.txt"}, "TRAINING_DATA_SOURCE='/no/such/corpus.txt'"),
    ({"TRAINING_STEPS": "abc"}, "TRAINING_STEPS='abc'"),
    ({"MODEL_TYPE": "llama"}, "MODEL_TYPE='llama'"),
    ({"BATCH_SIZE": "-1"}, "BATCH_SIZE='-1'"),
    ({"DEVICE": "tpu"}, "DEVICE='tpu'"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_no_traceback(env, extra, needle):
    proc = run_entrypoint(["training.py"], {**env, **extra}, ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


@pytest.mark.parametrize("content", ["", "\n\n  \n", "tiny"])
def test_empty_or_too_short_corpus(env, tmp_path, content):
    path = tmp_path / "small.txt"
    path.write_text(content)
    proc = run_entrypoint(["training.py"], {**env, "TRAINING_DATA_SOURCE": str(path)}, ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "TRAINING_DATA_SOURCE" in proc.stderr
    assert ("empty" in proc.stderr) or ("fewer than one block" in proc.stderr)


def test_bad_checkpoint_leaves_saved_files_untouched(env, tmp_path):
    ok = run_entrypoint(["training.py"], {**env, "TRAINING_STEPS": "2", "RUN_NAME": "keep"}, ROOT)
    assert ok.returncode == 0, ok.stderr
    run_dir = tmp_path / "ckpt" / "keep"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("this is not a checkpoint")
    for bad in (str(not_ckpt), str(tmp_path / "missing.pt")):
        proc = run_entrypoint(["training.py"], {**env, "CHECKPOINT_PATH": bad}, ROOT)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: CHECKPOINT_PATH=")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert torch.load(run_dir / "step_0000002.pt", weights_only=True)["step"] == 2


def test_unencodable_prompt_fails_before_training(env, tmp_path):
    proc = run_entrypoint(["training.py"], {**env, "PROMPT": "KING ☃:", "TRAINING_STEPS": "3"},
                          ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: PROMPT=") and "'☃'" in proc.stderr
    assert not list((tmp_path / "ckpt").rglob("step_*.pt"))  # nothing trained, nothing written
