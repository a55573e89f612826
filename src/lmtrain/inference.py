"""Rebuild a trained model and its tokenizer from a checkpoint, for sampling and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import FIELDS, INVOCATION_FIELDS, TrainingConfig
from lmtrain.data.tokenizers import Tokenizer, tokenizer_from_state
from lmtrain.models import build_model
from lmtrain.train.state import load_model_state


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: TrainingConfig
    checkpoint: dict[str, Any]


def config_of(ckpt: dict[str, Any]) -> TrainingConfig:
    """The run's settings as saved in the checkpoint."""
    saved = {k: v for k, v in ckpt["hyperparameters"].items()
             if k in FIELDS and k not in INVOCATION_FIELDS}
    return TrainingConfig.model_validate(saved)


def load_trained_model(path: str | Path, device: torch.device | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode (LoRA adapters applied to the verified base)."""
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    torch.manual_seed(cfg.seed)  # a from-scratch LoRA base is rebuilt from the run's seed
    model = build_model(cfg, tokenizer.vocab_size)
    if cfg.use_lora:  # the adapter only fits the base it was trained on
        from lmtrain.models.lora import check_base_reference

        check_base_reference(model, ckpt.get("lora_base"), str(path))
    load_model_state(model, cfg, ckpt["model_state_dict"])
    model.to(device or torch.device("cpu")).eval()
    return LoadedModel(model, tokenizer, cfg, ckpt)
