"""SIGINT / SIGTERM during a run: the first asks for a clean stop, the second exits at once.

The first signal only records itself. The training loop sees it after the current step, writes
a checkpoint and raises :class:`~lmtrain.errors.TrainingInterrupted`; the entrypoints turn that
into the command that resumes the run and exit status ``128 + signum`` (130 for SIGINT, 143 for
SIGTERM). A second signal ends the process immediately with the same status; atomic writes
leave every checkpoint on disk whole even then. No heavy imports here.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from lmtrain.errors import TrainingInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2; ``signal N`` for numbers that name no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(BaseException):
    """A stop signal inside an :func:`interruptible` block: the work it was doing (a long
    evaluation, the end-of-run sample) is abandoned at once. A ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


class StopRequest:
    """Remembers the first stop signal; the run reads it (:attr:`signal`) after each step.

    In a distributed run the loop shares what the ranks saw (:meth:`share`), so every rank
    stops at the same step, not only the one that received the signal.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process received
        self.shared: int | None = None  # the signal any rank received (agreed by all ranks)
        self.raising = False  # inside interruptible(): the handler raises StopNow

    @property
    def signal(self) -> int | None:
        """The stop asked for, by this process or (shared) by another rank; ``None``."""
        return self.signum if self.signum is not None else self.shared

    def share(self, signum: int | None) -> None:
        """Record the stop the ranks agreed on (``None``: none)."""
        self.shared = signum

    def check(self, checkpoint: object = None, step: int | None = None,
              resume_steps: int | None = None) -> None:
        """Raise :class:`TrainingInterrupted` if a stop was asked for (between phases)."""
        if self.signal is not None:
            raise TrainingInterrupted(self.signal, checkpoint, step, resume_steps)

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler: record the first signal, exit at once on the second."""
        if self.signum is not None:
            exit_now(signum, " again")
        self.signum = signum
        if self.raising:
            self.raising = False
            write_stderr(f"\n{signal_name(signum)}: stopping now (send it again to exit at "
                         f"once)\n")
            raise StopNow(signum)
        write_stderr(f"\n{signal_name(signum)}: stopping after the current step and saving a "
                     f"checkpoint (send it again to exit at once)\n")


def write_stderr(text: str) -> None:
    """Write ``text`` to stderr unbuffered (safe inside a signal handler)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def exit_process(code: int) -> NoReturn:
    """End the process now with ``code``, stdout and stderr flushed: no cleanup code runs, so
    no later signal can interrupt it into a traceback; files on disk are whole (writes are
    atomic)."""
    for stream in (sys.stdout, sys.stderr):  # what was printed so far still arrives
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_now(signum: int, again: str = "") -> NoReturn:
    """End the process at once after ``signum``, status ``128 + signum``, saying so."""
    write_stderr(f"\n{signal_name(signum)}{again}: exiting now\n")
    exit_process(128 + signum)


def exit_on_signals() -> None:
    """For the rest of this process, SIGINT / SIGTERM end it at once and cleanly.

    Entrypoints that own the whole process call it first: outside a run (start-up, the final
    report, interpreter shutdown) a signal then never surfaces as a ``KeyboardInterrupt``
    traceback, and :func:`stop_on_signals` falls back to it when its block ends.
    """
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, lambda signum, frame: exit_now(signum))


_active: StopRequest | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the SIGINT / SIGTERM handlers for the duration of the block.

    Nested use shares the outer request. Outside the main thread (where Python cannot install
    handlers) the request simply never fires.
    """
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for s, handler in previous.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextmanager
def interruptible() -> Iterator[None]:
    """Work a stop signal may cut short (a long evaluation, the end-of-run sample): within the
    block the first signal raises :class:`StopNow` at once, and one already received raises
    it on entry. Outside :func:`stop_on_signals`, or off the main thread, it does nothing."""
    request = _active
    if request is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    if request.signum is not None:
        raise StopNow(request.signum)
    request.raising = True
    try:
        yield
    finally:
        request.raising = False


def resume_commands(checkpoint: object, resume_steps: int | None = None) -> list[str]:
    """The env-var and the ``lmtrain`` command lines that resume from ``checkpoint``."""
    path = shlex.quote(str(checkpoint))
    env = f"CHECKPOINT_PATH={path}"
    cli = f"lmtrain train --resume {path}"
    if resume_steps is not None:
        env += f" RESUME_STEPS={resume_steps}"
        cli += f" --resume-steps {resume_steps}"
    return [f"{env} python training.py", cli]


def interruption_report(exc: TrainingInterrupted) -> str:
    """What the user reads after a stop: where the run stands and how to resume it."""
    head = f"interrupted by {signal_name(exc.signum)}"
    if exc.checkpoint is None:
        if exc.step is None:
            return f"{head} before training started; nothing was written. Run the same " \
                   f"command again to start."
        return (f"{head} at step {exc.step}; no checkpoint was written (checkpoints are off: "
                f"ENABLE_CHECKPOINTS=0).")
    at = f" at step {exc.step}" if exc.step is not None else ""
    lines = [f"{head}{at}; the run is saved in {exc.checkpoint}", "resume it with:"]
    lines += [f"  {cmd}" for cmd in resume_commands(exc.checkpoint, exc.resume_steps)]
    return "\n".join(lines)
