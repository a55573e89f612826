"""The checkpoint format, owned here: key names, version, validation, the content digest and
:class:`SavedRun`, the typed read-only view every reader uses.

A checkpoint is data handed to lmtrain, never an instruction: :func:`validate` checks every
key's type and content before anything uses it, a sha256 digest of the contents catches
silent corruption, and only what the run *is* (see :data:`lmtrain.config.INVOCATION_FIELDS`)
is read back as settings. This module depends on nothing above :mod:`lmtrain.config`; torch
is imported inside the functions that need it, so finding checkpoints stays light.
It writes as well as reads: :func:`to_state_dict` turns a live run (its
:class:`RunSnapshot` and :class:`~lmtrain.progress.TrainProgress`) into the saved dict, and
:meth:`SavedRun.progress_state` gives the progress back. Taking the snapshot from a live run
and restoring the model and optimizer live in :mod:`lmtrain.train.checkpointing`; the files
themselves in :mod:`lmtrain.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lmtrain import __version__
from lmtrain.checkpoint_structure import structure_problem
from lmtrain.config import TrainingConfig, saved_run_settings
from lmtrain.errors import UserError
from lmtrain.progress import Generators, TrainProgress

if TYPE_CHECKING:
    import torch

#: 1: the first release; 2: adds the content digest and ``tracker_run_ids``.
FORMAT_VERSION = 2

# --- key names (one torch.save dict per checkpoint; docs/checkpoints.md lists them) ----------

FORMAT_VERSION_KEY = "format_version"
LMTRAIN_VERSION_KEY = "lmtrain_version"
DIGEST_KEY = "content_sha256"
STEP_KEY = "step"
MODEL_TYPE_KEY = "model_type"
RUN_NAME_KEY = "run_name"
MODEL_STATE_KEY = "model_state_dict"
OPTIMIZER_STATE_KEY = "optimizer_state_dict"
SCHEDULER_STATE_KEY = "scheduler_state_dict"
HYPERPARAMETERS_KEY = "hyperparameters"
VOCAB_SIZE_KEY = "vocab_size"
BLOCK_SIZE_KEY = "block_size"
BATCH_SIZE_KEY = "batch_size"
TOKENIZER_KEY = "tokenizer"
RNG_STATE_KEY = "rng_state"
CUDA_RNG_STATE_KEY = "cuda_rng_state"
SAMPLER_STATE_KEY = "sampler_state"
RANK_RNG_STATES_KEY = "rank_rng_states"
WORLD_SIZE_KEY = "world_size"
BEST_VAL_LOSS_KEY = "best_val_loss"
BEST_STEP_KEY = "best_step"
LAST_LOSSES_KEY = "last_losses"
GRAD_SCALER_STATE_KEY = "grad_scaler_state_dict"
TRACKER_RUN_IDS_KEY = "tracker_run_ids"
LORA_BASE_KEY = "lora_base"
LOSS_WINDOW_KEY = "loss_window"

#: Every key a checkpoint may hold, in the order they are written.
KEYS = (
    FORMAT_VERSION_KEY, LMTRAIN_VERSION_KEY, STEP_KEY, MODEL_TYPE_KEY, RUN_NAME_KEY,
    MODEL_STATE_KEY, OPTIMIZER_STATE_KEY, SCHEDULER_STATE_KEY, HYPERPARAMETERS_KEY,
    VOCAB_SIZE_KEY, BLOCK_SIZE_KEY, BATCH_SIZE_KEY, TOKENIZER_KEY, RNG_STATE_KEY,
    CUDA_RNG_STATE_KEY, SAMPLER_STATE_KEY, WORLD_SIZE_KEY, BEST_VAL_LOSS_KEY, BEST_STEP_KEY,
    LAST_LOSSES_KEY, GRAD_SCALER_STATE_KEY, TRACKER_RUN_IDS_KEY, LORA_BASE_KEY,
    RANK_RNG_STATES_KEY, LOSS_WINDOW_KEY, DIGEST_KEY,
)
REQUIRED_KEYS = (
    FORMAT_VERSION_KEY, STEP_KEY, MODEL_STATE_KEY, OPTIMIZER_STATE_KEY, HYPERPARAMETERS_KEY,
    VOCAB_SIZE_KEY, BLOCK_SIZE_KEY, BATCH_SIZE_KEY, TOKENIZER_KEY,
)
#: What an exact resume needs beyond :data:`REQUIRED_KEYS`.
RESUME_KEYS = (RNG_STATE_KEY, SAMPLER_STATE_KEY)
#: The two generator states of each process in ``rank_rng_states``.
RANK_CPU, RANK_CUDA = "cpu", "cuda"
#: Tokenizer kinds a checkpoint may hold, and the JSON text field each needs beside its kind.
TOKENIZER_TEXT_FIELDS: dict[str, str | None] = {
    "character": "chars", "gpt2": None, "custom_bpe": "json", "gpt2_files": "json",
}


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


def _digest_matches(ckpt: Mapping[str, Any]) -> bool:
    saved = ckpt.get(DIGEST_KEY)
    return isinstance(saved, str) and saved == content_digest(dict(ckpt))


# --- what the run is --------------------------------------------------------------------------

def config_of(ckpt: Mapping[str, Any]) -> TrainingConfig:
    """What the run *is*, as saved: its hyperparameters minus everything about where an
    invocation works (paths, run name, rotation, downloads, outputs), which always come from
    the user or the defaults."""
    return TrainingConfig.model_validate(saved_run_settings(ckpt[HYPERPARAMETERS_KEY]))


# --- small predicates -------------------------------------------------------------------------

def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_tensor(t) for t in value)


def _is_text_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


def _is_loss_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_number(v)
                                           for k, v in value.items())


def _is_weights(value: Any) -> bool:
    """A non-empty map of parameter names to tensors."""
    return bool(value) and all(isinstance(k, str) and _is_tensor(v) for k, v in value.items())


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


def _is_generator_state(state: Any) -> bool:
    """A CPU generator state that ``torch.Generator.set_state`` accepts."""
    import torch

    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        return False
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _is_rank_state(state: Any) -> bool:
    """One process's entry of ``rank_rng_states``."""
    return (isinstance(state, dict) and _is_generator_state(state.get(RANK_CPU))
            and _is_tensor(state.get(RANK_CUDA)))


