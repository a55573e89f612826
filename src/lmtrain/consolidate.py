"""A sharded checkpoint (``PARALLEL=fsdp``) into today's single file: the weights and optimizer
state gathered whole in one process through DCP, beside the run record as it was saved, so
``sample``, ``eval``, ``export``, ``inspect`` and a ``PARALLEL=ddp`` resume read it."""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.checkpoint_format import with_weights
from lmtrain.data.tokenizers import saved_tokenizer
from lmtrain.durable import storage_error
from lmtrain.errors import UserError
from lmtrain.inference import config_now
from lmtrain.models import build_model
from lmtrain.models.weights import check_lora_base, model_state
from lmtrain.sharded_checkpoint import (
    ShardedRun,
    is_sharded_checkpoint,
    load_sharded_run,
    load_sharded_state,
)
from lmtrain.train.optim import build_optimizer


def consolidated_path(folder: Path) -> Path:
    """Where :func:`consolidate` writes by default: ``step_N.dcp`` -> ``step_N.pt`` beside it."""
    return folder.with_suffix(".pt")


def consolidate(src: str | Path, out: str | Path | None = None, base: str | None = None,
                label: str = "CKPT") -> tuple[ShardedRun, Path]:
    """Write the sharded checkpoint ``src`` as one ``.pt`` file (default beside it); an
    existing file is never replaced. Returns the run read and the file written."""
    src = Path(src)
    if not is_sharded_checkpoint(src):
        raise UserError(f"{label}={str(src)!r} is not a sharded checkpoint folder (step_N.dcp "
                        f"written with PARALLEL=fsdp); a .pt file is already one file")
    target = Path(out) if out is not None else consolidated_path(src)
    if target.exists():
        raise UserError(f"OUT={str(target)!r} exists; nothing was replaced — give another "
                        f"OUT or remove it")
    run = load_sharded_run(src, label)
    cfg = config_now(run, base)
    torch.manual_seed(cfg.optimization.seed)  # a from-scratch LoRA base: rebuilt from the seed
    model = build_model(cfg.model, saved_tokenizer(run).vocab_size)
    optimizer = build_optimizer(model, cfg.optimization, torch.device("cpu"))
    check_lora_base(model, cfg.model, run)
    load_sharded_state(run, model, optimizer, trainable_only=cfg.model.use_lora)
    payload = with_weights(run, model_state(model, cfg.model), optimizer.state_dict())
    try:
        save_checkpoint(target, payload)
    except OSError as exc:
        raise storage_error("OUT", target, exc) from None
    return run, target
