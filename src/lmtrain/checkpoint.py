"""Checkpoints are data: one ``torch.save`` dict per file, written atomically, loaded with
``weights_only=True`` so that a checkpoint can never run code."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from lmtrain.errors import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version", "step", "model_state_dict", "optimizer_state_dict", "hyperparameters",
    "vocab_size", "block_size", "batch_size", "tokenizer",
)
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"


def checkpoint_filename(step: int) -> str:
    return f"step_{step:07d}.pt"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    path = Path(path)
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles code. Bad files raise :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CHECKPOINT_PATH={str(path)!r}: no such file; give a .pt checkpoint "
                        f"written by lmtrain, or 'auto'")
    if not zipfile.is_zipfile(path):
        raise UserError(f"CHECKPOINT_PATH={str(path)!r} is not an lmtrain checkpoint (not a "
                        f"torch.save archive; truncated, or another kind of file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"CHECKPOINT_PATH={str(path)!r} was refused: it holds objects other than plain data "
            f"and could run code when loaded ({first[:160]}); only load checkpoints you trust "
            f"and that lmtrain wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(
            f"CHECKPOINT_PATH={str(path)!r} is not a readable lmtrain checkpoint (truncated or "
            f"corrupt: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}); "
            f"pick an earlier checkpoint") from None
    validate_checkpoint(ckpt, path)
    return ckpt


def validate_checkpoint(ckpt: Any, path: str | Path) -> None:
    """Check that a loaded object is an lmtrain checkpoint this version understands."""
    if not isinstance(ckpt, dict):
        raise UserError(f"CHECKPOINT_PATH={str(path)!r} is not an lmtrain checkpoint "
                        f"(it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"CHECKPOINT_PATH={str(path)!r} is not an lmtrain checkpoint: it lacks "
                        f"{', '.join(missing)}")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"CHECKPOINT_PATH={str(path)!r} has format version {version}, newer than this "
            f"lmtrain understands ({FORMAT_VERSION}); upgrade lmtrain to resume it")


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the step checkpoints in a run folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def rotate_checkpoints(folder: str | Path, keep_last: int, protect: set[int]) -> list[Path]:
    """Delete step checkpoints beyond the newest ``keep_last``, sparing steps in ``protect``.

    Called only after the newest checkpoint is safely on disk. Returns the deleted paths.
    """
    found = list_checkpoints(folder)
    doomed = [p for step, p in found[:-keep_last] if step not in protect] if keep_last else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
