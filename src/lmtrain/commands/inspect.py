"""``lmtrain inspect CKPT``: what a checkpoint holds, after validating it (exit 2 if bad)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lmtrain.errors import UserError

ARCHITECTURE_KEYS = {
    "from_scratch": ("n_layer", "n_head", "n_embd", "block_size", "dropout"),
    "gpt2": ("gpt2_model_name", "block_size", "dropout"),
}
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect", help="show what a checkpoint holds and check that it is valid",
        description="Validate a checkpoint (safely: it is never allowed to run code) and show "
                    "its step, model, tokenizer, last losses, size and format version. "
                    "Exit status 2 when the file is not a usable checkpoint.")
    parser.add_argument("checkpoint", metavar="CKPT", help="a step_*.pt file written by lmtrain")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(func=run)


def describe(path: str | Path) -> dict[str, Any]:
    """The facts ``inspect`` shows, as plain JSON-ready data; :class:`UserError` if bad."""
    from lmtrain.checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path, label="CKPT")
    hp = ckpt["hyperparameters"]
    model_type = ckpt.get("model_type") or hp.get("model_type", "from_scratch")
    use_lora = bool(hp.get("use_lora"))
    keys = ARCHITECTURE_KEYS.get(model_type, ()) + (LORA_KEYS if use_lora else ())
    try:
        tokenizer = json.loads(ckpt["tokenizer"])
    except (TypeError, ValueError):
        raise UserError(f"CKPT={str(path)!r}: the checkpoint's tokenizer is not valid JSON; "
                        f"the file is damaged") from None
    weights = ckpt["model_state_dict"]
    losses = {k: _number(v) for k, v in (ckpt.get("last_losses") or {}).items()}
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "format_version": ckpt["format_version"],
        "lmtrain_version": ckpt.get("lmtrain_version"),
        "run_name": ckpt.get("run_name"),
        "step": int(ckpt["step"]),
        "planned_steps": hp.get("training_steps"),
        "model_type": model_type,
        "use_lora": use_lora,
        "architecture": {k: hp.get(k) for k in keys},
        "parameters_saved": sum(int(t.numel()) for t in weights.values()
                                if hasattr(t, "numel")),
        "tokenizer": {"kind": tokenizer.get("kind"), "vocab_size": int(ckpt["vocab_size"])},
        "batch_size": int(ckpt["batch_size"]),
        "training_data_source": hp.get("training_data_source"),
        "last_losses": losses,
        "best_val_loss": _number(ckpt.get("best_val_loss")),
        "best_step": ckpt.get("best_step"),
    }


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` for a missing or non-finite value (JSON has no inf/nan)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_text(info: dict[str, Any]) -> str:
    """The aligned ``name  value`` lines ``inspect`` prints for :func:`describe`'s facts."""
    arch = ", ".join(f"{k}={v}" for k, v in info["architecture"].items())
    model = info["model_type"] + (" + LoRA" if info["use_lora"] else "")
    losses = info["last_losses"]
    loss_text = (f"train {losses['train']:.4f}, val {losses['val']:.4f} "
                 f"(at step {int(losses.get('step', info['step']))})"
                 if losses.get("train") is not None and losses.get("val") is not None
                 else "none recorded")
    best = (f"{info['best_val_loss']:.4f} at step {info['best_step']}"
            if info["best_val_loss"] is not None else "none recorded")
    rows = [
        ("checkpoint", info["path"]),
        ("valid", "yes"),
        ("size on disk", _size(info["size_bytes"])),
        ("format version", f"{info['format_version']} (lmtrain {info['lmtrain_version']})"),
        ("run name", info["run_name"]),
        ("step", f"{info['step']} of {info['planned_steps']} planned"),
        ("model", model),
        ("architecture", arch),
        ("weights saved", f"{info['parameters_saved']:,} values"),
        ("tokenizer", f"{info['tokenizer']['kind']}, {info['tokenizer']['vocab_size']} tokens"),
        ("data", info["training_data_source"]),
        ("last losses", loss_text),
        ("best val loss", best),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
    print(json.dumps({"valid": True, **info}, indent=2) if args.json else format_text(info))
    return 0
