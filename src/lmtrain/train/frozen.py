"""Frozen LoRA base layers stored in the autocast dtype.

Autocast casts a weight to bf16 every time a layer runs, and keeps a cast only for trainable
weights: the frozen base of a LoRA model is converted again at every step (GPT-2 small: 85M
weights per step). Storing those weights in the autocast
dtype once gives bit-identical results under autocast: the layer sees the same bf16 values.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def store_frozen_base_in(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Cast the frozen weights and biases of every LoRA-adapted layer's base to ``dtype``
    (bf16/fp16 autocast); returns how many tensors changed. A no-op for fp32 runs and for
    models without LoRA layers. The model must then run under autocast (training, evaluation
    and :mod:`lmtrain.generate` do); LoRA checkpoints hold only the adapters."""
    if dtype is None or dtype == torch.float32:
        return 0
    lora = sys.modules.get("peft.tuners.lora")
    if lora is None:  # peft was never imported, so no LoRA layer exists (and peft costs ~1.5 s)
        return 0

    changed = 0
    for module in model.modules():
        if not isinstance(module, lora.LoraLayer):
            continue
        for param in module.get_base_layer().parameters(recurse=False):
            if not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(dtype)
                changed += 1
    return changed
