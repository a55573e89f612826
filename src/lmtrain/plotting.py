"""Loss curves from a run's metrics file (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path

from lmtrain.errors import UserError
from lmtrain.reporting import read_metrics

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger("lmtrain")


def metrics_path(target: str | Path) -> Path:
    """A run folder or a metrics file -> the metrics file; a clear error when there is none."""
    path = Path(target)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{target}: no {METRICS_FILE} here; give a run folder under LOG_DIR or "
                        f"its metrics file")
    return path


def plot_losses(metrics_file: Path, out: Path | None = None, log_scale: bool = False) -> Path:
    """Train and val loss against step, resume points marked, and the answer accuracy of a run
    on question/answer records on a second axis; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = sorted((r["step"], r["train_loss"]) for r in records
                   if r.get("kind") == "train" and r.get("train_loss") is not None)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    val = sorted((r["step"], r["val_loss"]) for r in evals)
    eval_train = sorted((r["step"], r["train_loss"]) for r in evals)
    resumes = sorted({r["step"] for r in records if r.get("kind") == "resume"})
    accuracy = sorted((r["step"], 100.0 * r["val_answer_accuracy"]) for r in records
                      if r.get("kind") == "eval" and r.get("val_answer_accuracy") is not None)
    if not train and not val:
        raise UserError(f"{metrics_file}: no losses recorded yet; train for a few steps first")
    out = out or metrics_file.parent / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (training batches)", linewidth=0.8,
                alpha=0.35, color="tab:blue")
    if eval_train:
        ax.plot(*zip(*eval_train, strict=True), "o-", label="train loss (eval)", markersize=3,
                color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", markersize=3,
                color="tab:orange")
    for i, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1,
                   label="resumed" if i == 0 else None)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_file.parent.name)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if accuracy:
        handles, labels = _accuracy_axis(ax, accuracy, handles, labels)
    ax.legend(handles, labels)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_run(metrics_file: Path) -> Path | None:
    """The loss-curve PNG beside a finished run's metrics, logged; a plotting failure is a
    warning (``None``), never a failed run."""
    try:
        path = plot_losses(metrics_file)
    except Exception as exc:  # a missing plot must not lose a finished run
        log.warning("could not draw the loss plot: %s", exc)
        return None
    log.info("loss plot: %s", path)
    return path
def _accuracy_axis(ax, accuracy: list[tuple[int, float]], handles: list, labels: list
                   ) -> tuple[list, list]:
    """Answer accuracy (percent) against step on a right-hand axis; the legend's entries."""
    right = ax.twinx()
    line = right.plot(*zip(*accuracy, strict=True), "s-", markersize=3, color="tab:green",
                      label="val answer accuracy (%)")
    right.set_ylabel("exact answers (%)")
    right.set_ylim(-2, 102)
    return [*handles, *line], [*labels, "val answer accuracy (%)"]
