"""A run's progress: the one record the training loop advances and a checkpoint saves.

:class:`TrainProgress` holds the step, the best validation loss and its step, the last losses,
the steps saved by this session, the tracker run ids and the batch sampler's generator; its
:meth:`~TrainProgress.state_dict` adds the process's global generator states (dropout), so a
run continues bit for bit. Plain data in, plain data out (``torch.load(weights_only=True)``
reads it back); the checkpoint's own layout is :mod:`lmtrain.checkpoint_format`'s.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch


class Generators(NamedTuple):
    """The generator states a run continues from: the batch sampler's, torch's global one
    (dropout) and the CUDA devices' (``[]`` without CUDA)."""

    sampler: torch.Tensor
    cpu: torch.Tensor
    cuda: list[torch.Tensor]


def _cuda_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _plain(value: Any) -> Any:
    """A copy of ``value``; an unmeasured (infinite) loss as ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return copy.deepcopy(value)


@dataclass
class TrainProgress:
    """Where a run stands; only the loop (its evaluations and checkpoints too) and the
    checkpoint restore change it."""

    #: the batch sampler's own generator (its state is part of the progress)
    sampler: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    #: the last evaluation's losses by name, with the ``step`` they were taken at
    last_losses: dict[str, float] = field(default_factory=dict)
    #: the steps this session wrote a checkpoint for (not saved: a new session starts empty)
    saved_steps: list[int] = field(default_factory=list)
    #: tracker name -> its run id, so a resume continues the same tracker run
    tracker_run_ids: dict[str, str] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        """Whether the last losses were measured at the current step."""
        return self.last_losses.get("step") == self.step

    def record_best(self) -> tuple[float, int | None]:
        """Take the last losses as the best when they were measured now and beat it; returns
        the best before, to put back when the checkpoint that records it is not written."""
        before = self.best_val_loss, self.best_step
        if self.evaluated and self.last_losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_step = self.last_losses["val"], self.step
        return before

    def generators(self) -> Generators:
        """This process's generator states now."""
        return Generators(self.sampler.get_state(), torch.get_rng_state(), _cuda_states())

    def state_dict(self, generators: Generators | None = None) -> dict[str, Any]:
        """The progress as plain data: its fields and, under ``generators``, the process's
        generator states (now's, unless given). ``best_val_loss`` is ``None`` until measured."""
        state = {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                 if f.name != "sampler"}
        state.update(generators=(generators or self.generators())._asdict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict`): the fields, the sampler and the
        global generators (the CUDA ones when this process sees as many devices)."""
        for f in fields(self):
            if f.name != "sampler" and f.name in state:
                setattr(self, f.name, copy.deepcopy(state[f.name]))
        if self.best_val_loss is None:
            self.best_val_loss = math.inf
        gens = Generators(**state["generators"])
        self.sampler.set_state(gens.sampler)
        torch.set_rng_state(gens.cpu)
        if gens.cuda and torch.cuda.is_available() and len(gens.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(gens.cuda)
