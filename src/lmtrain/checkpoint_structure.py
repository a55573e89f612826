"""The shape of a loaded checkpoint, checked before anything else reads it: how deep it nests,
how many items and how much text it holds (and that the text is Unicode), and that every
tensor is plain (dense, strided, on the CPU, of an allowed dtype) and its weights and
optimizer moments finite. What passes can be
walked, hashed and validated without recursion limits, allocator errors or NaN surprises.

The walk is iterative, so a file nested 10,000 deep is told by its depth, not a
``RecursionError``. :func:`lmtrain.checkpoint_format.validate` calls :func:`structure_problem`
first; the key-by-key checks and the digest come after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmtrain.unicode_text import not_text

#: How deep a checkpoint may nest (a combined optimizer's moments sit at depth 5).
MAX_DEPTH = 16
#: How many values (containers, scalars, tensors) a checkpoint may hold.
MAX_ITEMS = 2_000_000
#: The longest text a checkpoint may hold (a learned tokenizer's JSON is a few MB).
MAX_TEXT = 256 * 1024 * 1024
#: Whole numbers outside 64 bits are no step, size or seed.
MAX_INT = 2**63
#: dtypes a checkpoint's tensors may have.
ALLOWED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                  "int8", "uint8", "bool")


def structure_problem(ckpt: Mapping[str, Any], finite_keys: tuple[str, ...] = ()) -> str | None:
    """What makes a checkpoint's structure unsafe to read further, or ``None``; the floating
    tensors under the top-level ``finite_keys`` (weights, optimizer moments) must be finite."""
    import torch

    allowed = {getattr(torch, name) for name in ALLOWED_DTYPES}
    stack: list[tuple[Any, str, int, bool]] = [
        (value, str(key), 1, key in finite_keys) for key, value in ckpt.items()]
    items = 0
    while stack:
        value, where, depth, finite = stack.pop()
        items += 1
        if items > MAX_ITEMS:
            return f"it holds over {MAX_ITEMS:,} values"
        if depth > MAX_DEPTH:
            return f"{_short(where)} nests deeper than {MAX_DEPTH} levels"
        if isinstance(value, torch.Tensor):
            problem = _tensor_problem(value, allowed, finite)
            if problem:
                return f"{_short(where)} {problem}"
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                if not isinstance(key, str | int) or isinstance(key, bool):
                    return f"{_short(where)} has a key of type {type(key).__name__}"
                if isinstance(key, str) and not_text(key):
                    return f"a key of {_short(where)} {not_text(key)}"
                stack.append((sub, f"{where}.{key}", depth + 1, finite))
        elif isinstance(value, list | tuple):
            stack.extend((sub, f"{where}[{i}]", depth + 1, finite) for i, sub in enumerate(value))
        else:
            problem = _scalar_problem(value)
            if problem:
                return f"{_short(where)} {problem}"
    return None


def _tensor_problem(t: Any, allowed: set[Any], finite: bool) -> str | None:
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a {type(t).__name__}, not a plain tensor"
    if t.layout != torch.strided or t.is_sparse or t.is_nested or t.is_quantized:
        return f"is a {t.layout} tensor, not a dense one"
    if t.device.type != "cpu":
        return f"is a tensor on the {t.device.type} device, not data on the CPU"
    if t.dtype not in allowed:
        return f"has dtype {t.dtype}, which a checkpoint does not hold"
    if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        return "holds NaN or infinite values"
    return None


def _scalar_problem(value: Any) -> str | None:
    if value is None or isinstance(value, bool | float):
        return None
    if isinstance(value, int):
        return None if -MAX_INT <= value < MAX_INT else "is a whole number beyond 64 bits"
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            return f"is text longer than {MAX_TEXT:,} characters"
        return not_text(value)
    return f"is a {type(value).__name__}, not plain data"


def _short(where: str) -> str:
    return where if len(where) <= 120 else where[:60] + "…" + where[-50:]
