"""Where a run lives: its name (one safe path component), its folders (computed here only) and
the lock that makes one process the run's only writer. No heavy imports."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lmtrain.durable import unwritable_dir_error
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
