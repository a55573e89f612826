"""Rebuild a trained model and its tokenizer from a checkpoint, for sampling and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtrain.checkpoint import load_checkpoint
from lmtrain.checkpoint_schema import check_tokenizer, config_of, load_weights
from lmtrain.config import TrainingConfig
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.models import build_model
from lmtrain.models.lora import with_base


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: TrainingConfig
    checkpoint: dict[str, Any]


def load_trained_model(path: str | Path, device: torch.device | None = None,
                       label: str = "CKPT", base: str | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode (LoRA adapters applied to the verified base).

    Only what the run *is* comes from the file: downloads, caches and paths stay this
    invocation's (``ALLOW_DOWNLOAD`` saved as true in a checkpoint is not honoured). ``base``
    (``--base`` / ``GPT2_MODEL_NAME``) says where a GPT-2 run's base model lives now.
    """
    ckpt = load_checkpoint(path, label=label)
    cfg = with_base(config_of(ckpt), ckpt, base)  # GPT-2: where its base model is now
    tokenizer = check_tokenizer(ckpt["tokenizer"], ckpt["vocab_size"])
    torch.manual_seed(cfg.optimization.seed)  # a from-scratch LoRA base: rebuilt from the seed
    model = build_model(cfg.model, tokenizer.vocab_size)
    load_weights(model, cfg, ckpt, f"{label}={str(path)!r}")
    model.to(device or torch.device("cpu")).eval()
    return LoadedModel(model, tokenizer, cfg, ckpt)
