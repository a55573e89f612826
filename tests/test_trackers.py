"""Experiment trackers: METRICS as a comma list; each tracker logs the same scalars at the same
steps, the settings once and the final sample; a resumed run continues the same tracker run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain.config import TrainingConfig, explicit_settings, load_fresh
from lmtrain.errors import UserError
from lmtrain.reporting import MetricsWriter, read_metrics
from lmtrain.trackers import Tracker

SCALARS = {"train/train_loss", "train/lr", "train/tokens_per_s", "train/grad_norm",
           "eval/train_loss", "eval/val_loss", "final/val_loss", "final/val_perplexity"}


@pytest.fixture(autouse=True)
def _private_tracker_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackers write under the test's tmp_path and never reach a network."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def jsonl_steps(metrics_file: Path, kind: str) -> list[int]:
    return [r["step"] for r in read_metrics(metrics_file) if r.get("kind") == kind]


def fresh_then_resumed(train_run, metrics: str):
    """Six steps, then a resume from the step-6 checkpoint for four more."""
    first = train_run(training_steps=6, checkpoint_interval=3, eval_interval=3, metrics=metrics,
                      max_new_tokens=8)
    second = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000006.pt"),
                       resume_steps=4, metrics=metrics, max_new_tokens=8)
    assert second.run_name == first.run_name and second.end_step == 10
    return first, second


@pytest.mark.unit
def test_metrics_is_a_comma_list() -> None:
    config = TrainingConfig.from_flat(metrics="wandb, TensorBoard")
    assert config.run.metrics == "jsonl,tensorboard,wandb"
    assert TrainingConfig.from_flat(metrics=["mlflow"]).run.metrics == "jsonl,mlflow"  # a TOML list
    assert TrainingConfig.from_flat().run.metrics == "jsonl"
    values, sources = explicit_settings(flags={"metrics": "jsonl,neptune"}, env={})
    with pytest.raises(UserError, match=r"METRICS='jsonl,neptune'.*unknown metrics sink "
                                        r"'neptune'"):
        load_fresh(values, sources)


@pytest.mark.unit
def test_a_missing_tracker_package_is_one_line_naming_the_extra(train_run, monkeypatch,
                                                                tmp_path) -> None:
    import importlib.util

    pytest.importorskip("tensorboard")  # present, so that mlflow is the one reported
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError) as err:
        train_run(training_steps=2, metrics="tensorboard,mlflow")
    assert str(err.value) == "METRICS=mlflow needs the mlflow extra: pip install 'lmtrain[mlflow]'"
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*.pt"))


class _Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def log_scalars(self, step, values):
        if self.fail_on == "scalars":
            raise RuntimeError("service unavailable")
        self.calls.append(("scalars", step, values))

    def log_text(self, key, text, step):
        self.calls.append(("text", key, text, step))

    def close(self, status="finished"):
        self.calls.append(("close", status))


@pytest.mark.unit
def test_metrics_writer_dispatches_numbers_and_survives_a_failing_tracker(tmp_path, caplog):
    good, bad = _Recorder(), _Recorder(fail_on="scalars")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", [bad, good])
    writer.write(step=0, kind="start", log_file="x.log")  # no numbers: nothing to trackers
    writer.write(step=5, train_loss=2.5, lr=1e-3, grad_norm=None, kind="train")
    writer.write(step=5, train_loss=2.4, val_loss=2.6, kind="eval")
    writer.text("sample", "To be", 5)
    writer.close()
    assert good.calls == [("scalars", 5, {"train/train_loss": 2.5, "train/lr": 1e-3}),
                          ("scalars", 5, {"eval/train_loss": 2.4, "eval/val_loss": 2.6}),
                          ("text", "sample", "To be", 5), ("close", "finished")]
    assert bad.calls == [("close", "failed")]  # dropped after its first failure, closed once
    assert caplog.text.count("service unavailable") == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["start", "train", "eval", "text"]


@pytest.mark.integration
def test_tensorboard_logs_scalars_settings_and_sample(train_run) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train_run(training_steps=4, metrics="tensorboard", max_new_tokens=8)
    acc = EventAccumulator(str(summary.metrics_file.parent),
                           size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) >= SCALARS
    assert [e.step for e in acc.Scalars("train/train_loss")] == jsonl_steps(summary.metrics_file,
                                                                             "train")
    assert "sample/text_summary" in tags["tensors"]
    text = acc.Tensors("sample/text_summary")[0].tensor_proto.string_val[0].decode()
    assert summary.sample in text


@pytest.mark.integration
def test_mlflow_run_spans_fresh_and_resumed_sessions(train_run, tmp_path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    first, second = fresh_then_resumed(train_run, "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lmtrain"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == first.run_name and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/train_loss")
    assert [m.step for m in history] == jsonl_steps(second.metrics_file, "train")
    assert [m.step for m in history] == list(range(1, 11))  # fresh steps 1-6, resumed 7-10
    losses = [r["train_loss"] for r in read_metrics(second.metrics_file) if r["kind"] == "train"]
    assert [m.value for m in history] == pytest.approx(losses)
    assert set(run.data.metrics) >= SCALARS
    assert run.data.params["learning_rate"] == "0.003"
    assert "checkpoint_dir" not in run.data.params  # where a run writes is not what it is
    sample = client.download_artifacts(run.info.run_id, "sample-step-0000010.txt",
                                       str(tmp_path / "dl"))
    assert Path(sample).read_text() == second.sample


def _wandb_records(folder: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(folder)], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_wandb_offline_run_spans_fresh_and_resumed_sessions(train_run) -> None:
    pytest.importorskip("wandb")
    first, second = fresh_then_resumed(train_run, "wandb")
    runs = sorted((first.metrics_file.parent / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one offline file per session ...
    records = [_wandb_records(path) for path in runs]
    ids = {r["run"]["run_id"] for recs in records for r in recs if r["type"] == "run"}
    assert len(ids) == 1  # ... of the same run, which `wandb sync` joins into one
    history = [r["history"]["item"] for recs in records for r in recs if r["type"] == "history"]
    train_steps = [h["step"] for h in history if "train/train_loss" in h]
    assert train_steps == jsonl_steps(second.metrics_file, "train") == list(range(1, 11))
    assert {k for h in history for k in h} >= SCALARS
    configs = [r["config"]["update"] for r in records[0] if r["type"] == "config"]
    assert any(c.get("learning_rate") == 0.003 for c in configs)
    tables = sorted(runs[1].parent.glob("files/media/table/sample_*.table.json"))
    assert json.loads(tables[-1].read_text())["data"] == [[10, second.sample]]


@pytest.mark.integration
def test_a_branched_resume_is_a_tracker_run_of_its_own(train_run, tmp_path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    first = train_run(training_steps=6, checkpoint_interval=3, eval_interval=3, metrics="mlflow",
                      max_new_tokens=0)
    branch = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000003.pt"),
                       resume_steps=2, metrics="mlflow", max_new_tokens=0)
    assert branch.run_name != first.run_name  # later checkpoints exist: the resume branches
    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").resolve().as_uri())
    runs = {r.info.run_name: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert set(runs) == {first.run_name, branch.run_name}
    steps = {name: [m.step for m in client.get_metric_history(r.info.run_id, "train/train_loss")]
             for name, r in runs.items()}
    assert steps == {first.run_name: [1, 2, 3, 4, 5, 6], branch.run_name: [4, 5]}


@pytest.mark.integration
def test_the_users_own_tracker_settings_win(train_run, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    elsewhere = (tmp_path / "elsewhere").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = train_run(training_steps=2, metrics="wandb,mlflow", max_new_tokens=0)
    assert not (tmp_path / "logs" / "mlruns").exists()
    assert not list((summary.metrics_file.parent / "wandb").glob("offline-run-*"))
    client = MlflowClient(tracking_uri=elsewhere)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.run_name == summary.run_name


@pytest.mark.integration
def test_trackers_end_a_stopped_or_failed_run_as_such(tmp_path, train_run, monkeypatch) -> None:
    from lmtrain.errors import TrainingInterrupted

    recorder = _Recorder()
    writer = MetricsWriter(tmp_path / "metrics.jsonl", [recorder])
    with pytest.raises(TrainingInterrupted):
        try:
            raise TrainingInterrupted(2)
        finally:
            writer.close()
    assert recorder.calls == [("close", "stopped")]

    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import lmtrain.train.finish as finish

    def broken_sample(*args):
        raise UserError("PROMPT: cannot sample")

    monkeypatch.setattr(finish, "_sample", broken_sample)
    with pytest.raises(UserError):
        train_run(training_steps=2, metrics="mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
