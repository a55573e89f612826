"""The last line of defence: an exception that reaches the command line (a bug in lmtrain, not
the user's mistake) becomes one line saying what failed and where its full traceback was
written, and exit status 1. The traceback itself is shown only with ``--debug`` or
``LMTRAIN_DEBUG=1``. A closed pipe (``lmtrain inspect CK | head``) ends quietly, as
``git log | head`` does."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

#: Exit status of an internal error (bad input is 2, a signal 128 + its number).
INTERNAL_ERROR = 1
#: Exit status after the reader of stdout went away (128 + SIGPIPE), as ``git`` exits.
BROKEN_PIPE = 128 + signal.SIGPIPE
#: The attribute a session sets on an exception whose traceback its run's log holds.
LOG_ATTRIBUTE = "lmtrain_log"


def debug_wanted() -> bool:
    """Whether ``LMTRAIN_DEBUG`` asks for tracebacks (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get("LMTRAIN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def report_crash(exc: BaseException, debug: bool = False) -> int:
    """Print the one line for ``exc`` (the traceback too with ``debug``); the exit status."""
    if isinstance(exc, BrokenPipeError):
        return quiet_broken_pipe()
    text = "".join(traceback.format_exception(exc))
    written = getattr(exc, LOG_ATTRIBUTE, None) or _write_traceback(text)
    if debug:
        sys.stderr.write(text)
    where = (f"the full traceback is in {written}" if written
             else "the traceback could not be written anywhere")
    show = "" if debug else "; --debug or LMTRAIN_DEBUG=1 shows it"
    _write(f"internal error: {describe(exc)}; {where}{show}. This is a bug in lmtrain: "
           f"please report it with that file\n")
    return INTERNAL_ERROR


def describe(exc: BaseException) -> str:
    """What failed, in a few words: the exception, the file it names (an ``OSError``'s) and
    the innermost lmtrain line it came from."""
    message = " ".join(str(exc).split())
    if len(message) > 200:
        message = message[:200] + "…"
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    filename = getattr(exc, "filename", None)
    if filename and str(filename) not in what:
        what += f" ({filename})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}lmtrain{os.sep}" in f.filename]
    if frames:
        frame = frames[-1]
        package = frame.filename.rsplit(f"{os.sep}lmtrain{os.sep}", 1)[-1]
        what += f" in lmtrain/{package}:{frame.lineno} ({frame.name})"
    return what


def quiet_broken_pipe() -> int:
    """The reader of stdout is gone: point stdout at the null device, so that the
    interpreter's final flush does not complain, and exit as a closed pipe does."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE


def _write_traceback(text: str) -> Path | None:
    """The traceback in a new file of the temp folder, or ``None`` when that failed too."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"lmtrain-crash-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
    except OSError:
        return None
    return Path(name)


def _write(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line)
        sys.stderr.flush()
