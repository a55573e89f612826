"""The one exception type that means "the user gave bad input": printed as one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, bad checkpoint).

    The entrypoints print ``error: <message>`` without a traceback and exit with status 2.
    """

    exit_code = 2


class TrainingInterrupted(Exception):
    """A stop asked for by SIGINT / SIGTERM, raised once the run's state is safe on disk.

    ``checkpoint`` is the file to resume from (``None`` when nothing could be saved), ``step``
    the step it holds and ``resume_steps`` the steps still planned when a plain resume would
    not run them by itself. The entrypoints exit with ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int, checkpoint: object = None, step: int | None = None,
                 resume_steps: int | None = None) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        self.resume_steps = resume_steps

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
