"""Pick the torch device and the autocast dtype for a run."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lmtrain.errors import UserError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; explicit names are checked for availability."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"DEVICE={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"DEVICE={name!r}: CUDA is not available here; use DEVICE=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"DEVICE={name!r}: only {torch.cuda.device_count()} CUDA devices; "
                            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"DEVICE={name!r}: MPS is not available here; use DEVICE=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"DEVICE={name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: On the CPU, bf16 autocast pays once matrix products dominate a step. Measured on an AMD EPYC
#: with AVX512-BF16, fp32 / bf16 step time of the default recipe (4 layers, llama, Muon, batch
#: 32, block 64; interleaved on a loaded 2-core machine): 1.02x at width 64, 1.14x at 96,
#: 1.36x at 128 (the first release's GPT-2 + AdamW step: 0.77x at 32, ~1.07x at 64, 1.2-1.6x
#: from 128 up). ``PRECISION=auto`` uses bf16 from this width on.
CPU_BF16_MIN_WIDTH = 96


def matmul_width(model: nn.Module) -> int:
    """The widest inner dimension of the model's weight matrices (embedding tables excluded)."""
    width = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or not isinstance(weight, torch.Tensor):
            continue
        if weight.dim() == 2:
            width = max(width, min(weight.shape))
    return width


def autocast_dtype(precision: str, device: torch.device,
                   model: nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for ``PRECISION`` on ``device``; ``None`` means plain fp32.

    ``auto`` picks bf16 on CUDA devices that support it, and on CPUs with native bf16
    instructions when ``model`` is wide enough for it to pay (:data:`CPU_BF16_MIN_WIDTH`);
    fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UserError("PRECISION=fp16 needs a GPU; use PRECISION=bf16 or fp32 on the CPU")
        return torch.float16
    # auto
    if device.type == "cuda":  # emulated bf16 (pre-Ampere: T4, V100) is slower than fp32
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else None
    if device.type == "cpu" and cpu_supports_bf16():
        wide = model is None or matmul_width(model) >= CPU_BF16_MIN_WIDTH
        return torch.bfloat16 if wide else None
    return None


def autocast_context(device: torch.device,
                     dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; plain fp32 when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(dtype: torch.dtype | None, device: torch.device) -> Any:
    """A gradient scaler for fp16 autocast (its state goes into checkpoints), else ``None``.

    bf16 has fp32's exponent range and needs no scaling.
    """
    if dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)
