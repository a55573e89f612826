"""Checkpoint files: one ``torch.save`` dict per file, written atomically, loaded with
``weights_only=True`` so that a checkpoint can never run code, found and rotated in a run's
folder. What a checkpoint holds is :mod:`lmtrain.checkpoint_schema`'s."""

from __future__ import annotations

import os
import pickle
import re
import secrets
import socket
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lmtrain.checkpoint_schema import FORMAT_VERSION as FORMAT_VERSION  # re-exported
from lmtrain.checkpoint_schema import REQUIRED_KEYS as REQUIRED_KEYS  # re-exported
from lmtrain.checkpoint_schema import seal, validate
from lmtrain.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used, so atomic_write stays light
    import torch

AUTO_RESUME = "auto"  # CHECKPOINT_PATH value: the run's newest valid checkpoint
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"
#: ``.tmp-<pid>@<host>-<random>.part``: the writer's pid and host tell a dead writer's leftover
#: (removed at the next start) from a live one's, on this machine or another sharing the folder.
TMP_RE = re.compile(r"^\.tmp-(?:(\d+)(?:@(\w+))?-)?.*\.part$")


def _host_tag() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"



def checkpoint_filename(step: int) -> str:
    """The file name of the checkpoint of ``step`` (zero-padded, so names sort by step)."""
    return f"step_{step:07d}.pt"


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, fsync, then ``os.replace``.

    The temp file is named after this process (see :func:`remove_stale_temp_files`) and
    created with the umask's permissions, as a plain ``open`` would (``mkstemp`` gives 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (f"{TMP_PREFIX}{os.getpid()}@{_host_tag()}-{secrets.token_hex(6)}"
                         f"{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Recording:
    """A file wrapper that remembers the ``OSError`` a write raised: ``torch.save`` turns it
    into a ``RuntimeError`` without its errno, which :func:`save_checkpoint` gives back."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.error = fh, None

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
            torch.save(sealed, rec)
        except RuntimeError as exc:
            if rec.error is not None:
                raise rec.error from None
            raise OSError(f"torch.save failed: {str(exc).splitlines()[0][:160]}") from None

    atomic_write(path, write)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    label: str = "CHECKPOINT_PATH") -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles code. Bad files raise :class:`UserError`.

    ``label`` names what the path came from in messages (a setting or a command).
    """
    import torch

    path = Path(path)
    where = f"{label}={str(path)!r}"
    if not path.is_file():
        auto = f", or {AUTO_RESUME!r}" if label == "CHECKPOINT_PATH" else ""
        raise UserError(f"{where}: no such file; give a .pt checkpoint written by lmtrain{auto}")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise UserError(f"{where} is not a checkpoint: not a torch.save archive (truncated, "
                        f"or some other kind of file); pick an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    validate(ckpt, where)
    return ckpt

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
            p.unlink(missing_ok=True)
        except OSError:  # not ours to delete (permissions): kept, tried again next time
            continue
        deleted.append(p)
    return deleted


def find_resumable(folder: str | Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest step checkpoint in ``folder`` that loads and validates.

    Returns ``(path, checkpoint, problems)``; ``problems`` has one line per newer file that was
    skipped. ``(None, None, problems)`` when no checkpoint is usable.
    """
    problems = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path), problems
        except UserError as exc:
            problems.append(f"skipped {path.name}: {exc}")
    return None, None, problems


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files that a killed writer left in ``folder``; returns what was removed.

    Files of a writer that is still running (another process), and files written from another
    host (whose processes cannot be checked from here), are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = TMP_RE.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if m.group(2) and m.group(2) != _host_tag():
            continue
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def storage_error(setting: str, path: Path, exc: OSError) -> UserError:
    """The one line for a write that failed under a setting's folder (a full disk, no
    permission): what failed, why, and what to do; nothing written before it is lost."""
    return UserError(f"{setting}: writing {str(path)!r} failed ({exc.strerror or exc}); free "
                     f"space or set {setting} to a writable folder with room, then run again")


def ensure_writable_dir(path: str | Path, setting: str) -> None:
    """Create ``path`` if needed and prove it takes files; a clear :class:`UserError` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=TMP_PREFIX):
            pass
    except OSError as exc:
        raise UserError(f"{setting}={str(path)!r} cannot be written ({exc.strerror or exc}); "
                        f"pick a folder you can write to") from None
