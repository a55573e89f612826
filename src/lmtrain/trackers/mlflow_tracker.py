"""MLflow: a local ``file:`` store at ``LOG_DIR/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set
(``mlflow ui --backend-store-uri LOG_DIR/mlruns`` browses it)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lmtrain.trackers import Tracker, flat_params

DEFAULT_EXPERIMENT = "lmtrain"
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
BATCH = 1000  # MLflow accepts at most 1000 metrics and 100 params per log_batch


def tracking_uri(log_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else the file store ``LOG_DIR/mlruns`` shared by all runs.

    MLflow 3 keeps its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``;
    choosing it here opts in, and, the store being local, keeps MLflow's usage telemetry off
    (``MLFLOW_DISABLE_TELEMETRY``), unless the user set those variables themselves.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return (log_dir.resolve() / "mlruns").as_uri()


class MlflowTracker(Tracker):
    """One MLflow run in experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``lmtrain``), driven
    through ``MlflowClient`` so no global active run is left behind; a resumed session logs to
    the saved run id again."""

    name = "mlflow"

    def __init__(self, uri: str, run_name: str, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id, self.resumed = run_id, True
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    @property
    def _id(self) -> str:
        """The run id (always set once the tracker is open)."""
        assert self.run_id is not None
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._id, params=items[i:i + 100])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self._id, metrics=metrics[i:i + BATCH])

    def log_text(self, key: str, text: str, step: int) -> None:
        self.client.log_text(self._id, text, f"{key}-step-{step:07d}.txt")

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self._id, status=STATUS[status])


def open_tracker(folder: Path, run_name: str, run_id: str | None) -> Tracker:
    """``folder`` is ``LOG_DIR/<run>``; the store sits one level up, beside every run."""
    return MlflowTracker(tracking_uri(folder.parent), run_name, run_id)