def _is_base_reference(value: Any) -> bool:
    """A LoRA adapter's base model reference: its name and weights fingerprint as text."""
    return isinstance(value, dict) and all(isinstance(value.get(k), str)
                                           for k in ("name", "fingerprint"))


# --- validation: one small check per concern -------------------------------------------------

#: The required keys whose type must be right before anything else is looked at.
_KINDS = {STEP_KEY: int, HYPERPARAMETERS_KEY: dict, MODEL_STATE_KEY: dict,
          OPTIMIZER_STATE_KEY: dict, TOKENIZER_KEY: str}
#: Optional keys: (key, its value when absent, is it well formed?, what is wrong otherwise).
_OPTIONAL: tuple[tuple[str, Any, Callable[[Any], bool], str], ...] = (
    (CUDA_RNG_STATE_KEY, [], _is_tensor_list, "cuda_rng_state is not a list of tensors"),
    (BEST_VAL_LOSS_KEY, None, lambda v: v is None or _is_number(v),
     "best_val_loss is not a number"),
    (BEST_STEP_KEY, None, lambda v: v is None or _is_int(v), "best_step is not a step number"),
    (LAST_LOSSES_KEY, {}, _is_loss_map, "last_losses is not a map of names to numbers"),
    (LOSS_WINDOW_KEY, [], lambda v: isinstance(v, list) and all(map(_is_number, v)),
     "loss_window is not a list of losses"),
    (GRAD_SCALER_STATE_KEY, {}, lambda v: isinstance(v, dict),
     "grad_scaler_state_dict is not a dict"),
    (TRACKER_RUN_IDS_KEY, {}, _is_text_map,
     "tracker_run_ids is not a map of tracker names to run ids"),
    (RUN_NAME_KEY, "", lambda v: isinstance(v, str), "run_name is not text"),
    (MODEL_TYPE_KEY, "", lambda v: isinstance(v, str), "model_type is not text"),
    (LMTRAIN_VERSION_KEY, "", lambda v: isinstance(v, str), "lmtrain_version is not text"),
)


