"""The checkpoint format, in one place: key names, build, validate, restore, describe.

A checkpoint is data handed to lmtrain, never an instruction: :func:`validate` checks every
key's type and content before anything uses it, a sha256 digest of the contents catches
silent corruption, and only what the run *is* (see :data:`lmtrain.config.INVOCATION_FIELDS`)
is read back as settings. Torch is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmtrain.config import TrainingConfig
    from lmtrain.data.tokenizers import Tokenizer
    from lmtrain.train.state import RunContext

log = logging.getLogger("lmtrain")

#: 1: the first release; 2: adds the content digest and ``tracker_run_ids``.
FORMAT_VERSION = 2
DIGEST_KEY = "content_sha256"
REQUIRED_KEYS = (
    "format_version", "step", "model_state_dict", "optimizer_state_dict", "hyperparameters",
    "vocab_size", "block_size", "batch_size", "tokenizer",
)
#: What an exact resume needs beyond :data:`REQUIRED_KEYS`.
RESUME_KEYS = ("rng_state", "sampler_state")


# --- integrity --------------------------------------------------------------------------------

def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's contents (without its digest key), in a canonical order.

    Tensors contribute dtype, shape and raw bytes; other values their type and ``repr``.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != DIGEST_KEY} if isinstance(obj, dict) else obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(b"L%d;" % len(obj))
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its content digest set (what every saved checkpoint carries)."""
    return {**payload, DIGEST_KEY: content_digest(payload)}


# --- build ------------------------------------------------------------------------------------

def model_state(model: nn.Module, config: TrainingConfig) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: all of them, or only the LoRA adapter.

    Tied weights (``wte``/``lm_head``) stay one tensor, so ``torch.save`` stores them once.
    """
    if config.model.use_lora:
        from lmtrain.models.lora import adapter_state_dict

        return adapter_state_dict(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def build(ctx: RunContext, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of ``ctx`` now: plain data that loads with ``weights_only=True``.

    ``extra`` holds the per-rank states of a distributed run (see ``gather_rank_states``).
    The digest is added by :func:`seal` when the file is written.
    """
    import torch

    from lmtrain import __version__
    from lmtrain.models.gpt2 import model_positions

    cfg = ctx.config
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "lmtrain_version": __version__,
        "step": ctx.step,
        "model_type": cfg.model.model_type,
        "run_name": ctx.run_name,
        "model_state_dict": model_state(ctx.raw_model, cfg),
        "optimizer_state_dict": ctx.optimizer.state_dict(),
        "scheduler_state_dict": {
            "kind": cfg.optimization.lr_scheduler, "warmup_steps": cfg.optimization.warmup_steps,
            "lr_decay_steps": cfg.optimization.decay_horizon,
            "min_lr_ratio": cfg.optimization.min_lr_ratio,
            "last_lr": ctx.optimizer.param_groups[0]["lr"], "step": ctx.step,
        },
        "hyperparameters": {**cfg.flat(),  # + the model's context limit
                            "n_positions": model_positions(ctx.raw_model) or cfg.model.block_size},
        "vocab_size": ctx.tokenizer.vocab_size,
        "block_size": cfg.model.block_size,
        "batch_size": cfg.optimization.batch_size,
        "tokenizer": json.dumps(ctx.tokenizer.state()),
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        "sampler_state": ctx.sampler.get_state(),
        "world_size": ctx.world_size,
        "best_val_loss": ctx.best_val_loss if math.isfinite(ctx.best_val_loss) else None,
        "best_step": ctx.best_step,
        "last_losses": dict(ctx.last_losses),
        "grad_scaler_state_dict": ctx.grad_scaler.state_dict() if ctx.grad_scaler else {},
        "tracker_run_ids": dict(ctx.tracker_run_ids),
    }
    if cfg.model.use_lora:  # the adapter's base model: name + weights fingerprint
        from lmtrain.models.lora import base_reference

        payload["lora_base"] = base_reference(ctx.raw_model)
    payload.update(extra or {})
    return payload


# --- validate ---------------------------------------------------------------------------------

