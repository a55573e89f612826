"""Run names, the run log (Python ``logging``), the metrics file, the output file and the
lines a run reports (its settings, final losses, results and timings)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from lmtrain.config import INVOCATION_FIELDS, LoadedConfig, TrainingConfig
from lmtrain.errors import TrainingInterrupted
from lmtrain.trackers import Tracker, open_trackers, tracker_names

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
    model = config.model.model_type + ("-lora" if config.model.use_lora else "")
    return f"{model}-{data_label(config.data.training_data_source)}"


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
    """Flush and remove the session's handlers: the log file is closed (a failure to do so is
    already a warning) and no console handler outlives the session's stdout."""
    for handler in list(log.handlers):
        with contextlib.suppress(OSError, ValueError):
            handler.flush()
        log.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            with contextlib.suppress(OSError, ValueError):
                handler.close()


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` in the run's log folder, and hands
    each record's numbers to the experiment trackers (:mod:`lmtrain.trackers`).

    Numbers go to the trackers as ``<kind>/<name>`` (``train/train_loss``, ``eval/val_loss``,
    ``final/val_perplexity``) at the record's step. A resumed run appends to its run's
    history. A failed write (a full disk, a tracker's error) is reported once and ends that
    destination for this run, not the run: its checkpoints, not its metrics, are what a resume
    needs.
    """

    def __init__(self, path: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)
        self._fh: IO[str] | None = path.open("a", encoding="utf-8")
        self._start = time.perf_counter()

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        record.setdefault("elapsed", round(time.perf_counter() - self._start, 3))
        if self._fh is not None:
            try:
                self._fh.write(json.dumps(record) + "\n")
                self._fh.flush()
            except OSError as exc:
                log.warning("could not write %s (%s); metrics stop here, training goes on",
                            self.path, exc.strerror or exc)
                self._fh = None
        if "step" not in record:
            return
        prefix = record.get("kind") if record.get("kind") in ("eval", "final") else "train"
        scalars = {f"{prefix}/{key}": value for key, value in record.items()
                   if key not in ("step", "time", "elapsed")
                   and isinstance(value, int | float) and not isinstance(value, bool)}
        if scalars:
            self._each_tracker(lambda t: t.log_scalars(record["step"], scalars))

    def text(self, key: str, text: str, step: int) -> None:
        """A piece of text (the final sample): a ``kind: text`` record and each tracker's own."""
        self.write(step=step, kind="text", key=key, text=text)
        self._each_tracker(lambda t: t.log_text(key, text, step))

    def _each_tracker(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker's failure must not end the training run
                log.warning("%s: logging failed (%s); it stops here, training goes on",
                            tracker.name, exc)
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.close("failed")

    def close(self) -> None:
        """Close the file and end each tracker's part of the run; called while an exception
        propagates (a ``finally``), the trackers record the run as stopped or failed."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        status = run_status(sys.exc_info()[1])
        self._each_tracker(lambda t: t.close(status))
        self.trackers = []


def run_status(exc: BaseException | None) -> str:
    """``finished``, ``stopped`` (a signal: the run will resume) or ``failed``."""
    if exc is None:
        return "finished"
    return "stopped" if isinstance(exc, TrainingInterrupted | KeyboardInterrupt) else "failed"


def open_metrics(path: Path, config: TrainingConfig, run_name: str,
                 run_ids: dict[str, str]) -> MetricsWriter:
    """The run's metrics file plus the trackers ``METRICS`` names, continuing the tracker runs
    in ``run_ids`` (from the checkpoint) and recording the ids of new ones there. A new
    tracker run gets what the run *is* as its hyperparameters (not this invocation's paths)."""
    settings = {k: v for k, v in config.flat().items() if k not in INVOCATION_FIELDS}
    trackers = open_trackers(tracker_names(config.run.metrics), path.parent, run_name, run_ids,
                             settings)
    return MetricsWriter(path, trackers)


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
    from lmtrain.durable import atomic_write

    path = output_dir / f"{run_name}_{timestamp()}.txt"
    lines = [f"# lmtrain run {run_name}", "", f"model: {config.model.model_type}"
             f"{' + LoRA' if config.model.use_lora else ''}, "
             f"data: {config.data.training_data_source}",
             "", "## Settings", *settings, "", "## Losses"]
    lines += [f"{k}: {v}" for k, v in results.items()]
    lines += ["", "## Sample", sample, ""]
    atomic_write(path, lambda fh: fh.write("\n".join(lines).encode("utf-8")))
    return path


def settings_lines(loaded: LoadedConfig, saved: Mapping[str, Any] | None = None) -> list[str]:
    """``name = value  (source)`` for a fresh run's non-default settings; on resume (``saved``:
    the checkpoint's hyperparameters) only those that differ from the checkpoint (the rest is
    the checkpoint's, see ``lmtrain inspect``)."""
    if saved is None:
        return loaded.describe()
    lines, same = [], 0
    for name, value in sorted(loaded.config.flat().items()):
        source = loaded.sources.get(name, "default")
        if saved.get(name, value) == value and (name in saved or source == "default"):
            same += 1
            continue
        was = f"; checkpoint: {saved[name]!r}" if name in saved else ""
        lines.append(f"{name} = {value!r}  ({source}{was})")
    return [*lines, f"{same} other settings as in the checkpoint"]


def report_final(losses: Mapping[str, float], step: int, metrics: MetricsWriter | None) -> None:
    """The final val loss and perplexity: logged and recorded as the ``final`` record."""
    log.info("final: val loss %.4f, val perplexity %.2f", losses["val"], losses["val_perplexity"])
    if metrics:
        metrics.write(step=step, val_loss=losses["val"], val_perplexity=losses["val_perplexity"],
                      kind="final")


def run_results(run_name: str, start: int, end: int, start_losses: Mapping[str, float],
                final_losses: Mapping[str, float]) -> dict[str, Any]:
    """What a run reports in its output file: its steps and losses; on resume
    (``start_losses``: measured before the first step) also the change of each loss, logged as
    ``resumed run: train loss x at step a -> y at step b``."""
    results: dict[str, Any] = {"run": run_name, "start_step": start, "end_step": end,
                               **start_losses,
                               **{f"final_{k}": v for k, v in final_losses.items()}}
    for key in ("train", "val") if start_losses else ():
        before, after = start_losses[key], final_losses[key]
        results[f"{key}_change"] = after - before
        log.info("resumed run: %s loss %.4f at step %d -> %.4f at step %d (change %+.4f)",
                 key, before, start, after, end, after - before)
    return results


def report_output_file(config: TrainingConfig, output_dir: Path, run_name: str,
                       settings: list[str], results: dict[str, Any], sample: str) -> Path | None:
    """:func:`write_output_file`, logged; a failure is a warning (``None``): the run is trained
    and saved by then, only its report is missing."""
    try:
        path = write_output_file(config, output_dir, run_name, settings, results, sample)
    except OSError as exc:
        log.warning("could not write the output file in OUTPUT_DIR=%r (%s); the run and its "
                    "checkpoints are complete", str(output_dir), exc.strerror or exc)
        return None
    log.info("wrote %s", path)
    return path


def timings_line(timings: Mapping[str, float]) -> str:
    """``time: data 0.12s, train 3.40s, ...``: where a run's wall time went."""
    return "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
