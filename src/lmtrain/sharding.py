"""``PARALLEL=fsdp``: PyTorch's FSDP2 (``fully_shard``) over a model, one unit per transformer
block plus the root, so that every process holds only its shard of the weights, gradients and
optimizer state; and the few helpers the loop needs to read a sharded tensor.

FSDP needs torchrun (it is a many-process run by nature). With one process under torchrun the
model stays whole: the run trains as a single process but still writes sharded checkpoints,
so it resumes at any world size. Mixed precision goes through FSDP's
:class:`~torch.distributed.fsdp.MixedPrecisionPolicy`: parameters are gathered in the run's
autocast dtype, gradients are reduced in fp32, and the sharded master weights stay fp32.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmtrain.errors import UserError


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ)


def check_fsdp_launch(parallel: str, optimizer: str,
                      environ: Mapping[str, str] | None = None) -> None:
    """``PARALLEL=fsdp`` needs torchrun and AdamW; one line naming the fix otherwise."""
    if parallel != "fsdp":
        return
    if not under_torchrun(environ):
        raise UserError("PARALLEL=fsdp shards the model over processes and needs torchrun: "
                        "launch with `torchrun --nproc_per_node=N training.py` (or set "
                        "PARALLEL=ddp for one process)")
    if optimizer != "adamw":
        raise UserError(f"PARALLEL=fsdp with OPTIMIZER={optimizer}: Muon orthogonalizes whole "
                        f"matrices, which FSDP splits over processes; set OPTIMIZER=adamw (or "
                        f"PARALLEL=ddp)")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (``transformer.h``: the from-scratch GPT and GPT-2, also
    inside a LoRA wrapper); empty for a model without blocks (the bigram)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "h":
            return list(module)
    return []


def shard_model(model: nn.Module, world_size: int, dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` each transformer block, then the root, over all ranks (in place; the
    module keeps its class and names), with direct exchanges over gloo
    (:mod:`lmtrain.gloo_exchange`). ``dtype``: the autocast dtype, the one parameters are
    gathered in (``None``/fp32: full precision). One process: the model stays whole."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lmtrain.gloo_exchange import use_direct_exchanges

    low = dtype is not None and dtype != torch.float32
    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if low
              else MixedPrecisionPolicy())
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):  # the last block's backward follows its forward at
        # once: regathering its weights would only repeat the gather (as torchtitan does)
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    if use_direct_exchanges([*blocks, model]):  # each module's forward starts the next one's
        # gather, which then runs while it computes
        for current, following in zip([model, *blocks], blocks, strict=False):
            current.set_modules_to_forward_prefetch([following])  # type: ignore[operator]
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (no import when FSDP never was)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replicated_value(tensor: Any) -> Any:
    """A reduced value (the clipped gradient norm) as a plain tensor on every rank."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