def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_optimizer_state(sd: Any) -> bool:
    """torch's ``Optimizer.state_dict()`` layout, or a dict of them (a combined optimizer)."""
    if not isinstance(sd, dict) or not sd:
        return False
    if "state" in sd or "param_groups" in sd:
        groups = sd.get("param_groups")
        return (isinstance(sd.get("state"), dict) and isinstance(groups, list) and bool(groups)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                        for g in groups))
    return all(_is_optimizer_state(part) for part in sd.values())


def _rng_state_ok(state: Any) -> bool:
    """A CPU generator state that ``torch.Generator.set_state`` accepts."""
    import torch

    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        return False
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def check_tokenizer(text: Any, vocab_size: Any) -> Tokenizer:
    """The tokenizer a checkpoint holds, rebuilt; ``ValueError`` naming what is wrong."""
    from lmtrain.data.tokenizers import tokenizer_from_state

    try:
        state = json.loads(text)
    except (TypeError, ValueError):
        raise ValueError("tokenizer is not JSON text") from None
    if not isinstance(state, dict):
        raise ValueError("tokenizer is not a JSON object")
    kind = state.get("kind")
    need = {"character": ("chars", str), "custom_bpe": ("json", str), "gpt2_files": ("json", str)}
    if kind in need and not isinstance(state.get(need[kind][0]), need[kind][1]):
        raise ValueError(f"the {kind} tokenizer lacks its {need[kind][0]!r} text")
    try:
        tokenizer = tokenizer_from_state(state)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # the tokenizer libraries raise many kinds on bad input
        raise ValueError(f"the {kind} tokenizer cannot be rebuilt "
                         f"({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
                         ) from None
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} differs from its tokenizer's "
                         f"{tokenizer.vocab_size} tokens")
    return tokenizer


def config_of(ckpt: Mapping[str, Any]) -> TrainingConfig:
    """What the run *is*, as saved: its hyperparameters minus everything about where an
    invocation works (paths, run name, rotation, downloads, outputs), which always come from
    the user or the defaults."""
    from lmtrain.config import TrainingConfig, saved_run_settings

    return TrainingConfig.model_validate(saved_run_settings(ckpt["hyperparameters"]))


