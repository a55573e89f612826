"""Durable file writes: a file is replaced whole or not at all (temp file, fsync, rename),
a killed writer's temp files are recognised and removed, and a failed write is one line that
names the setting whose folder failed. Checkpoints, the token cache, logs and output files all
write through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lmtrain.errors import UserError
from lmtrain.paths import user_path

TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"
#: ``.tmp-<pid>@<host>-<12 hex>.part``: the writer's pid and host tell a dead writer's leftover
#: (removed at the next start) from a live one's, on this machine or another sharing the folder.
#: Only names of exactly this form are lmtrain's: a user's own ``.tmp-notes.part`` is left alone.
TMP_RE = re.compile(r"^\.tmp-(\d+)(?:@(\w+))?-[0-9a-f]{12}\.part$")


def _host_tag() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _temp_path(folder: Path) -> Path:
    """A new temp name in ``folder`` of the one form :data:`TMP_RE` recognises."""
    return folder / f"{TMP_PREFIX}{os.getpid()}@{_host_tag()}-{secrets.token_hex(6)}{TMP_SUFFIX}"


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, fsync, then ``os.replace``.

    The temp file is named after this process (see :func:`remove_stale_temp_files`) and
    created with the umask's permissions, as a plain ``open`` would (``mkstemp`` gives 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path.parent)
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
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (fsync of the folder itself)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_folder(tmp: Path, path: Path, old: Path) -> None:
    """Put the filled folder ``tmp`` at ``path`` in one rename. A folder already at ``path``
    is set aside as ``old`` first, put back if the rename fails, and removed after."""
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    with contextlib.suppress(OSError):  # the rename is done; its fsync is the best we can do
        fsync_folder(path.parent)
    shutil.rmtree(old, ignore_errors=True)


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
        pid = int(m.group(1))
        if m.group(2) and m.group(2) != _host_tag():
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def storage_error(setting: str, path: Path, exc: OSError) -> UserError:
    """The one line for a write that failed under a setting's folder (a full disk, no
    permission): what failed, why, and what to do; nothing written before it is lost."""
    return UserError(f"{setting}: writing {str(path)!r} failed ({exc.strerror or exc}); free "
                     f"space or set {setting} to a writable folder with room, then run again")


def unwritable_dir_error(setting: str, path: Path, exc: OSError) -> UserError:
    """The one line for a setting's folder that cannot be created or written to."""
    return UserError(f"{setting}={str(path)!r} cannot be written ({exc.strerror or exc}); "
                     f"pick a folder you can write to")


def ensure_writable_dir(path: str | Path, setting: str) -> None:
    """Create ``path`` if needed and prove it takes files; a clear :class:`UserError` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=TMP_PREFIX):
            pass
    except OSError as exc:
        raise unwritable_dir_error(setting, path, exc) from None


@contextlib.contextmanager
def atomic_folder(path: str | Path, setting: str, force: bool = False) -> Iterator[Path]:
    """A folder written whole or not at all: the block fills a temp folder beside ``path``,
    which then replaces ``path`` (an empty one, or any one with ``force``) in one rename.

    ``path`` that is a file, or a folder holding files without ``force``, is refused before
    anything is written; a failed or interrupted block leaves ``path`` as it was and no temp
    folder behind. A storage error is one line naming ``setting``.
    """
    path = user_path(path, setting)
    if path.exists() and not path.is_dir():
        raise UserError(f"{setting}={str(path)!r} is a file, not a folder; give a folder "
                        f"name (it is created)")
    try:
        filled = path.is_dir() and any(path.iterdir())
    except OSError as exc:
        raise unwritable_dir_error(setting, path, exc) from None
    if filled and not force:
        raise UserError(f"{setting}={str(path)!r} is not empty; give a new or empty folder, "
                        f"or --force to replace it whole")
    tmp = _temp_path(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise unwritable_dir_error(setting, path.parent, exc) from None
    try:
        yield tmp
        replace_folder(tmp, path, tmp.with_name(tmp.name.replace(TMP_SUFFIX, f"-old{TMP_SUFFIX}")))
    except OSError as exc:
        raise storage_error(setting, path, exc) from None
    except Exception as exc:  # a library's own error around a failed write (safetensors')
        wrapped = os_error_of(exc)
        if wrapped is None:
            raise
        raise storage_error(setting, path, wrapped) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` a library's exception reports in its text (``... (os error 28)``, as
    Rust libraries such as safetensors write it), or ``None``."""
    found = re.search(r"os error (\d+)", str(exc))
    if not found:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))
