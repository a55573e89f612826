"""``lmtrain plot RUN_DIR_OR_METRICS_FILE``: draw a run's loss curves to a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's train/val loss curves to a PNG",
                       description="Plot train and val loss against step (resume points marked) "
                                   "from a run folder under LOG_DIR or its metrics.jsonl.")
    p.add_argument("target", metavar="RUN_DIR_OR_METRICS_FILE")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="PNG to write (default: loss.png beside the metrics file)")
    p.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.plotting import metrics_path, plot_losses

    out = plot_losses(metrics_path(args.target), args.output, args.log_scale)
    print(out)
    return 0
