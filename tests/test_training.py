"""Fresh runs, resumed runs and the exact-resume property, driven through the real session."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import list_checkpoints
from lmtrain.checkpoint_format import REQUIRED_KEYS
from lmtrain.reporting import read_metrics
from tests.conftest import load_file as load
from tests.conftest import train_losses, whole_and_resumed


@pytest.mark.integration
def test_fresh_run_writes_checkpoints_logs_and_metrics(train_run):
    summary = train_run(training_steps=12, checkpoint_interval=5)
    steps = [s for s, _ in list_checkpoints(summary.checkpoint_dir)]
    assert steps == [5, 10, 12]
    ckpt = load(summary.checkpoint_dir / "step_0000012.pt")
    for key in (*REQUIRED_KEYS, "rng_state", "sampler_state", "scheduler_state_dict",
                "best_val_loss", "run_name"):
        assert key in ckpt
    assert ckpt["step"] == 12 and ckpt["block_size"] == 16 and ckpt["batch_size"] == 4
    assert json.loads(ckpt["tokenizer"])["kind"] == "character"
    assert ckpt["vocab_size"] == len(json.loads(ckpt["tokenizer"])["chars"])
    assert ckpt[fmt.HYPERPARAMETERS_KEY]["lr_decay_steps"] == 12  # the horizon is saved
    assert sorted(train_losses(summary.metrics_file)) == list(range(1, 13))
    log_text = summary.log_file.read_text()
    assert "step 12: train loss" in log_text and "sample:" in log_text
    assert summary.final_losses["val"] > 0 and summary.sample


@pytest.mark.integration
def test_resume_continues_the_step_count(train_run):
    first = train_run(training_steps=10)
    ckpt = first.checkpoint_dir / "step_0000010.pt"
    second = train_run(checkpoint_path=str(ckpt), resume_steps=7)
    assert (second.start_step, second.end_step) == (10, 17)
    assert second.run_name == first.run_name
    assert second.log_file != first.log_file and second.log_file.parent == first.log_file.parent
    assert sorted(train_losses(second.metrics_file, since=10)) == list(range(11, 18))
    assert load(second.checkpoint_dir / "step_0000017.pt")["step"] == 17
    log_text = second.log_file.read_text()
    assert "resuming from step 10 for 7 steps (to step 17)" in log_text
    assert "resumed run: val loss" in log_text and "change" in log_text


@pytest.mark.integration
def test_resume_without_resume_steps_runs_to_the_planned_total(train_run):
    first = train_run(training_steps=8, checkpoint_interval=4)
    second = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000004.pt"))
    assert (second.start_step, second.end_step) == (4, 8)


@pytest.mark.integration
@pytest.mark.parametrize("n_layer", [1, 0])
def test_exact_resume_is_bitwise(train_run, tmp_path, n_layer):
    """N+M steps in one go == N steps, then M resumed steps: same weights, same losses."""
    common = dict(dropout=0.2, lr_scheduler="cosine", warmup_steps=3, lr_decay_steps=14,
                  eval_interval=4, checkpoint_interval=100, n_layer=n_layer)
    whole, part, resumed = whole_and_resumed(train_run, **common)
    a = load(whole.checkpoint_dir / "step_0000014.pt")
    b = load(resumed.checkpoint_dir / "step_0000014.pt")
    for key, tensor in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(tensor, b[fmt.MODEL_STATE_KEY][key]), key
    assert torch.equal(a[fmt.RNG_STATE_KEY], b[fmt.RNG_STATE_KEY])
    whole_losses = train_losses(whole.metrics_file)
    assert whole_losses == {**train_losses(part.metrics_file), **train_losses(
        resumed.metrics_file, since=6)}
    assert len(whole_losses) == 14


@pytest.mark.integration
def test_overridden_learning_rate_takes_effect_on_resume(train_run):
    first = train_run(training_steps=6, lr_scheduler="none", learning_rate=1e-3)
    second = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000006.pt"),
                       resume_steps=2, learning_rate=4e-3)
    lrs = [r["lr"] for r in read_metrics(second.metrics_file)
           if r.get("kind") == "train" and r["step"] > 6]
    assert lrs == [pytest.approx(4e-3)] * 2
    ckpt = load(second.checkpoint_dir / "step_0000008.pt")
    groups = ckpt[fmt.OPTIMIZER_STATE_KEY]["param_groups"]
    assert all(g["lr"] == pytest.approx(4e-3) for g in groups)


@pytest.mark.integration
def test_evaluation_does_not_move_the_training_rng(train_run):
    a = train_run(training_steps=6, eval_interval=1, run_name="evals")
    b = train_run(training_steps=6, eval_interval=100, run_name="noevals")
    assert train_losses(a.metrics_file) == train_losses(b.metrics_file)


@pytest.mark.integration
def test_output_file_holds_settings_losses_and_sample(train_run):
    summary = train_run(training_steps=4, enable_output_to_file=True, prompt="ROMEO:")
    text = summary.output_file.read_text()
    assert summary.output_file.name.startswith(f"{summary.run_name}_")
    assert f"# lmtrain run {summary.run_name}" in text
    assert "training_steps = 4" in text and "final_val" in text
    assert summary.sample.startswith("ROMEO:") and summary.sample in text


@pytest.mark.unit
def test_corpus_shorter_than_a_block_is_rejected(train_run, tmp_path):
    from lmtrain.errors import UserError

    short = tmp_path / "short.txt"
    short.write_text("to be or not")
    with pytest.raises(UserError, match=r"fewer than one block.*BLOCK_SIZE=16"):
        train_run(training_data_source=str(short))
