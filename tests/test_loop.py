"""The training loop: host transfers per progress line, the NaN policy and what it never saves."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import checkpoint_filename, list_checkpoints, load_checkpoint
from lmtrain.errors import UserError
from lmtrain.reporting import read_metrics

pytestmark = pytest.mark.integration


def count_host_transfers(monkeypatch) -> list[str]:
    """Record every tensor -> Python value conversion (each one waits for the device)."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name):
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_the_loss_reaches_the_host_per_progress_line_not_per_step(train_run, monkeypatch):
    counts = []
    for steps in (10, 40):
        calls = count_host_transfers(monkeypatch)
        train_run(training_steps=steps, log_interval=steps // 2, eval_interval=1000,
                  checkpoint_interval=1000, max_new_tokens=0, run_name=f"s{steps}")
        counts.append(len(calls))
        monkeypatch.undo()
    assert counts[0] == counts[1]  # 4x the steps, the same two progress lines


def test_progress_lines_hold_the_mean_loss_of_their_steps(train_run):
    every = train_run(training_steps=6, log_interval=1, run_name="every")
    pairs = train_run(training_steps=6, log_interval=2, run_name="pairs")
    one = {r["step"]: r["train_loss"] for r in read_metrics(every.metrics_file)
           if r["kind"] == "train"}
    two = {r["step"]: r["train_loss"] for r in read_metrics(pairs.metrics_file)
           if r["kind"] == "train"}
    assert sorted(two) == [2, 4, 6]
    for step, loss in two.items():
        assert loss == pytest.approx((one[step - 1] + one[step]) / 2, rel=1e-6)


def poison_weights_after(monkeypatch, step: int) -> None:
    """Make every weight NaN once optimizer step ``step`` is done (a finite loss before)."""
    import lmtrain.train.loop as loop

    real = loop.set_learning_rate

    def set_learning_rate(optimizer, at, config):
        if at == step:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.fill_(math.nan)
        return real(optimizer, at, config)

    monkeypatch.setattr(loop, "set_learning_rate", set_learning_rate)


def test_on_nan_skip_never_saves_non_finite_weights(train_run, tmp_path, monkeypatch):
    poison_weights_after(monkeypatch, 3)
    with pytest.raises(UserError) as err:
        train_run(training_steps=8, checkpoint_interval=2, on_nan="skip", run_name="poison")
    message = str(err.value)
    assert "\n" not in message
    assert "weights are no longer finite at step 4" in message
    assert "the step 2 checkpoint is intact" in message
    folder = tmp_path / "ckpt" / "poison"
    assert [s for s, _ in list_checkpoints(folder)] == [2]
    weights = load_checkpoint(folder / checkpoint_filename(2))[fmt.MODEL_STATE_KEY]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_on_nan_stop_names_the_first_bad_step_between_progress_lines(train_run, tmp_path,
                                                                    monkeypatch):
    poison_weights_after(monkeypatch, 5)  # step 6's loss is the first NaN
    with pytest.raises(UserError, match=r"loss became nan at step 6.*ON_NAN=skip"):
        train_run(training_steps=20, log_interval=10, checkpoint_interval=4, run_name="stop")
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt" / "stop")] == [4]


def test_the_final_checkpoint_holds_the_final_losses(train_run):
    # 23 is not an evaluation step (every 10)
    summary = train_run(training_steps=23, eval_interval=10, checkpoint_interval=10)
    final = load_checkpoint(summary.checkpoint_dir / checkpoint_filename(23))
    assert final[fmt.LAST_LOSSES_KEY]["step"] == 23
    assert final[fmt.LAST_LOSSES_KEY]["val"] == summary.final_losses["val"]
    evals = [r for r in read_metrics(summary.metrics_file) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 23]  # the end is evaluated once, not twice
    vals = {r["step"]: r["val_loss"] for r in evals}  # every evaluated step was checkpointed
    best = min(vals, key=vals.get)
    assert (final[fmt.BEST_STEP_KEY], final[fmt.BEST_VAL_LOSS_KEY]) == (best, vals[best])


def test_eval_iters_0_turns_evaluation_off_even_at_the_end(train_run):
    summary = train_run(training_steps=6, eval_interval=2, checkpoint_interval=3, eval_iters=0,
                        run_name="noeval")
    assert summary.final_losses == {}
    kinds = [r["kind"] for r in read_metrics(summary.metrics_file)]
    assert "eval" not in kinds and "final" not in kinds and kinds.count("train") == 6
    assert summary.timings["eval"] == 0.0
    final = load_checkpoint(summary.checkpoint_dir / checkpoint_filename(6))
    assert final[fmt.LAST_LOSSES_KEY] == {} and final[fmt.BEST_VAL_LOSS_KEY] is None
    resumed = train_run(checkpoint_path=str(summary.checkpoint_dir / checkpoint_filename(3)),
                        resume_steps=3, eval_iters=0)
    assert (resumed.start_losses, resumed.final_losses) == ({}, {})
    log = resumed.log_file.read_text()
    assert "val loss" not in log and "step 6/6" in log
