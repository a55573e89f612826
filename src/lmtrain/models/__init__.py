"""Build the model a config asks for and call it uniformly."""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmtrain.config import ModelSettings
from lmtrain.models.gpt import GPTConfig, build_from_scratch


def build_model(config: ModelSettings, vocab_size: int) -> nn.Module:
    """The from-scratch GPT (or bigram) or pretrained GPT-2, with LoRA when asked."""
    model: nn.Module
    if config.model_type == "gpt2":
        from lmtrain.models.gpt2 import load_gpt2

        model = load_gpt2(config, vocab_size)
    else:
        model = build_from_scratch(GPTConfig(
            vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
            n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
            arch=config.arch, qk_norm=config.qk_norm and config.arch == "llama"))
    if config.use_lora:
        from lmtrain.models.lora import apply_lora

        model = apply_lora(model, config)
    return model


def model_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits from either our GPT (returns a tensor) or a Hugging Face model (returns an object)."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def hf_model(model: nn.Module) -> nn.Module | None:
    """The ``transformers`` model under ``model`` (a peft wrapper, perhaps), else ``None``
    (our GPT, a DDP wrapper). Cheap for from-scratch runs: transformers is not imported."""
    if "transformers" not in sys.modules:  # not imported: no such model exists here
        return None
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, PreTrainedModel) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model without a DDP or ``torch.compile`` wrapper (decoding and saving need neither)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())  # ``parameters()`` yields a shared tensor only once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total
