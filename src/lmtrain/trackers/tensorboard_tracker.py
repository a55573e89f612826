"""TensorBoard event files in the run's log folder (``tensorboard --logdir LOG_DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtrain.trackers import Tracker, flat_params


class TensorBoardTracker(Tracker):
    """A ``SummaryWriter`` on the run's folder; a resumed run appends to the same curves."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # earlier event files in the folder mean an earlier session of this run
        self.resumed = any(folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        exp, start, end = hparams(flat_params(params),
                                  {"eval/val_loss": 0.0, "train/train_loss": 0.0})
        file_writer = self.writer.file_writer
        assert file_writer is not None  # SummaryWriter opens it in __init__
        for summary in (exp, start, end):
            file_writer.add_summary(summary)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()


def open_tracker(folder: Path, run_name: str, run_id: str | None) -> Tracker:
    return TensorBoardTracker(folder)
