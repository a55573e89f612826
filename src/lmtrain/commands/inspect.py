"""``lmtrain inspect CKPT``: what a checkpoint holds, after validating it (exit 2 if bad)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lmtrain.errors import UserError

if TYPE_CHECKING:
    from lmtrain.commands.checkpoint_facts import CheckpointFacts


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect", help="show what a checkpoint holds and check that it is valid",
        description="Validate a checkpoint (safely: it is never allowed to run code) and show "
                    "its step, model, optimizer, tokenizer, last losses, size and format version "
                    "(--settings: every setting it was trained with). "
                    "Exit status 2 when the file is not a usable checkpoint.")
    parser.add_argument("checkpoint", metavar="CKPT", help="a step_*.pt file written by lmtrain")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--settings", action="store_true",
                        help="also list every setting the run was trained with, by group")
    parser.set_defaults(func=run)


def describe(path: str | Path) -> CheckpointFacts:
    """The facts ``inspect`` shows; :class:`UserError` unless the file would resume (every key
    valid, digest intact, tokenizer rebuilt, weights and optimizer state fitting the model its
    settings describe)."""
    from lmtrain.checkpoint import load_run
    from lmtrain.commands.checkpoint_facts import facts_of
    from lmtrain.data.tokenizers import saved_tokenizer
    from lmtrain.inference import check_fits

    path = Path(path)
    run = load_run(path, label="CKPT")
    saved_tokenizer(run)
    check_fits(run)
    return facts_of(run, path)


def format_text(info: CheckpointFacts) -> str:
    """The aligned ``name  value`` lines ``inspect`` prints for :func:`describe`'s facts."""
    arch = ", ".join(f"{k}={v}" for k, v in info.architecture.items())
    model = info.model_type + (" + LoRA" if info.use_lora else "")
    losses = info.last_losses
    train, val, at = losses.get("train"), losses.get("val"), losses.get("step", info.step)
    loss_text = (f"train {train:.4f}, val {val:.4f} (at step {int(at or 0)})"
                 if train is not None and val is not None else "none recorded")
    best = (f"{info.best_val_loss:.4f} at step {info.best_step}"
            if info.best_val_loss is not None else "none recorded")
    rows = [
        ("checkpoint", info.path),
        ("valid", "yes"),
        ("size on disk", _size(info.size_bytes)),
        ("format version", f"{info.format_version} (lmtrain {info.lmtrain_version})"),
        ("run name", info.run_name),
        ("step", _step_text(info)),
        ("model", model),
        ("architecture", arch),
        ("optimizer", _optimizer_text(info)),
        ("weights saved", f"{info.parameters_saved:,} values"),
        ("tokenizer", f"{info.tokenizer.kind}, {info.tokenizer.vocab_size} tokens"),
        ("data", info.training_data_source),
        ("last losses", loss_text),
        ("best val loss", best),
        ("digest", f"sha256 {info.digest[:16]}… (checked)" if info.digest
         else "none (format 1)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _optimizer_text(info: CheckpointFacts) -> str:
    """``muon (lr 0.01) + adamw (lr 0.003)`` or ``adamw (lr 0.001)``: peak learning rates."""
    optimization = info.settings.get("optimization", {})
    adamw = f"adamw (lr {optimization.get('learning_rate')})"
    if info.optimizer == "muon":
        return f"muon (lr {optimization.get('muon_learning_rate')}) + {adamw}"
    return adamw


def settings_text(info: CheckpointFacts) -> str:
    """Every saved setting as ``ENV_NAME = value`` lines under one heading per group."""
    from lmtrain.config import env_name

    lines = []
    for label, values in info.settings.items():
        lines += ["", f"{label} settings"]
        lines += [f"  {env_name(name)} = {value!r}" for name, value in values.items()]
    return "\n".join(lines)


def _step_text(info: CheckpointFacts) -> str:
    """``4 of 4 planned``; a run extended past its plan with RESUME_STEPS says so."""
    step, planned = info.step, info.planned_steps
    if planned is not None and step > planned:
        return f"{step} (planned {planned}; extended with RESUME_STEPS)"
    return f"{step} of {planned} planned"


def _size(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def run(args: argparse.Namespace) -> int:
    """Print the checkpoint's facts (text or ``--json``); a bad file raises :class:`UserError`."""
    try:
        info = describe(args.checkpoint)
    except UserError as exc:
        if args.json:
            print(json.dumps({"path": args.checkpoint, "valid": False, "error": str(exc)}))
        raise
    if args.json:
        print(json.dumps({"valid": True, **asdict(info)}, indent=2))
    else:
        print(format_text(info))
        if args.settings:
            print(settings_text(info))
    return 0
