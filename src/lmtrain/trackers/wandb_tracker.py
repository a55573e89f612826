"""Weights & Biases: offline run files under ``LOG_DIR/<run>/wandb`` unless ``WANDB_MODE`` says
otherwise (``wandb sync LOG_DIR/<run>/wandb/offline-run-*`` uploads them later)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmtrain.trackers import Tracker, flat_params

DEFAULT_PROJECT = "lmtrain"


class WandbTracker(Tracker):
    """One wandb run; every value is logged against the run's own ``step`` metric, so a resumed
    session (same run id, ``resume="allow"``) extends the same curves."""

    name = "wandb"

    def __init__(self, folder: Path, run_name: str, run_id: str | None) -> None:
        import wandb

        self.resumed = run_id is not None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name,
            id=run_id, resume="allow", dir=str(folder),
            mode=os.environ.get("WANDB_MODE") or "offline",  # type: ignore[arg-type]
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True,
                                    disable_git=True, save_code=False))
        self.run_id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(flat_params(params), allow_val_change=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def log_text(self, key: str, text: str, step: int) -> None:
        import wandb

        self.run.log({"step": step, key: wandb.Table(columns=["step", "text"],
                                                      data=[[step, text]])})

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def open_tracker(folder: Path, run_name: str, run_id: str | None) -> Tracker:
    return WandbTracker(folder, run_name, run_id)