def _wrong_types(ckpt: Mapping[str, Any]) -> list[str]:
    wrong = [k for k, kind in _KINDS.items()
             if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if not wrong:
        return []
    return [f"{', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type"]


def _count_problems(ckpt: Mapping[str, Any]) -> list[str]:
    """``step`` and the three sizes: whole numbers in range."""
    out = [f"step is {ckpt[STEP_KEY]}, below 0"] if ckpt[STEP_KEY] < 0 else []
    return out + [f"{key} is {ckpt[key]!r}, not a whole number >= 1"
                  for key in (VOCAB_SIZE_KEY, BLOCK_SIZE_KEY, BATCH_SIZE_KEY)
                  if not _is_int(ckpt[key], 1)]


def _settings_problems(ckpt: Mapping[str, Any]) -> tuple[TrainingConfig | None, list[str]]:
    """The saved run's config (``None`` when its hyperparameters do not validate)."""
    from pydantic import ValidationError

    try:
        return config_of(ckpt), []
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(map(str, err.get("loc") or ())) or "hyperparameters"
        return None, [f"hyperparameter {name} is invalid ({err['msg'].lower()})"]


def _block_size_problems(ckpt: Mapping[str, Any], cfg: TrainingConfig) -> list[str]:
    if ckpt[BLOCK_SIZE_KEY] == cfg.model.block_size:
        return []
    return [f"block_size {ckpt[BLOCK_SIZE_KEY]} differs from its hyperparameters' "
            f"{cfg.model.block_size}"]


def _state_problems(ckpt: Mapping[str, Any]) -> list[str]:
    """Weights and optimizer state: of the layout torch gives them."""
    out = []
    if not _is_weights(ckpt[MODEL_STATE_KEY]):
        out.append("model_state_dict is not a non-empty map of names to tensors")
    if not _is_optimizer_state(ckpt[OPTIMIZER_STATE_KEY]):
        out.append("optimizer_state_dict is not an optimizer's state")
    return out


def tokenizer_problem(text: Any) -> str | None:
    """What is wrong with a saved tokenizer's JSON by key and type (``None`` if nothing); that
    it rebuilds, with the saved ``vocab_size``, is checked where it is rebuilt."""
    try:
        state = json.loads(text)
    except (TypeError, ValueError):
        return "tokenizer is not JSON text"
    if not isinstance(state, dict):
        return "tokenizer is not a JSON object"
    kind = state.get("kind")
    if not isinstance(kind, str) or kind not in TOKENIZER_TEXT_FIELDS:
        return f"the checkpoint's tokenizer kind {kind!r} is unknown to this lmtrain"
    field = TOKENIZER_TEXT_FIELDS[kind]
    if field is not None and not isinstance(state.get(field), str):
        return f"the {kind} tokenizer lacks its {field!r} text"
    return None


def _world_size(ckpt: Mapping[str, Any]) -> tuple[int, list[str]]:
    world = ckpt.get(WORLD_SIZE_KEY, 1)
    if _is_int(world, 1):
        return world, []
    return 1, [f"world_size is {world!r}, not a whole number >= 1"]


def _generator_problems(ckpt: Mapping[str, Any], world: int) -> list[str]:
    """The RNG and sampler states: present where needed, one per process where per process."""
    out = [f"{key} is missing" for key in RESUME_KEYS if key not in ckpt]
    if RNG_STATE_KEY in ckpt and not _is_generator_state(ckpt[RNG_STATE_KEY]):
        out.append("rng_state is not a torch generator state")
    sampler = ckpt.get(SAMPLER_STATE_KEY)
    if SAMPLER_STATE_KEY in ckpt and not (
            _is_generator_state(sampler) or (isinstance(sampler, list) and len(sampler) == world
                                             and all(map(_is_generator_state, sampler)))):
        out.append("sampler_state is not a generator state (one per process)")
    ranks = ckpt.get(RANK_RNG_STATES_KEY, [])
    if ranks and not (isinstance(ranks, list) and len(ranks) == world
                      and all(map(_is_rank_state, ranks))):
        out.append("rank_rng_states is not one generator state per process")
    return out


def _lora_problems(ckpt: Mapping[str, Any], cfg: TrainingConfig) -> list[str]:
    if not cfg.model.use_lora or _is_base_reference(ckpt.get(LORA_BASE_KEY)):
        return []
    return ["lora_base (the adapter's base model) is missing or malformed"]


def problems(ckpt: Mapping[str, Any]) -> list[str]:
    """What is wrong with a checkpoint that has all :data:`REQUIRED_KEYS` (empty if nothing)."""
    wrong = _wrong_types(ckpt)
    if wrong:
        return wrong
    cfg, out = _settings_problems(ckpt)
    out = _count_problems(ckpt) + out
    if cfg is not None and not out:
        out += _block_size_problems(ckpt, cfg)
    out += _state_problems(ckpt)
    tokenizer = tokenizer_problem(ckpt[TOKENIZER_KEY])
    out += [tokenizer] if tokenizer else []
    world, world_problems = _world_size(ckpt)
    out += _generator_problems(ckpt, world) + world_problems
    out += [what for key, absent, ok, what in _OPTIONAL if not ok(ckpt.get(key, absent))]
    return out + (_lora_problems(ckpt, cfg) if cfg is not None else [])


def damaged(where: str, what: str) -> UserError:
    """The one line for a checkpoint with something wrong inside it."""
    return UserError(f"{where} is damaged: {what}; pick an earlier checkpoint")


def _check_envelope(ckpt: Any, where: str) -> None:
    """A dict with every required key, of a format version this lmtrain reads."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{where} is not an lmtrain checkpoint (it holds a "
                        f"{type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{where} is not an lmtrain checkpoint: it lacks {', '.join(missing)}")
    structure = structure_problem(ckpt, (MODEL_STATE_KEY, OPTIMIZER_STATE_KEY))  # first: what
    if structure:  # follows walks, prints and hashes it
        raise damaged(where, structure)
    version = ckpt[FORMAT_VERSION_KEY]
    if not _is_int(version, 1):
        raise UserError(f"{where} has an invalid format version {version!r:.60}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} has format version {version}, newer than this lmtrain understands "
            f"({FORMAT_VERSION}); upgrade lmtrain to use it")


def validate(ckpt: Any, where: str) -> None:
    """Check every key of a loaded checkpoint; :class:`UserError` (one line) if anything is off.

    ``where`` names the file in messages (``CHECKPOINT_PATH='...'``). The digest is checked
    last, so a crafted file is told by what is wrong with it, a flipped bit by the digest.
    """
    _check_envelope(ckpt, where)
    found = problems(ckpt)
    if found:
        raise damaged(where, "; ".join(found))
    if ckpt[FORMAT_VERSION_KEY] >= 2 and not _digest_matches(ckpt):
        raise UserError(f"{where} is corrupt: its contents do not match their sha256 digest "
                        f"(changed after it was written); pick an earlier checkpoint")


# --- writing: a live run into its checkpoint -------------------------------------------------

@dataclass(frozen=True)
class RunSnapshot:
    """What a live run hands the format to save, as plain data (the run layer takes it from
    the run's components: :func:`lmtrain.train.checkpointing.snapshot`)."""

    config: TrainingConfig
    run_name: str
    #: all weights, or only the LoRA adapter's
    weights: Mapping[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    #: the tokenizer's ``state()`` (saved as JSON text) and its vocabulary size
    tokenizer_state: dict[str, Any]
    vocab_size: int
    #: the learning rate of the last step (for readers: the schedule is a function of the step)
    last_lr: float
    #: the model's context limit (``n_positions``), saved beside the hyperparameters
    n_positions: int
    grad_scaler_state: dict[str, Any] = field(default_factory=dict)
    #: a LoRA adapter's base model: name and weights fingerprint
    lora_base: Mapping[str, str] | None = None


def _scheduler_state(run: RunSnapshot, step: int) -> dict[str, Any]:
    """The schedule's parameters (the schedule is a pure function of the step; kept for
    readers of the file)."""
    opt = run.config.optimization
    return {"kind": opt.lr_scheduler, "warmup_steps": opt.warmup_steps,
            "lr_decay_steps": opt.decay_horizon, "min_lr_ratio": opt.min_lr_ratio,
            "last_lr": run.last_lr, "step": step}


def _rank_states(ranks: Sequence[Generators]) -> dict[str, Any]:
    """Every process's sampler and generator states (a distributed run; ``{}`` in one
    process, whose states the checkpoint's own keys hold). A rank's ``cuda`` holds its own
    device's state, if any."""
    import torch

    if len(ranks) <= 1:
        return {}
    return {SAMPLER_STATE_KEY: [r.sampler for r in ranks],
            RANK_RNG_STATES_KEY: [{RANK_CPU: r.cpu,
                                   RANK_CUDA: r.cuda[0] if r.cuda else torch.empty(0)}
                                  for r in ranks]}


def to_state_dict(run: RunSnapshot, progress: TrainProgress,
                  ranks: Sequence[Generators] = ()) -> dict[str, Any]:
    """The checkpoint of ``run`` at ``progress``: plain data that loads with
    ``weights_only=True``. ``ranks``: every process's generators in a distributed run. The
    digest is added when the file is written (:func:`lmtrain.checkpoint.save_checkpoint`)."""
    cfg, gens = run.config, progress.generators()
    best = progress.best_val_loss
    payload: dict[str, Any] = {
        FORMAT_VERSION_KEY: FORMAT_VERSION,
        LMTRAIN_VERSION_KEY: __version__,
        STEP_KEY: progress.step,
        MODEL_TYPE_KEY: cfg.model.model_type,
        RUN_NAME_KEY: run.run_name,
        MODEL_STATE_KEY: run.weights,
        OPTIMIZER_STATE_KEY: run.optimizer_state,
        SCHEDULER_STATE_KEY: _scheduler_state(run, progress.step),
        HYPERPARAMETERS_KEY: {**cfg.flat(), "n_positions": run.n_positions},
        VOCAB_SIZE_KEY: run.vocab_size,
        BLOCK_SIZE_KEY: cfg.model.block_size,
        BATCH_SIZE_KEY: cfg.optimization.batch_size,
        TOKENIZER_KEY: json.dumps(run.tokenizer_state),
        RNG_STATE_KEY: gens.cpu,
        CUDA_RNG_STATE_KEY: gens.cuda,
        SAMPLER_STATE_KEY: gens.sampler,
        WORLD_SIZE_KEY: max(len(ranks), 1),
        BEST_VAL_LOSS_KEY: best if math.isfinite(best) else None,
        BEST_STEP_KEY: progress.best_step,
        LAST_LOSSES_KEY: dict(progress.last_losses),
        LOSS_WINDOW_KEY: list(progress.loss_window),
        GRAD_SCALER_STATE_KEY: dict(run.grad_scaler_state),
        TRACKER_RUN_IDS_KEY: dict(progress.tracker_run_ids),
    }
    if cfg.model.use_lora:
        payload[LORA_BASE_KEY] = dict(run.lora_base or {})
    payload.update(_rank_states(ranks))
    return payload



#: What a sharded checkpoint's run record holds in place of its weights (its DCP files do).
SHARDED_WEIGHTS = "<sharded: in the DCP files of this folder>"


def sharded_record(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's state dict whose weights and optimizer state live elsewhere (in the DCP
    files of a sharded checkpoint: :mod:`lmtrain.sharded_checkpoint`): the run record."""
    import torch

    return {**payload, MODEL_STATE_KEY: {SHARDED_WEIGHTS: torch.zeros(0)},
            OPTIMIZER_STATE_KEY: {"state": {}, "param_groups": [{"params": []}]}}


def with_weights(run: SavedRun, weights: Mapping[str, Any],
                 optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A saved run's state dict with these weights and optimizer state (a sharded checkpoint
    gathered into one file: :mod:`lmtrain.consolidate`)."""
    return {**run.payload, MODEL_STATE_KEY: dict(weights), OPTIMIZER_STATE_KEY: optimizer_state}

# --- the read-only view ----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SavedRun:
    """A checkpoint as its readers see it: read-only, with typed properties for what it holds.

    Build it from a validated checkpoint (:func:`lmtrain.checkpoint.load_run` does both, or
    :meth:`validated`). ``where`` names the file in messages (``CKPT='...'``).
    """

    payload: Mapping[str, Any]
    where: str = "the checkpoint"

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", MappingProxyType(dict(self.payload)))

    @classmethod
    def validated(cls, ckpt: Any, where: str) -> SavedRun:
        """The view of ``ckpt`` once :func:`validate` has found nothing wrong with it."""
        validate(ckpt, where)
        return cls(ckpt, where)

    def damaged(self, what: str) -> UserError:
        """The one line for something wrong inside this checkpoint."""
        return damaged(self.where, what)

    # identity and progress
    @property
    def format_version(self) -> int:
        return int(self.payload[FORMAT_VERSION_KEY])

    @property
    def lmtrain_version(self) -> str | None:
        return self.payload.get(LMTRAIN_VERSION_KEY)

    @property
    def digest(self) -> str | None:
        """The sealed content digest (``None`` in format 1)."""
        return self.payload.get(DIGEST_KEY)

    @property
    def step(self) -> int:
        return int(self.payload[STEP_KEY])

    @property
    def run_name(self) -> str | None:
        return self.payload.get(RUN_NAME_KEY)

    # what the run is
    @property
    def hyperparameters(self) -> Mapping[str, Any]:
        """Every setting as saved, the invocation's included (read :attr:`config` to use)."""
        return MappingProxyType(self.payload[HYPERPARAMETERS_KEY])

    @property
    def run_settings(self) -> dict[str, Any]:
        """The saved settings that say what the run *is* (never where an invocation works)."""
        return saved_run_settings(self.payload[HYPERPARAMETERS_KEY])

    @cached_property
    def config(self) -> TrainingConfig:
        """:attr:`run_settings` as a validated config."""
        return config_of(self.payload)

    @property
    def model_type(self) -> str:
        return (self.payload.get(MODEL_TYPE_KEY)
                or self.payload[HYPERPARAMETERS_KEY].get("model_type", "from_scratch"))

    @property
    def vocab_size(self) -> int:
        return int(self.payload[VOCAB_SIZE_KEY])

    @property
    def block_size(self) -> int:
        return int(self.payload[BLOCK_SIZE_KEY])

    @property
    def batch_size(self) -> int:
        return int(self.payload[BATCH_SIZE_KEY])

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer's state as JSON text (rebuilt by ``data.tokenizers``)."""
        return self.payload[TOKENIZER_KEY]

    @property
    def tokenizer_kind(self) -> str:
        return json.loads(self.payload[TOKENIZER_KEY])["kind"]

    @property
    def lora_base(self) -> Mapping[str, str] | None:
        """A LoRA adapter's base model: name, resolved location, revision, fingerprint."""
        base = self.payload.get(LORA_BASE_KEY)
        return MappingProxyType(base) if base is not None else None

    # trained state
    @property
    def model_state(self) -> Mapping[str, torch.Tensor]:
        """All weights, or only the LoRA adapter's."""
        return MappingProxyType(self.payload[MODEL_STATE_KEY])

    @property
    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's own ``state_dict()`` (as saved; load it, do not change it)."""
        return self.payload[OPTIMIZER_STATE_KEY]

    @property
    def grad_scaler_state(self) -> dict[str, Any]:
        """The fp16 loss scaler's state (empty when the run had none)."""
        return self.payload.get(GRAD_SCALER_STATE_KEY) or {}

    # generators, per process
    @property
    def world_size(self) -> int:
        """How many processes wrote it (1 for checkpoints from before distributed runs)."""
        return int(self.payload.get(WORLD_SIZE_KEY) or 1)

    @property
    def rng_state(self) -> torch.Tensor:
        """The global torch generator (dropout) of the writing process."""
        return self.payload[RNG_STATE_KEY]

    @property
    def cuda_rng_states(self) -> list[torch.Tensor]:
        return list(self.payload.get(CUDA_RNG_STATE_KEY) or [])

    def sampler_state(self, rank: int) -> torch.Tensor:
        """The batch sampler's generator state of process ``rank``."""
        state = self.payload[SAMPLER_STATE_KEY]
        return state[rank] if isinstance(state, list) else state

    def rank_rng_state(self, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(CPU, CUDA) generator states of process ``rank`` in a distributed run, else None."""
        ranks = self.payload.get(RANK_RNG_STATES_KEY) or []
        if not ranks:
            return None
        return ranks[rank][RANK_CPU], ranks[rank][RANK_CUDA]

    def generators(self, rank: int = 0) -> Generators:
        """The sampler's and the global generators' states of process ``rank`` (its own CUDA
        device's state is :meth:`rank_rng_state`'s)."""
        mine = self.rank_rng_state(rank)
        return Generators(self.sampler_state(rank), self.rng_state if mine is None else mine[0],
                          self.cuda_rng_states)

    def progress_state(self, rank: int = 0) -> dict[str, Any]:
        """The saved progress as :meth:`TrainProgress.state_dict` gives it, with the
        generators of process ``rank``: what :meth:`TrainProgress.load_state_dict` takes."""
        best = self.best_val_loss
        saved = TrainProgress(step=self.step, best_val_loss=math.inf if best is None else best,
                              best_step=self.best_step, last_losses=self.last_losses,
                              loss_window=self.loss_window,
                              tracker_run_ids=self.tracker_run_ids)
        return saved.state_dict(self.generators(rank))

    # bookkeeping
    @property
    def best_val_loss(self) -> float | None:
        best = self.payload.get(BEST_VAL_LOSS_KEY)
        return None if best is None else float(best)

    @property
    def best_step(self) -> int | None:
        return self.payload.get(BEST_STEP_KEY)

    @property
    def last_losses(self) -> dict[str, float]:
        """The last evaluation's losses by name (with the ``step`` they were taken at)."""
        return dict(self.payload.get(LAST_LOSSES_KEY) or {})

    @property
    def loss_window(self) -> list[float]:
        """The train losses of the steps since the last ``LOG_INTERVAL`` step."""
        return [float(v) for v in self.payload.get(LOSS_WINDOW_KEY) or []]

    @property
    def tracker_run_ids(self) -> dict[str, str]:
        """Tracker name -> run id, so a resume continues the same tracker run."""
        return dict(self.payload.get(TRACKER_RUN_IDS_KEY) or {})