def _problems(ckpt: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint that has all :data:`REQUIRED_KEYS` (empty if nothing)."""
    import torch
    from pydantic import ValidationError

    out = []
    kinds = {"step": int, "hyperparameters": dict, "model_state_dict": dict,
             "optimizer_state_dict": dict, "tokenizer": str}
    wrong = [k for k, kind in kinds.items()
             if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if wrong:
        return [f"{', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type"]
    if ckpt["step"] < 0:
        out.append(f"step is {ckpt['step']}, below 0")
    for key in ("vocab_size", "block_size", "batch_size"):
        if not _is_int(ckpt[key], 1):
            out.append(f"{key} is {ckpt[key]!r}, not a whole number >= 1")
    try:
        cfg = config_of(ckpt)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(map(str, err.get("loc") or ())) or "hyperparameters"
        out.append(f"hyperparameter {name} is invalid ({err['msg'].lower()})")
        cfg = None
    if cfg is not None and not out and ckpt["block_size"] != cfg.model.block_size:
        out.append(f"block_size {ckpt['block_size']} differs from its hyperparameters' "
                   f"{cfg.model.block_size}")
    weights = ckpt["model_state_dict"]
    if not weights or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                              for k, v in weights.items()):
        out.append("model_state_dict is not a non-empty map of names to tensors")
    if not _is_optimizer_state(ckpt["optimizer_state_dict"]):
        out.append("optimizer_state_dict is not an optimizer's state")
    if _is_int(ckpt["vocab_size"], 1):
        try:
            check_tokenizer(ckpt["tokenizer"], ckpt["vocab_size"])
        except ValueError as exc:
            out.append(str(exc))
    out += _resume_problems(ckpt)
    if cfg is not None and cfg.model.use_lora and not (
            isinstance(ckpt.get("lora_base"), dict)
            and all(isinstance(ckpt["lora_base"].get(k), str) for k in ("name", "fingerprint"))):
        out.append("lora_base (the adapter's base model) is missing or malformed")
    return out


def _resume_problems(ckpt: dict[str, Any]) -> list[str]:
    """RNG, sampler and bookkeeping keys: present where needed, of the right shape."""
    import torch

    out = [f"{key} is missing" for key in RESUME_KEYS if key not in ckpt]
    world = ckpt.get("world_size", 1)
    if not _is_int(world, 1):
        out.append(f"world_size is {world!r}, not a whole number >= 1")
        world = 1
    if "rng_state" in ckpt and not _rng_state_ok(ckpt["rng_state"]):
        out.append("rng_state is not a torch generator state")
    sampler = ckpt.get("sampler_state")
    if "sampler_state" in ckpt and not (
            _rng_state_ok(sampler) or (isinstance(sampler, list) and len(sampler) == world
                                       and all(_rng_state_ok(s) for s in sampler))):
        out.append("sampler_state is not a generator state (one per process)")
    ranks = ckpt.get("rank_rng_states", [])
    if ranks and not (isinstance(ranks, list) and len(ranks) == world and all(
            isinstance(r, dict) and _rng_state_ok(r.get("cpu"))
            and isinstance(r.get("cuda"), torch.Tensor) for r in ranks)):
        out.append("rank_rng_states is not one generator state per process")
    cuda = ckpt.get("cuda_rng_state", [])
    if not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
        out.append("cuda_rng_state is not a list of tensors")
    best, best_step = ckpt.get("best_val_loss"), ckpt.get("best_step")
    if best is not None and not _is_number(best):
        out.append("best_val_loss is not a number")
    if best_step is not None and not _is_int(best_step):
        out.append("best_step is not a step number")
    losses = ckpt.get("last_losses", {})
    if not (isinstance(losses, dict) and all(isinstance(k, str) and _is_number(v)
                                             for k, v in losses.items())):
        out.append("last_losses is not a map of names to numbers")
    if not isinstance(ckpt.get("grad_scaler_state_dict", {}), dict):
        out.append("grad_scaler_state_dict is not a dict")
    ids = ckpt.get("tracker_run_ids", {})
    if not (isinstance(ids, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in ids.items())):
        out.append("tracker_run_ids is not a map of tracker names to run ids")
    for key in ("run_name", "model_type", "lmtrain_version"):
        if key in ckpt and not isinstance(ckpt[key], str):
            out.append(f"{key} is not text")
    return out


def validate(ckpt: Any, where: str) -> None:
    """Check every key of a loaded checkpoint; :class:`UserError` (one line) if anything is off.

    ``where`` names the file in messages (``CHECKPOINT_PATH='...'``). The digest is checked
    last, so a crafted file is told by what is wrong with it, a flipped bit by the digest.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f"{where} is not an lmtrain checkpoint (it holds a "
                        f"{type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{where} is not an lmtrain checkpoint: it lacks {', '.join(missing)}")
    version = ckpt["format_version"]
    if not _is_int(version, 1):
        raise UserError(f"{where} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} has format version {version}, newer than this lmtrain understands "
            f"({FORMAT_VERSION}); upgrade lmtrain to use it")
    problems = _problems(ckpt)
    if problems:
        raise UserError(f"{where} is damaged: {'; '.join(problems)}; pick an earlier checkpoint")
    if version >= 2:
        saved = ckpt.get(DIGEST_KEY)
        if not isinstance(saved, str) or saved != content_digest(ckpt):
            raise UserError(f"{where} is corrupt: its contents do not match their sha256 digest "
                            f"(changed after it was written); pick an earlier checkpoint")


# --- restore ----------------------------------------------------------------------------------

def load_model_state(model: nn.Module, config: TrainingConfig, sd: dict[str, Any]) -> None:
    """Put a checkpoint's weights into ``model``; one line if they do not fit it."""
    if config.model.use_lora:
        from lmtrain.models.lora import load_adapter_state_dict

        load_adapter_state_dict(model, sd)
        return
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(
            f"the checkpoint's weights do not fit the model built from its settings "
            f"(GPT2_MODEL_NAME={config.model.gpt2_model_name!r} for gpt2 runs): "
            f"{' '.join(first[1:2] or first[:1])[:200]}; point GPT2_MODEL_NAME at the model "
            f"the run was trained from") from None


