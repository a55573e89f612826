"""Resume hints: when a session stops early (a stop signal, an error during training), which
checkpoint on disk continues it and the command that resumes from there."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmtrain.checkpoint import checkpoint_filename
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.progress import TrainProgress
from lmtrain.signals import resume_commands, signal_name

log = logging.getLogger("lmtrain")


@dataclass(frozen=True)
class ResumeHints:
    """Where a session starts and plans to end (absolute steps), the checkpoint file it
    resumed from (``None`` for a fresh run), its checkpoint folder and ``TRAINING_STEPS``."""

    start: int
    end: int
    resumed_from: str | None
    checkpoint_dir: Path
    training_steps: int
    sharded: bool = False  # PARALLEL=fsdp: checkpoints are step_N.dcp folders

    @contextmanager
    def completing(self, progress: TrainProgress) -> Iterator[None]:
        """A stop or an error raised in the block leaves it with where and how to resume."""
        try:
            yield
        except TrainingInterrupted as exc:
            raise self.interrupted(exc, progress) from None
        except UserError as exc:  # e.g. a checkpoint that could not be written
            raise self.with_resume_command(exc, progress) from None

    def interrupted(self, exc: TrainingInterrupted, progress: TrainProgress) -> TrainingInterrupted:
        """Complete a stop request with the checkpoint to resume from; logged in the run's log."""
        exc.checkpoint, exc.step = None, progress.step
        on_disk = self.checkpoint_on_disk(progress)
        # with nothing saved, where this one began only while nothing was trained since
        if on_disk is not None and (progress.saved_steps or progress.step == self.start):
            step, exc.checkpoint = on_disk
            exc.step, exc.resume_steps = step, self.resume_steps(step)
        elif progress.step == self.start:
            exc.step = None  # nothing trained yet
        log.warning("interrupted by %s at step %d; checkpoint: %s", signal_name(exc.signum),
                    progress.step, exc.checkpoint or "none")
        return exc

    def with_resume_command(self, exc: UserError, progress: TrainProgress) -> UserError:
        """A training-time error, completed with the command that resumes from the last
        checkpoint on disk (one line)."""
        on_disk = self.checkpoint_on_disk(progress)
        if on_disk is None:
            return exc
        step, checkpoint = on_disk
        command = resume_commands(checkpoint, self.resume_steps(step))[0]
        return UserError(f"{exc}; resume with: {command}")

    def checkpoint_on_disk(self, progress: TrainProgress) -> tuple[int, object] | None:
        """(step, file) of the newest checkpoint on disk: the last this session saved, else
        the one it resumed from (at ``start``); ``None`` when there is neither."""
        if progress.saved_steps:
            step = progress.saved_steps[-1]
            return step, self.checkpoint_dir / checkpoint_filename(step, self.sharded)
        if self.resumed_from:
            return self.start, self.resumed_from
        return None

    def resume_steps(self, step: int) -> int | None:
        """The ``RESUME_STEPS`` that finishes this session from ``step``; ``None`` when a plain
        resume (up to ``TRAINING_STEPS``) does the same."""
        remaining = max(self.end - step, 0)
        plain = max(self.training_steps - step, 0)
        return None if remaining == plain else remaining
