"""A model's weights in a checkpoint: what is stored (every weight, or only the LoRA adapter)
and putting them back into a freshly built model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmtrain.checkpoint_format import SavedRun
from lmtrain.config import ModelSettings
from lmtrain.errors import UserError


def model_state(model: nn.Module, config: ModelSettings) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: all of them, or only the LoRA adapter.

    Tied weights (``wte``/``lm_head``) stay one tensor, so ``torch.save`` stores them once.
    """
    if config.use_lora:
        from lmtrain.models.lora import adapter_state_dict

        return adapter_state_dict(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, config: ModelSettings, sd: Mapping[str, Any]) -> None:
    """Put saved weights into ``model``; one line if they do not fit it."""
    if config.use_lora:
        from lmtrain.models.lora import load_adapter_state_dict

        load_adapter_state_dict(model, dict(sd))
        return
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = ' '.join(first[1:2] or first[:1])[:200]
        if config.model_type == "gpt2":
            raise UserError(
                f"the checkpoint's weights do not fit the model built from its settings "
                f"(GPT2_MODEL_NAME={config.gpt2_model_name!r}): {detail}; point "
                f"GPT2_MODEL_NAME at the model the run was trained from") from None
        raise UserError(
            f"the checkpoint's weights do not fit the from-scratch model its settings "
            f"describe (N_LAYER={config.n_layer}, N_EMBD={config.n_embd}): {detail}; the "
            f"file is damaged, pick an earlier checkpoint") from None


def check_lora_base(model: nn.Module, config: ModelSettings, run: SavedRun) -> None:
    """A LoRA run's adapter fits only the base it was trained on: ``model``'s base is checked
    against the run's reference (one line if it differs); nothing for other runs."""
    if config.use_lora:
        from lmtrain.models.lora import check_base_reference

        base = run.lora_base
        check_base_reference(model, dict(base) if base else None, run.where)


def load_weights(model: nn.Module, config: ModelSettings, run: SavedRun) -> None:
    """Put a saved run's weights into ``model``; a LoRA adapter only once the base it was
    trained on is verified."""
    check_lora_base(model, config, run)
    load_model_state(model, config, run.model_state)