def load_weights(model: nn.Module, config: TrainingConfig, ckpt: Mapping[str, Any],
                 where: str) -> None:
    """Put a checkpoint's weights into ``model``; a LoRA adapter only once the base it was
    trained on is verified."""
    if config.model.use_lora:  # the adapter only fits the base it was trained on
        from lmtrain.models.lora import check_base_reference

        check_base_reference(model, ckpt.get("lora_base"), where)
    load_model_state(model, config, ckpt["model_state_dict"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any],
                         where: str) -> None:
    """Load a saved optimizer state into the freshly built optimizer, whatever its kind;
    a state that does not fit it (other layout, other parameters, other shapes) is one line."""
    import torch

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


def restore(ctx: RunContext, ckpt: Mapping[str, Any], where: str) -> None:
    """Load weights, optimizer, RNG and sampler state so training continues bit for bit.

    Reads ``ckpt`` (validated by :func:`validate`) and never changes it.
    """
    import torch

    load_weights(ctx.raw_model, ctx.config, ckpt, where)
    load_optimizer_state(ctx.optimizer, ckpt["optimizer_state_dict"], where)
    ctx.step = int(ckpt["step"])
    best = ckpt.get("best_val_loss")
    ctx.best_val_loss = math.inf if best is None else float(best)
    ctx.best_step = ckpt.get("best_step")
    ctx.last_losses = dict(ckpt.get("last_losses") or {})
    # a branch (or a renamed run) is a tracker run of its own
    same_run = ckpt.get("run_name") == ctx.run_name
    ctx.tracker_run_ids = dict(ckpt.get("tracker_run_ids") or {}) if same_run else {}
    if ctx.grad_scaler is not None and ckpt.get("grad_scaler_state_dict"):
        ctx.grad_scaler.load_state_dict(ckpt["grad_scaler_state_dict"])
    torch.set_rng_state(ckpt["rng_state"])
    cuda_states = ckpt.get("cuda_rng_state") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    saved_world = int(ckpt.get("world_size") or 1)
    if saved_world != ctx.world_size:
        _reseed_for_new_world(ctx, saved_world)
        return
    sampler_state = ckpt["sampler_state"]
    if isinstance(sampler_state, list):  # one state per rank (distributed runs)
        sampler_state = sampler_state[ctx.rank]
    ctx.sampler.set_state(sampler_state)
    rank_rng = ckpt.get("rank_rng_states") or []
    if rank_rng:  # each rank's own dropout RNG
        torch.set_rng_state(rank_rng[ctx.rank]["cpu"])
        if ctx.device.type == "cuda" and len(rank_rng[ctx.rank]["cuda"]):
            torch.cuda.set_rng_state(rank_rng[ctx.rank]["cuda"], ctx.device)


# --- describe ---------------------------------------------------------------------------------

ARCHITECTURE_KEYS = {
    "from_scratch": ("arch", "qk_norm", "n_layer", "n_head", "n_embd", "block_size",
                     "dropout"),
    "gpt2": ("gpt2_model_name", "n_layer", "n_head", "n_embd", "block_size", "n_positions",
             "dropout"),
}
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def check_fits(ckpt: Mapping[str, Any], where: str) -> None:
    """Build the run's model and optimizer on the ``meta`` device (no memory, no weights read)
    and check that the saved weights and optimizer state fit them. A LoRA adapter is checked
    against its base when it is loaded; a GPT-2 run whose base model is not here is skipped."""
    import torch

    from lmtrain.train.optim import build_optimizer

    cfg = config_of(ckpt)
    if cfg.model.use_lora:
        return
    model = _model_on_meta(cfg, int(ckpt["vocab_size"]))
    if model is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["model_state_dict"].items()}
    if saved != expected:
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        shaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                  else f"{shaped[0]} has shape {saved[shaped[0]]}, not {expected[shaped[0]]}")
        raise UserError(f"{where}: its weights do not fit the model its settings describe "
                        f"({detail}); the file is damaged")
    load_optimizer_state(build_optimizer(model, cfg.optimization, torch.device("meta")),
                         ckpt["optimizer_state_dict"], where)


