"""Answer accuracy: in a run on question/answer records (metrics.jsonl, trackers, checkpoint,
plot) and through ``lmtrain eval --answers``; the GPT-2 LoRA path end to end."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.cli import main
from lmtrain.reporting import read_metrics
from lmtrain.trackers import Tracker
from lmtrain.train.answer_eval import spread
from tests.conftest import run_entrypoint, write_jsonl

ACCURACY = re.compile(r"answer accuracy (\d+\.\d)% \((\d+)/(\d+)\)")
#: A task a one-layer model learns in 20 steps: every answer is "yes".
EASY = {"n_layer": 1, "n_embd": 32, "block_size": 48, "batch_size": 8, "learning_rate": 0.01,
        "warmup_steps": 5, "eval_interval": 10, "checkpoint_interval": 10, "log_interval": 10,
        "max_new_tokens": 0, "dropout": 0.0}


def yes_records(n: int, seed: int = 1) -> list[dict[str, str]]:
    """``n`` distinct questions, all answered "yes"."""
    rng, seen = random.Random(seed), set()
    while len(seen) < n:
        seen.add("".join(rng.choice("abcdefgh") for _ in range(4)))
    return [{"question": f"is {w} ok?", "answer": "yes"} for w in sorted(seen)]


class Recorder(Tracker):
    """A tracker that keeps what it is given."""

    name = "recorder"

    def __init__(self) -> None:
        self.scalars: list[tuple[int, dict[str, float]]] = []

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.scalars.append((step, values))


@pytest.mark.unit
def test_spread_picks_evenly_and_keeps_few_as_they_are() -> None:
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread([1, 2], 5) == [1, 2]


@pytest.mark.integration
def test_a_run_on_records_reports_answer_accuracy_beside_the_loss(train_run, tmp_path,
                                                                  monkeypatch):
    import lmtrain.reporting

    recorder = Recorder()
    monkeypatch.setattr(lmtrain.reporting, "open_trackers", lambda *a, **k: [recorder])
    source = write_jsonl(tmp_path / "qa.jsonl", yes_records(60))
    summary = train_run(**EASY, training_data_source=str(source), training_steps=20)
    records = read_metrics(summary.metrics_file)
    answers = [(r["kind"], r["step"], r["val_answer_accuracy"], r["val_answers_total"])
               for r in records if "val_answer_accuracy" in r]
    assert [a[:2] for a in answers] == [("eval", 10), ("eval", 20), ("final", 20)]
    assert all(total == 6 for *_, total in answers)  # the 6 validation records
    assert answers[-1][2] == 1.0  # learnt: every held-out question answered "yes"
    assert summary.final_losses["val_answer_accuracy"] == 1.0
    log = summary.log_file.read_text()
    assert "step 20: train loss" in log and "step 20: answer accuracy 100.0% (6/6)" in log
    assert "final: answer accuracy 100.0% (6/6)" in log
    sent = {(step, k) for step, values in recorder.scalars for k in values}
    assert {(10, "eval/val_answer_accuracy"), (20, "final/val_answer_accuracy")} <= sent
    ckpt = torch.load(summary.checkpoint_dir / "step_0000020.pt", weights_only=True)
    assert ckpt[fmt.LAST_LOSSES_KEY]["val_answer_accuracy"] == 1.0
    assert summary.plot_file is not None and summary.plot_file.is_file()


@pytest.mark.integration
def test_eval_answers_zero_and_plain_text_measure_no_answers(train_run, tmp_path, capsys):
    source = write_jsonl(tmp_path / "qa.jsonl", yes_records(30))
    off = train_run(training_data_source=str(source), training_steps=5, eval_answers=0,
                    run_name="off")
    assert not any("val_answer_accuracy" in r for r in read_metrics(off.metrics_file))
    text = train_run(training_steps=5, run_name="text")
    assert not any("val_answer_accuracy" in r for r in read_metrics(text.metrics_file))
    assert main(["eval", str(text.checkpoint_dir / "step_0000005.pt"), "--answers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TRAINING_DATA_SOURCE=") and "is plain text" in err
    assert err.count("\n") == 1


@pytest.mark.integration
def test_eval_answers_prints_the_percentage_and_the_count(train_run, tmp_path, capsys):
    source = write_jsonl(tmp_path / "qa.jsonl", yes_records(60))
    summary = train_run(**EASY, training_data_source=str(source), training_steps=20)
    ckpt = str(summary.checkpoint_dir / "step_0000020.pt")
    capsys.readouterr()
    assert main(["eval", ckpt, "--answers"]) == 0
    out = capsys.readouterr().out
    assert f"step 20, validation records of {source}: answer accuracy 100.0% (6/6)" in out
    assert main(["eval", ckpt, "--answers", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["questions"], result["correct"], result["percent"], result["split"]) == (
        6, 6, 100.0, "val")
    # questions of another file, in another format: the answers that are not "yes" are wrong
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "is abba ok?", "input": "", "output": "yes"},
        {"instruction": "is cafe ok?", "output": "no"}])
    assert main(["eval", ckpt, "--answers", "--data", str(alpaca)]) == 0
    out = capsys.readouterr().out
    assert ACCURACY.search(out).groups() == ("50.0", "1", "2")
    assert "wrong: 'QUESTION: is cafe ok? ANSWER:' expected 'no', got 'yes'" in out
    lines = tmp_path / "lines.txt"
    lines.write_text("QUESTION: is dead ok? ANSWER: yes\nno question here\n", encoding="utf-8")
    assert main(["eval", ckpt, "--answers", "--data", str(lines), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 1


@pytest.mark.integration
def test_gpt2_lora_on_records_end_to_end(tmp_path, tiny_gpt2_dir, capsys):
    """Train as a user would (env vars, training.py), then eval --answers, sample with
    ``QUESTION: `` and export the adapter."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from tests.conftest import ROOT

    source = write_jsonl(tmp_path / "qa.jsonl", [
        {"messages": [{"role": "user", "content": r["question"]},
                      {"role": "assistant", "content": r["answer"]}]}
        for r in yes_records(30)])
    env = {"MODEL_TYPE": "gpt2", "USE_LORA": "1", "TRAINING_DATA_SOURCE": str(source),
           "GPT2_MODEL_NAME": str(tiny_gpt2_dir), "TEST_MODE": "1", "RUN_NAME": "qa",
           "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "LOG_DIR": str(tmp_path / "logs"),
           "CACHE_DIR": str(tmp_path / "cache"), "DEVICE": "cpu", "PRECISION": "fp32"}
    done = run_entrypoint([str(ROOT / "training.py")], env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ACCURACY.search(done.stdout).group(3) == "3"  # the 3 validation records
    metrics = read_metrics(tmp_path / "logs" / "qa" / "metrics.jsonl")
    assert [r["step"] for r in metrics if "val_answer_accuracy" in r] == [3, 6, 6]
    ckpt = str(tmp_path / "ckpt" / "qa" / "step_0000006.pt")
    assert main(["eval", ckpt, "--answers", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 3 and 0 <= result["correct"] <= 3
    assert main(["sample", ckpt, "--prompt", "QUESTION: ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("QUESTION: ")
    assert main(["export", ckpt, "--adapter", str(tmp_path / "adapter")]) == 0
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                                      tmp_path / "adapter")
    assert model.peft_config["default"].r == 8
