"""The optimizers (AdamW, or Muon for hidden matrices beside AdamW for the rest), loading a
saved optimizer state into one, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmtrain.config import OptimizationSettings
from lmtrain.errors import UserError

#: Param-group key naming the setting that holds the group's peak learning rate.
LR_SETTING = "lr_setting"


class CombinedOptimizer:
    """Several torch optimizers behind the ``torch.optim.Optimizer`` API: ``step``,
    ``zero_grad``, ``param_groups`` (all of them, in order), ``state`` and a
    ``state_dict`` holding each optimizer's state under its name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"expected the states of {sorted(self.optimizers)}, "
                             f"got {sorted(map(str, state_dict))}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


def adamw_only_params(model: nn.Module) -> set[int]:
    """Ids of the 2-D weights Muon leaves to AdamW: embeddings and the output head."""
    ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] == "lm_head":
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def build_optimizer(model: nn.Module, config: OptimizationSettings, device: torch.device
                    ) -> torch.optim.AdamW | CombinedOptimizer:
    """AdamW over the trainable parameters (2-D+ tensors decay, biases and norms do not); with
    ``OPTIMIZER=muon``, the hidden matrices go to Muon at ``MUON_LEARNING_RATE`` instead."""
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    muon: list[torch.Tensor] = []
    if config.optimizer == "muon":
        skip = adamw_only_params(model)
        muon = [p for p in params if p.dim() == 2 and id(p) not in skip]
        taken = {id(p) for p in muon}
        params = [p for p in params if id(p) not in taken]
    adamw = _adamw(params, config, device)
    if not muon:
        return adamw
    return CombinedOptimizer({"adamw": adamw, "muon": torch.optim.Muon(
        [{"params": muon, LR_SETTING: "muon_learning_rate"}], lr=config.muon_learning_rate,
        weight_decay=config.weight_decay)})


def _adamw(params: list[torch.Tensor], config: OptimizationSettings,
           device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel updates every tensor in one pass (CUDA, and the CPU since torch 2.4, the
    # oldest torch lmtrain supports; it groups tensors by dtype itself); on the CPU it is ~15x
    # faster than the per-tensor loop for a 10M-parameter GPT. None (not False) elsewhere keeps
    # torch's default, the foreach kernels
    fused = True if device.type in ("cuda", "cpu") else None
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), fused=fused)


def lr_multiplier(step: int, config: OptimizationSettings) -> float:
    """Factor on the peak learning rate for optimizer step ``step`` (0-based)."""
    if config.lr_scheduler == "none":
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    horizon = config.decay_horizon
    if step >= horizon:
        return config.min_lr_ratio
    span = max(horizon - config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def set_learning_rate(optimizer: torch.optim.Optimizer | CombinedOptimizer, step: int,
                      config: OptimizationSettings) -> float:
    """Set every group's lr for ``step`` from its peak (``LEARNING_RATE``, or
    ``MUON_LEARNING_RATE`` for Muon's matrices); returns the ``LEARNING_RATE`` one.

    The schedule is a pure function of the step and the config, so an overridden
    learning rate on resume takes effect although the optimizer state is restored.
    """
    multiplier = lr_multiplier(step, config)
    for group in optimizer.param_groups:
        group["lr"] = getattr(config, group.get(LR_SETTING, "learning_rate")) * multiplier
    return config.learning_rate * multiplier


def load_optimizer_state(optimizer: torch.optim.Optimizer | CombinedOptimizer,
                         sd: dict[str, Any], where: str) -> None:
    """Load a saved optimizer state into the freshly built optimizer, whatever its kind;
    a state that does not fit it (other layout, other parameters, other shapes) is one line.
    ``where`` names the checkpoint in messages."""
    try:
        optimizer.load_state_dict(sd)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: its optimizer state does not fit this run's optimizer "
                        f"({detail}); the file is damaged or from another model") from None
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            for name, value in getattr(optimizer, "state", {}).get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise UserError(
                        f"{where}: its optimizer state {name!r} has shape {tuple(value.shape)} "
                        f"for a parameter of shape {tuple(p.shape)}; the file is damaged or "
                        f"from another model")
