"""Rebuild a trained model and its tokenizer from a checkpoint (for sampling, evaluation and
export), and check that a checkpoint's weights and optimizer state fit the model its settings
describe (for ``lmtrain inspect``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmtrain.checkpoint import list_checkpoints, load_run
from lmtrain.checkpoint_format import SavedRun
from lmtrain.config import ModelSettings, TrainingConfig
from lmtrain.data.tokenizers import Tokenizer, saved_tokenizer
from lmtrain.errors import UserError
from lmtrain.memory_estimate import check_memory
from lmtrain.models import build_model
from lmtrain.models.lora import base_location_now
from lmtrain.models.weights import load_weights
from lmtrain.sharded_checkpoint import ShardedRun
from lmtrain.train.optim import build_optimizer, load_optimizer_state


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: TrainingConfig
    checkpoint: SavedRun


def load_trained_model(path: str | Path, device: torch.device | None = None,
                       label: str = "CKPT", base: str | None = None,
                       run: SavedRun | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode (LoRA adapters applied to the verified base).

    Only what the run *is* comes from the file: downloads, caches and paths stay this
    invocation's (``ALLOW_DOWNLOAD`` saved as true in a checkpoint is not honoured). ``base``
    (``--base`` / ``GPT2_MODEL_NAME``) says where a GPT-2 run's base model lives now. ``run``:
    the checkpoint of ``path`` when it is already loaded (by :func:`find_checkpoint`).
    """
    if run is None:
        run = load_run(path, label=label)
    if isinstance(run, ShardedRun):
        raise UserError(f"{run.where} is a sharded checkpoint (PARALLEL=fsdp); make it one file "
                        f"first: lmtrain checkpoint consolidate {path}")
    cfg = config_now(run, base)
    tokenizer = saved_tokenizer(run)
    check_memory(cfg.model, tokenizer.vocab_size, (device or torch.device("cpu")).type,
                 training=False, origin="the checkpoint's ")
    torch.manual_seed(cfg.optimization.seed)  # a from-scratch LoRA base: rebuilt from the seed
    model = build_model(cfg.model, tokenizer.vocab_size)
    load_weights(model, cfg.model, run)
    model.to(device or torch.device("cpu")).eval()
    return LoadedModel(model, tokenizer, cfg, run)


def config_now(run: SavedRun, base: str | None) -> TrainingConfig:
    """A checkpoint's settings, a GPT-2 run's with GPT2_MODEL_NAME where its base model is
    found now (``base``: ``--base`` / ``GPT2_MODEL_NAME``; an adapter's saved reference)."""
    cfg = run.config
    if cfg.model.model_type != "gpt2":
        return cfg
    return cfg.with_facts(gpt2_model_name=base_location_now(cfg.model, run.lora_base, base))


def find_checkpoint(path: str | Path, step: int | None = None, label: str = "PATH"
                    ) -> tuple[Path, SavedRun | None]:
    """A checkpoint file as it is, or in a run folder the checkpoint of ``step``, else the
    run's best (the step with the lowest val loss, when its file is kept), else its newest;
    with it the checkpoint already loaded, when choosing it took loading it (the newest,
    which names the best step), to pass on to :func:`load_trained_model`: no file is loaded
    twice."""
    path = Path(path)
    if not path.is_dir():
        if step is not None:
            raise UserError(f"--step picks a checkpoint in a run folder; {label}={str(path)!r} "
                            f"is a file")
        return path, None
    found = dict(list_checkpoints(path))
    if not found:
        raise UserError(f"{label}={str(path)!r} holds no checkpoint (step_*.pt)")
    if step is not None:
        if step not in found:
            raise UserError(f"{label}={str(path)!r} has no checkpoint of step {step} (it has "
                            f"steps {', '.join(map(str, sorted(found)))})")
        return found[step], None
    newest = load_run(found[max(found)], label=label)
    best = newest.best_step
    if best is None or best == max(found) or best not in found:
        return found[max(found)], newest
    return found[best], None


def check_fits(run: SavedRun) -> None:
    """Build the run's model and optimizer on the ``meta`` device (no memory, no weights read)
    and check that the saved weights and optimizer state fit them. A LoRA adapter is checked
    against its base when it is loaded; a GPT-2 run whose base model is not here is skipped."""
    cfg = run.config
    if cfg.model.use_lora or isinstance(run, ShardedRun):  # checked when loaded (DCP: by name)
        return
    model = _model_on_meta(cfg.model, run.vocab_size)
    if model is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in run.model_state.items()}
    if saved != expected:
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        shaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                  else f"{shaped[0]} has shape {saved[shaped[0]]}, not {expected[shaped[0]]}")
        raise UserError(f"{run.where}: its weights do not fit the model its settings describe "
                        f"({detail}); the file is damaged")
    load_optimizer_state(build_optimizer(model, cfg.optimization, torch.device("meta")),
                         run.optimizer_state, run.where)


def _model_on_meta(config: ModelSettings, vocab_size: int) -> nn.Module | None:
    """The model ``config`` describes, with ``meta`` tensors; None for a GPT-2 base not found."""
    if config.model_type == "gpt2":
        from transformers import GPT2LMHeadModel

        from lmtrain.models.gpt2 import gpt2_config

        try:
            hf_config = gpt2_config(config)
        except UserError:
            return None
        with torch.device("meta"):
            return GPT2LMHeadModel(hf_config)
    with torch.device("meta"):
        return build_model(config, vocab_size)
