"""Where a run lives: its name (one safe path component), its folders (computed here only) and
the locks that make one process the run's only writer, claimed for all ranks of a run by
:func:`claim_run_folders`. No heavy imports."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lmtrain.durable import ensure_writable_dir, unwritable_dir_error
from lmtrain.errors import UserError

LOCK_NAME = ".lock"
MAX_RUN_NAME = 200


def check_run_name(name: str, source: str = "RUN_NAME") -> str:
    """``name`` if it is one safe path component; a one-line :class:`UserError` otherwise.

    Refused: empty, ``.``/``..``, separators (``/``, ``\\``), absolute paths, control
    characters, names over 200 characters.
    """
    bad = None
    if not name or not name.strip():
        bad = "it is empty"
    elif name in (".", ".."):
        bad = "it names a folder above or at CHECKPOINT_DIR itself"
    elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
        bad = "it holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "it holds control characters"
    elif len(name) > MAX_RUN_NAME:
        bad = f"it is longer than {MAX_RUN_NAME} characters"
    if bad:
        raise UserError(f"{source}={name!r} is not a valid run name: {bad}; use one folder "
                        f"name such as 'shakespeare-small' (letters, digits, '.', '-', '_')")
    return name


@dataclass(frozen=True)
class RunPaths:
    """The folders one run writes: ``CHECKPOINT_DIR/<run>``, ``LOG_DIR/<run>``, ``OUTPUT_DIR``."""

    checkpoints: Path
    logs: Path
    outputs: Path

    @classmethod
    def of(cls, checkpoint_dir: str, log_dir: str, output_dir: str, run_name: str) -> RunPaths:
        """The one place a run's folders are joined from the settings and its (checked) name."""
        check_run_name(run_name)
        return cls(Path(checkpoint_dir) / run_name, Path(log_dir) / run_name, Path(output_dir))


def branch_name(run_name: str, step: int, taken: Callable[[str], bool]) -> str:
    """``<run>-from-<step>`` (then ``-2``, ``-3``...): the first name ``taken`` says is free."""
    base = f"{run_name}-from-{step}"[:MAX_RUN_NAME]
    name, n = base, 1
    while taken(name):
        n += 1
        name = f"{base}-{n}"
    return name


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held while a run writes ``folder``.

    The OS drops it when the process ends, however it ends (``kill -9`` included), so a lock
    is never stale. The file itself stays (removing it would race with a new holder).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self, setting: str = "CHECKPOINT_DIR") -> RunLock:
        """Take the lock or raise a one-line :class:`UserError` naming the holder."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
        except IsADirectoryError:
            raise UserError(f"{setting}: {str(self.path)!r} is a folder, where lmtrain keeps "
                            f"the run's lock file; move it away, then run again") from None
        except OSError as exc:
            raise unwritable_dir_error(setting, self.path.parent, exc) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(
                    f"run folder {str(self.path.parent)!r} is in use by {holder}; wait for it "
                    f"to finish, or pick another RUN_NAME") from None
            raise UserError(f"{setting}={str(self.path.parent)!r}: cannot lock the run folder "
                            f"({exc.strerror or exc})") from None
        with contextlib.suppress(OSError):  # who holds it, for the message above
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same(value: Any) -> Any:
    return value


@contextlib.contextmanager
def claim_run_folders(paths: RunPaths, checkpoints: bool = True, outputs: bool = False,
                      is_main: bool = True, agree: Callable[[Any], Any] = _same,
                      ) -> Iterator[None]:
    """Hold the run's folders for the block: one writer per run.

    Rank 0 (``is_main``) locks the checkpoint folder (when ``checkpoints``) and the log folder
    for every rank of the run; ``agree`` shares its outcome (rank 0's value on every rank), so
    all ranks fail together on a folder in use. Then every folder the run will write
    (``outputs``: ``OUTPUT_DIR`` too) must be writable. On exit the locks are released and a
    run folder the block created, left empty but for its lock, is removed again.
    """
    created = [p for p in (paths.checkpoints, paths.logs) if not p.exists()] if is_main else []
    folders = [(paths.logs, "LOG_DIR")]
    if checkpoints:
        folders.insert(0, (paths.checkpoints, "CHECKPOINT_DIR"))
    try:
        locks = _lock_folders(folders, is_main, agree)
        try:
            ensure_writable_dir(paths.logs, "LOG_DIR")
            if checkpoints:
                ensure_writable_dir(paths.checkpoints, "CHECKPOINT_DIR")
            if outputs:
                ensure_writable_dir(paths.outputs, "OUTPUT_DIR")
            yield
        finally:
            for lock in reversed(locks):
                lock.release()
    finally:
        _remove_unused(created)


def _lock_folders(folders: list[tuple[Path, str]], is_main: bool,
                  agree: Callable[[Any], Any]) -> list[RunLock]:
    """The folders' locks, taken in order by rank 0 (none elsewhere); a one-line
    :class:`UserError` on every rank when rank 0 could not take them all."""
    locks: list[RunLock] = []
    error = None
    if is_main:
        try:
            for folder, setting in folders:
                locks.append(RunLock(folder).acquire(setting))
        except UserError as exc:
            error = str(exc)
            for lock in locks:
                lock.release()
    error = agree(error)
    if error:
        raise UserError(error)
    return locks


def _remove_unused(created: list[Path]) -> None:
    """Remove run folders that hold nothing but the lock file."""
    for folder in created:
        try:
            entries = list(folder.iterdir())
            if all(p.name == LOCK_NAME for p in entries):
                for p in entries:
                    p.unlink()
                folder.rmdir()
        except OSError:
            continue