def _model_on_meta(cfg: TrainingConfig, vocab_size: int) -> nn.Module | None:
    """The model ``cfg`` describes, with ``meta`` tensors; None for a GPT-2 base not found."""
    import torch

    if cfg.model.model_type == "gpt2":
        from transformers import GPT2LMHeadModel

        from lmtrain.models.gpt2 import gpt2_config

        try:
            hf_config = gpt2_config(cfg.model)
        except UserError:
            return None
        with torch.device("meta"):
            return GPT2LMHeadModel(hf_config)
    from lmtrain.models import build_model

    with torch.device("meta"):
        return build_model(cfg.model, vocab_size)


def describe(ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The facts ``lmtrain inspect`` shows about a validated checkpoint, JSON-ready; its
    ``settings`` are what the run *is*, group by group (a pre-recipe checkpoint's ``arch``,
    ``qk_norm`` and ``optimizer`` as it was trained)."""
    from lmtrain.config import GROUP_OF, GROUPS, saved_run_settings

    run = saved_run_settings(ckpt["hyperparameters"])
    hp = {**ckpt["hyperparameters"], **run}
    settings: dict[str, dict[str, Any]] = {label: {} for label in GROUPS}
    for name, value in run.items():
        settings[GROUP_OF[name]][name] = value
    model_type = ckpt.get("model_type") or hp.get("model_type", "from_scratch")
    use_lora = bool(hp.get("use_lora"))
    keys = ARCHITECTURE_KEYS.get(model_type, ()) + (LORA_KEYS if use_lora else ())
    tokenizer = json.loads(ckpt["tokenizer"])
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "format_version": ckpt["format_version"],
        "lmtrain_version": ckpt.get("lmtrain_version"),
        "run_name": ckpt.get("run_name"),
        "step": int(ckpt["step"]),
        "planned_steps": hp.get("training_steps"),
        "model_type": model_type,
        "use_lora": use_lora,
        "architecture": {k: hp.get(k) for k in keys
                         if k != "qk_norm" or hp.get("arch") == "llama"},
        "optimizer": hp.get("optimizer"),
        "parameters_saved": sum(int(t.numel()) for t in ckpt["model_state_dict"].values()),
        "tokenizer": {"kind": tokenizer.get("kind"), "vocab_size": int(ckpt["vocab_size"])},
        "batch_size": int(ckpt["batch_size"]),
        "training_data_source": hp.get("training_data_source"),
        "last_losses": {k: _finite(v) for k, v in (ckpt.get("last_losses") or {}).items()},
        "best_val_loss": _finite(ckpt.get("best_val_loss")),
        "best_step": ckpt.get("best_step"),
        "digest": ckpt.get(DIGEST_KEY),
        "tracker_run_ids": dict(ckpt.get("tracker_run_ids") or {}),
        "settings": {label: values for label, values in settings.items() if values},
    }


def _finite(value: Any) -> float | None:
    """A finite float, or ``None`` for a missing or non-finite value (JSON has no inf/nan)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _reseed_for_new_world(ctx: RunContext, saved_world: int) -> None:
    """Batch order and dropout for a resume with another number of processes: seeded from
    (SEED, rank, step), so ranks differ and no rank replays the run's first batches."""
    import numpy as np
    import torch

    seed = int(np.random.SeedSequence([ctx.config.optimization.seed, ctx.rank,
                                       ctx.step]).generate_state(1)[0])
    ctx.sampler.manual_seed(seed)
    torch.manual_seed(seed)
    if ctx.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: weights and "
            "optimizer continue, but batch order and dropout are freshly seeded and a step "
            "now takes %d× BATCH_SIZE sequences instead of %d×, so this is not a bit-exact "
            "continuation (resume with the same number of processes for that)", saved_world,
            ctx.world_size, ctx.world_size, saved_world)
