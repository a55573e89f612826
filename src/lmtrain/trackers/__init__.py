"""Experiment trackers: where a run's scalars, settings and final sample go besides metrics.jsonl.

``METRICS`` names them as a comma list: ``jsonl`` (always on), ``tensorboard``, ``wandb``,
``mlflow``. Each tracker is one small class behind :class:`Tracker`; the
:class:`~lmtrain.reporting.MetricsWriter` hands every record to each of them. A tracker's run id
is saved in the checkpoint, so a resumed run continues the same tracker run.

This module imports nothing heavy: the config validates ``METRICS`` with it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from lmtrain.errors import UserError

#: tracker name -> (module under lmtrain.trackers, the package it needs, the extra to install)
TRACKERS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("tensorboard_tracker", "tensorboard", "tensorboard"),
    "wandb": ("wandb_tracker", "wandb", "wandb"),
    "mlflow": ("mlflow_tracker", "mlflow", "mlflow"),
}
METRICS_NAMES = ("jsonl", *TRACKERS)


def normalize_metrics(value: Any) -> str:
    """``METRICS`` as a canonical comma list, ``jsonl`` first (a list or a comma string in)."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [n for n in names if n not in METRICS_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics sink {unknown[0]!r}; use a comma list of "
                         f"{', '.join(METRICS_NAMES)}")
    return ",".join(n for n in METRICS_NAMES if n == "jsonl" or n in names)


def tracker_names(metrics: str) -> list[str]:
    """The trackers ``METRICS`` asks for, besides the always-on jsonl file."""
    return [n for n in normalize_metrics(metrics).split(",") if n != "jsonl"]


def check_installed(names: list[str]) -> None:
    """One line naming the extra to install when a tracker's package is missing."""
    for name in names:
        _, package, extra = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"METRICS={name} needs the {extra} extra: "
                            f"pip install 'lmtrain[{extra}]'")


class Tracker:
    """One experiment tracker. ``run_id`` names its run (saved in checkpoints, ``None`` when the
    tracker has no run of its own); ``resumed`` is true when an existing run was continued."""

    name = ""
    run_id: str | None = None
    resumed = False

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's settings, once per tracker run."""

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Numbers keyed ``<kind>/<name>`` (``train/train_loss``, ``eval/val_loss``) at ``step``."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """A piece of text (the final sample) at ``step``."""

    def close(self, status: str = "finished") -> None:
        """Flush and end this process's part of the run: ``finished``, ``stopped`` (by a
        signal; a resume continues it) or ``failed``."""


def open_trackers(names: list[str], folder: Path, run_name: str, run_ids: dict[str, str],
                  params: dict[str, Any]) -> list[Tracker]:
    """Start (or, with a saved id in ``run_ids``, continue) each named tracker in ``folder``.

    A new tracker run gets ``params`` as its hyperparameters; ``run_ids`` receives every
    tracker's run id, for the checkpoint. The packages were checked before the run started
    (:func:`check_installed`, in the session's checks before any work).
    """
    trackers: list[Tracker] = []
    try:
        for name in names:
            module = importlib.import_module(f"lmtrain.trackers.{TRACKERS[name][0]}")
            try:
                tracker = module.open_tracker(folder, run_name, run_ids.get(name))
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise UserError(f"METRICS={name}: could not start the tracker ({first}); "
                                f"check its settings or drop it from METRICS") from None
            trackers.append(tracker)
            if not tracker.resumed:
                tracker.log_params(params)
            if tracker.run_id:
                run_ids[name] = tracker.run_id
    except BaseException:
        for tracker in trackers:
            tracker.close("failed")
        raise
    return trackers


def flat_params(params: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Settings as scalars every tracker accepts (``None`` becomes ``"None"``)."""
    return {k: v if isinstance(v, str | int | float | bool) else str(v)
            for k, v in params.items()}
