"""Paths given by a user, told apart in one line: a name the OS cannot hold (too long, a NUL
byte), ``~user`` of a user this machine does not know, and why a path is no readable file (no
such file, a folder, a FIFO, a symlink loop, no permission) instead of "no such file" for all.
No heavy imports: the settings check their paths with it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from lmtrain.errors import UserError

#: The longest file name (one path component) and path, in bytes, that Linux and macOS take.
NAME_MAX = 255
PATH_MAX = 4095


def path_problem(value: str) -> str | None:
    """What makes ``value`` unusable as a path on this OS, or ``None``."""
    if "\0" in value:
        return "it holds a NUL character"
    expanded = os.path.expanduser(value)
    if expanded.startswith("~") and (expanded[1:2] not in ("", os.sep)):
        user = expanded[1:].split(os.sep, 1)[0]
        return f"~{user} names the home folder of a user this machine does not know"
    try:
        raw = os.fsencode(expanded)
    except UnicodeError:
        return "it is not text the file system can store"
    if len(raw) > PATH_MAX:
        return f"it is {len(raw)} bytes long, over the {PATH_MAX} a path may have"
    longest = max((len(part) for part in raw.split(os.sep.encode())), default=0)
    if longest > NAME_MAX:
        return f"a name in it is {longest} bytes long, over the {NAME_MAX} a file name may have"
    return None


def user_path(value: str | os.PathLike[str], label: str) -> Path:
    """``value`` as a :class:`Path` with ``~`` expanded; one line naming ``label`` if the OS
    cannot use it."""
    text = os.fspath(value)
    problem = path_problem(text)
    if problem:
        raise UserError(f"{label}={text!r} is not a usable path: {problem}")
    return Path(os.path.expanduser(text))


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is no regular file this process can read (``None`` when it is one)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return {errno.ENOENT: "no such file", errno.ELOOP: "a symlink loop",
                errno.ENOTDIR: "a part of it is a file, not a folder",
                errno.EACCES: "not readable (permission denied)",
                errno.ENAMETOOLONG: "a name too long for this OS"}.get(
                    exc.errno or 0, f"not readable ({exc.strerror or exc})")
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a file"
    if not stat.S_ISREG(mode):
        return "a device or socket, not a file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None
