"""Checkpoint files: one ``torch.save`` dict per file, written atomically, loaded with
``weights_only=True`` so that a checkpoint can never run code, found and rotated in a run's
folder. What a checkpoint holds is :mod:`lmtrain.checkpoint_format`'s; readers get it as a
:class:`~lmtrain.checkpoint_format.SavedRun` (:func:`load_run`)."""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lmtrain.checkpoint_format import SavedRun, seal, validate
from lmtrain.durable import atomic_write
from lmtrain.errors import UserError
from lmtrain.paths import not_a_file, user_path
from lmtrain.sharded_checkpoint import is_sharded_checkpoint, load_sharded_run

if TYPE_CHECKING:  # torch is imported where it is used: finding checkpoints stays light
    import torch

AUTO_RESUME = "auto"  # CHECKPOINT_PATH value: the run's newest valid checkpoint
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.(pt|dcp)$")


def checkpoint_filename(step: int, sharded: bool = False) -> str:
    """The file name of the checkpoint of ``step`` (zero-padded, so names sort by step); a
    sharded checkpoint is a folder (:mod:`lmtrain.sharded_checkpoint`)."""
    return f"step_{step:07d}.{'dcp' if sharded else 'pt'}"


class _Recording:
    """A file wrapper that remembers the ``OSError`` a write raised: ``torch.save`` turns it
    into a ``RuntimeError`` without its errno, which :func:`save_checkpoint` gives back."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh: IO[bytes] = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts), sealed with its content
    digest, atomically to ``path``. A failed write (a full disk) raises ``OSError``."""
    import torch

    path = Path(path)
    sealed = seal(payload)

    def write(fh: IO[bytes]) -> None:
        rec = _Recording(fh)
        try:
            torch.save(sealed, rec)  # type: ignore[arg-type]  # a file-like writer
        except RuntimeError as exc:
            if rec.error is not None:
                raise rec.error from None
            raise OSError(f"torch.save failed: {str(exc).splitlines()[0][:160]}") from None

    atomic_write(path, write)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    label: str = "CHECKPOINT_PATH") -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles code. Bad files raise :class:`UserError`.

    ``label`` names what the path came from in messages (a setting or a command). Returns the
    plain dict as saved (to copy or craft from); readers use :func:`load_run`.
    """
    path = Path(path)
    where = f"{label}={str(path)!r}"
    ckpt = _read(path, where, map_location, label)
    validate(ckpt, where)
    return ckpt


def load_run(path: str | Path, map_location: str | torch.device = "cpu",
             label: str = "CHECKPOINT_PATH") -> SavedRun:
    """Load and validate a checkpoint as the read-only view every reader uses; see
    :func:`load_checkpoint`."""
    where = f"{label}={str(path)!r}"
    path = user_path(path, label)  # ~ expanded before the folder is looked at
    if is_sharded_checkpoint(path):  # PARALLEL=fsdp: a folder of DCP shards
        return load_sharded_run(path, label)
    return SavedRun.validated(_read(path, where, map_location, label), where)


def _read(path: Path, where: str, map_location: str | torch.device, label: str) -> Any:
    """What ``torch.load(weights_only=True)`` finds in ``path``; a missing, foreign, truncated
    or code-carrying file is one line."""
    import torch

    path = user_path(path, label)
    problem = not_a_file(path)
    if problem:
        auto = f", or {AUTO_RESUME!r}" if label == "CHECKPOINT_PATH" else ""
        raise UserError(f"{where}: {problem}; give a .pt checkpoint written by lmtrain{auto}")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise UserError(f"{where} is not a checkpoint: not a torch.save archive (truncated, "
                        f"or some other kind of file); pick an earlier checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln),
                      lines[0] if lines else type(exc).__name__)
        raise UserError(
            f"{where} was refused and nothing in it was run: it holds objects other than plain "
            f"data that could run code when loaded ({reason[:160]}); load only checkpoints "
            f"that lmtrain wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{where} is not a readable lmtrain checkpoint (truncated or corrupt: "
                        f"{detail}); pick an earlier checkpoint") from None


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the step checkpoints in a run folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p.is_dir() if m.group(2) == "dcp" else p.is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def rotate_checkpoints(folder: str | Path, keep_last: int, protect: set[int],
                       upto: int | None = None) -> list[Path]:
    """Delete step checkpoints beyond the newest ``keep_last``, sparing steps in ``protect``.

    Only steps up to ``upto`` (the run's current step) count: files of later steps, left by an
    abandoned branch or skipped as corrupt, are neither kept in place of new ones nor deleted
    (the run overwrites them when it gets there). Called only after the newest checkpoint is
    safely on disk. Returns the deleted paths; a file that cannot be deleted stays.
    """
    found = [(s, p) for s, p in list_checkpoints(folder) if upto is None or s <= upto]
    doomed = [p for step, p in found[:-keep_last] if step not in protect] if keep_last else []
    deleted = []
    for p in doomed:
        try:
            if p.is_dir():  # a sharded checkpoint: its shards, then the folder
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except OSError:  # not ours to delete (permissions): kept, tried again next time
            continue
        deleted.append(p)
    return deleted


def find_resumable(folder: str | Path, check: Callable[[SavedRun], object] | None = None,
                   ) -> tuple[Path | None, SavedRun | None, list[str]]:
    """The newest step checkpoint in ``folder`` that loads, validates and passes ``check``
    (which raises :class:`UserError` for a checkpoint it refuses).

    Returns ``(path, run, problems)``; ``problems`` has one line per newer file that was
    skipped. ``(None, None, problems)`` when no checkpoint is usable.
    """
    problems: list[str] = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            run = load_run(path)
            if check is not None:
                check(run)
        except UserError as exc:
            problems.append(f"skipped {path.name}: {exc}")
            continue
        return path, run, problems
    return None, None, problems
