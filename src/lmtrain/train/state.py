"""What a run is made of, split by who may change it.

- :class:`Placement` (built once, by the session) and :class:`Components` (built by
  :func:`lmtrain.train.build.prepare_run`) are read-only: the model, optimizer, tokenizer,
  data, placement and grad scaler the loop works with;
- the run's progress (:class:`lmtrain.progress.TrainProgress`) is what the loop advances;
- :class:`LoopSettings` are the settings groups the loop reads;
- :class:`RunServices` are the session's: where checkpoints go, the metrics, the timings, the
  stop request and the last answer report.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from lmtrain.config import (
    CheckpointSettings,
    EvaluationSettings,
    OptimizationSettings,
    TrainingConfig,
)
from lmtrain.data.dataset import TokenData
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.device import autocast_context, select_device
from lmtrain.distributed import init_distributed
from lmtrain.models import unwrap_model
from lmtrain.progress import TrainProgress
from lmtrain.signals import StopRequest

if TYPE_CHECKING:
    from lmtrain.answers import AnswerReport
    from lmtrain.reporting import MetricsWriter


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its device, rank and world size (torchrun's), and the
    autocast dtype (``precision``; ``None``: plain fp32)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: torch.dtype | None = None

    @classmethod
    def join(cls, device: str) -> Placement:
        """Join the process group when launched by torchrun; this rank's device for ``DEVICE``
        (the precision is decided with the model: :func:`lmtrain.train.build.prepare_run`)."""
        info, where = init_distributed(select_device(device))
        return cls(where, info.rank, info.world_size, info.local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.precision)


@dataclass(frozen=True)
class Components:
    """The parts a run trains with; built once, never replaced while it trains."""

    model: nn.Module  # perhaps wrapped (DDP, torch.compile): see raw_model
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    data: TokenData
    placement: Placement
    grad_scaler: Any = None  # fp16 only

    @property
    def raw_model(self) -> nn.Module:
        """The model without DDP / torch.compile wrappers (what checkpoints hold)."""
        return unwrap_model(self.model)


@dataclass(frozen=True)
class LoopSettings:
    """The settings groups the loop reads."""

    optimization: OptimizationSettings
    evaluation: EvaluationSettings
    checkpointing: CheckpointSettings
    block_size: int

    @classmethod
    def of(cls, config: TrainingConfig) -> LoopSettings:
        return cls(config.optimization, config.evaluation, config.checkpointing,
                   config.model.block_size)


def _no_time() -> dict[str, float]:
    return dict.fromkeys(("data", "train", "eval", "checkpoint"), 0.0)


class SavesCheckpoints(Protocol):
    """What the loop asks of the checkpoint writer
    (:class:`~lmtrain.train.checkpointing.Checkpointer`, which sits above this module)."""

    def save(self, parts: Components, progress: TrainProgress) -> Any:
        """The checkpoint of the current step (``None`` when checkpoints are off)."""


@dataclass
class RunServices:
    """What the session lends the loop: the checkpoint writer, the metrics (rank 0), where
    the time went, the stop request and the last answer accuracy measured."""

    checkpointer: SavesCheckpoints
    stop: StopRequest = field(default_factory=StopRequest)
    metrics: MetricsWriter | None = None
    timings: dict[str, float] = field(default_factory=_no_time)
    last_answers: AnswerReport | None = None


class LiveRun(NamedTuple):
    """A run ready to train: what :func:`~lmtrain.train.loop.run_training` takes, in order."""

    parts: Components
    progress: TrainProgress
    settings: LoopSettings
    services: RunServices
