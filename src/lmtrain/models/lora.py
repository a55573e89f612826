"""LoRA adapters through ``peft`` for GPT-2 and the from-scratch GPT, and what their checkpoints
hold: the adapter weights plus a reference to the base model, never the base weights themselves.

The reference (``lora_base``) holds the base as given (``name``), as resolved then (``resolved``:
a folder's absolute path, or a hub id with the ``revision`` of its cached snapshot) and the
``fingerprint`` of its weights. Whatever folder is loaded later, the fingerprint decides whether
it is the adapter's base.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmtrain.config import ModelSettings
from lmtrain.errors import UserError

#: Attribute of the adapted model that holds its base reference (see :func:`base_reference`).
BASE_ATTR = "lmtrain_lora_base"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes) in name
    order; a tensor shared under several names (tied embeddings) is hashed once."""
    digest = hashlib.sha256()
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def base_name(config: ModelSettings) -> str:
    """How a LoRA checkpoint names its base model."""
    if config.model_type == "gpt2":
        from lmtrain.models.gpt2 import hub_snapshot

        hub = hub_snapshot(config.gpt2_model_name)  # a cached hub model: by its hub id
        return hub[0] if hub is not None else config.gpt2_model_name
    return (f"from_scratch(arch={config.arch}, n_layer={config.n_layer}, "
            f"n_head={config.n_head}, n_embd={config.n_embd}, block_size={config.block_size})")


def base_location(config: ModelSettings) -> dict[str, str]:
    """``{"resolved", "revision"}`` of the base model a run adapts (see the module doc)."""
    if config.model_type != "gpt2":
        return {"resolved": base_name(config), "revision": ""}
    from lmtrain.models.gpt2 import locate

    return locate(config.gpt2_model_name, config.allow_download)


def base_location_now(config: ModelSettings, saved_base: Mapping[str, str] | None,
                      override: str | None) -> str:
    """Where a GPT-2 checkpoint's base model is found now (a fact its reader records as
    GPT2_MODEL_NAME): ``override`` (``--base`` / ``GPT2_MODEL_NAME``) or, for an adapter,
    :func:`find_base` of the checkpoint's ``saved_base`` reference."""
    from lmtrain.models.gpt2 import find_base

    if config.use_lora:
        return find_base(dict(saved_base or {}), override)
    return override or config.gpt2_model_name


def apply_lora(model: nn.Module, config: ModelSettings) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``LORA_TARGETS``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    from lmtrain.models.gpt import BigramLM

    if isinstance(model, BigramLM):
        raise UserError(
            f"USE_LORA=1 does not apply to N_LAYER={config.n_layer}: the bigram model has no "
            f"attention or MLP layers to adapt; set N_LAYER >= 1 or USE_LORA=0")
    fingerprint = weights_fingerprint(model)
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_list, bias="none",
        fan_in_fan_out=config.model_type == "gpt2")  # GPT-2's Conv1D stores (in, out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:  # peft's "target modules not found"
        raise UserError(
            f"LORA_TARGETS={config.lora_targets!r} matches no layer of the "
            f"{config.model_type} model ({str(exc).splitlines()[0][:120]}); use names such "
            f"as c_attn, c_proj, c_fc") from None
    setattr(peft_model, BASE_ATTR, {"name": base_name(config), **base_location(config),
                                    "fingerprint": fingerprint})
    return peft_model


def base_reference(model: nn.Module) -> dict[str, str]:
    """``{"name", "resolved", "revision", "fingerprint"}`` of the base under the adapters."""
    ref = getattr(model, BASE_ATTR, None)
    if ref is None:
        raise TypeError("the model was not built by lmtrain.models.lora.apply_lora")
    return dict(ref)


def check_base_reference(model: nn.Module, saved: dict[str, str] | None, where: str) -> None:
    """A clear error when the rebuilt base model is not the one the adapter was trained on;
    ``where`` names the checkpoint in messages (``CHECKPOINT_PATH='...'``, ``CKPT='...'``)."""
    if not saved:
        raise UserError(f"{where} is a LoRA checkpoint without a base model "
                        f"reference; it was not written by this lmtrain")
    now = base_reference(model)
    if now["fingerprint"] != saved["fingerprint"]:
        raise UserError(
            f"{where}: its LoRA adapter was trained on base model "
            f"{saved['name']!r} with weights fingerprint {saved['fingerprint'][:16]}, but the base "
            f"loaded now ({now['resolved']!r}) has fingerprint {now['fingerprint'][:16]}; pass "
            f"--base (or set GPT2_MODEL_NAME) to the original base model")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights only (a copy)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Load adapter weights saved by :func:`adapter_state_dict`; every adapter key must fit."""
    from peft import set_peft_model_state_dict

    expected = adapter_state_dict(model).keys()
    if set(state) != set(expected):
        raise UserError(
            f"the checkpoint's LoRA adapter has {len(state)} tensors but the model expects "
            f"{len(expected)}; it was trained with other LORA_TARGETS or another base model")
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"the checkpoint's LoRA adapter does not fit the model "
                        f"({str(exc).splitlines()[0][:160]})") from None
    unexpected: list[str] = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise UserError(f"the checkpoint's LoRA adapter has tensors the model lacks: "
                        f"{', '.join(unexpected[:5])}")
