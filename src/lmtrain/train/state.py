"""The live state of a run (what the loop reads and advances); writing it into a checkpoint
and restoring it from one live in :mod:`lmtrain.train.checkpointing`."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmtrain.config import TrainingConfig
from lmtrain.data.dataset import TokenData
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.device import autocast_context

if TYPE_CHECKING:
    from lmtrain.answers import AnswerReport
    from lmtrain.reporting import MetricsWriter

log = logging.getLogger("lmtrain")


@dataclass
class RunContext:
    """Everything the training loop reads and advances; built the same for fresh and resume."""

    config: TrainingConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    data: TokenData
    device: torch.device
    sampler: torch.Generator
    run_name: str
    checkpoint_dir: Path
    log_dir: Path
    metrics: MetricsWriter | None = None
    autocast_dtype: torch.dtype | None = None
    grad_scaler: Any = None
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    last_losses: dict[str, float] = field(default_factory=dict)
    #: train losses since the last LOG_INTERVAL step: saved, so that a run resumed off that
    #: grid logs the very means the straight run logs
    loss_window: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("data", "train", "eval", "checkpoint"), 0.0))
    is_main: bool = True
    rank: int = 0
    world_size: int = 1
    stop_signal: int | None = None
    saved_steps: list[int] = field(default_factory=list)
    #: tracker name -> its run id, saved in checkpoints so a resume continues the same run
    tracker_run_ids: dict[str, str] = field(default_factory=dict)
    #: the last answer accuracy measured (question/answer records; see train/answer_eval.py)
    last_answers: AnswerReport | None = None

    @property
    def raw_model(self) -> nn.Module:
        """The model without DDP / torch.compile wrappers (what checkpoints hold)."""
        m = self.model
        m = getattr(m, "module", m)
        return getattr(m, "_orig_mod", m)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.autocast_dtype)

