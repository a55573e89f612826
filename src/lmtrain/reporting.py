"""Run names, the run log (Python ``logging``), the metrics file and the output file."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lmtrain.config import TrainingConfig
from lmtrain.errors import UserError

log = logging.getLogger("lmtrain")


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "data"


def data_label(source: str) -> str:
    """A short name for a data source: the file or folder stem."""
    return slug(Path(source.rstrip("/")).stem.replace("*", "all"))


def stable_run_name(config: TrainingConfig) -> str:
    """``<model>-<data>``: the run name ``CHECKPOINT_PATH=auto`` finds again on every launch."""
    model = config.model_type + ("-lora" if config.use_lora else "")
    return f"{model}-{data_label(config.training_data_source)}"


def default_run_name(config: TrainingConfig) -> str:
    return f"{stable_run_name(config)}-{timestamp()}"


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


class _ConsoleFilter(logging.Filter):
    """Records marked ``file_only`` (an error the entrypoint prints itself) skip the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _LogFile(logging.FileHandler):
    """The run's log file. A failing write (a full disk, a vanished folder) is reported once on
    stderr and ends the log file, not the run: checkpoints, not logs, are what a resume needs."""

    failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        sys.stderr.write(f"warning: could not write the log {self.baseFilename} ({reason}); "
                         f"the log stops here, the run goes on\n")
        log.removeHandler(self)
        with contextlib.suppress(OSError, ValueError):
            self.close()

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(None)


def setup_logging(log_file: Path | None, quiet: bool = False) -> None:
    """Send ``lmtrain`` log records to stdout and, when given, to ``log_file``."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not quiet:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_Plain())
        console.addFilter(_ConsoleFilter())
        log.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = _LogFile(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


def close_logging() -> None:
    """Flush and close the log file (a failure to do so is already a warning)."""
    for handler in list(log.handlers):
        with contextlib.suppress(OSError, ValueError):
            handler.flush()
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            with contextlib.suppress(OSError, ValueError):
                handler.close()


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` in the run's log folder.

    With ``tensorboard=True`` the numeric values also go to TensorBoard event files in the same
    folder (needs the ``tensorboard`` extra). A resumed run appends to its run's history. A
    failed write (a full disk) is reported once and ends metrics for this run, not the run:
    its checkpoints, not its metrics, are what a resume needs.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = _tensorboard_writer(path.parent) if tensorboard else None
        self._fh = path.open("a", encoding="utf-8")
        self._start = time.perf_counter()

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        record.setdefault("elapsed", round(time.perf_counter() - self._start, 3))
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as exc:
            log.warning("could not write %s (%s); metrics stop here, training goes on",
                        self.path, exc.strerror or exc)
            self._fh = None
            return
        if self._tb is not None and "step" in record:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "time", "elapsed") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("METRICS=tensorboard needs the tensorboard extra: "
                        "pip install 'lmtrain[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics file, skipping a torn last line."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_output_file(config: TrainingConfig, output_dir: Path, run_name: str,
                      settings: list[str], results: dict[str, Any], sample: str) -> Path:
    """The ENABLE_OUTPUT_TO_FILE report ``<run>_<time>.txt``: the run, its settings, losses
    (with their changes on resume) and the generated sample; written atomically."""
    from lmtrain.checkpoint import atomic_write

    path = output_dir / f"{run_name}_{timestamp()}.txt"
    lines = [f"# lmtrain run {run_name}", "", f"model: {config.model_type}"
             f"{' + LoRA' if config.use_lora else ''}, data: {config.training_data_source}",
             "", "## Settings", *settings, "", "## Losses"]
    lines += [f"{k}: {v}" for k, v in results.items()]
    lines += ["", "## Sample", sample, ""]
    atomic_write(path, lambda fh: fh.write("\n".join(lines).encode("utf-8")))
    return path
