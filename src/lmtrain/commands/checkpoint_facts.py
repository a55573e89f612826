"""The facts ``lmtrain inspect`` shows about a saved run: read through its
:class:`~lmtrain.checkpoint_format.SavedRun` view, JSON-ready with :func:`dataclasses.asdict`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtrain.checkpoint_format import SavedRun
from lmtrain.config import GROUP_OF, GROUPS

#: The settings that describe each kind of model's architecture, in the order shown.
ARCHITECTURE_SETTINGS = {
    "from_scratch": ("arch", "qk_norm", "n_layer", "n_head", "n_embd", "block_size",
                     "dropout"),
    "gpt2": ("gpt2_model_name", "n_layer", "n_head", "n_embd", "block_size", "n_positions",
             "dropout"),
}
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


@dataclass(frozen=True)
class TokenizerFacts:
    kind: str
    vocab_size: int


@dataclass(frozen=True)
class CheckpointFacts:
    """What ``inspect`` shows (``--json`` prints these fields in this order)."""

    path: str
    size_bytes: int
    format_version: int
    lmtrain_version: str | None
    run_name: str | None
    step: int
    planned_steps: int | None
    model_type: str
    use_lora: bool
    architecture: dict[str, Any]
    optimizer: str | None
    parameters_saved: int
    tokenizer: TokenizerFacts
    batch_size: int
    training_data_source: str | None
    last_losses: dict[str, float | None]
    best_val_loss: float | None
    best_step: int | None
    digest: str | None
    tracker_run_ids: dict[str, str]
    #: what the run *is*, group by group (never where an invocation worked)
    settings: dict[str, dict[str, Any]]


def facts_of(run: SavedRun, path: Path) -> CheckpointFacts:
    """The facts about a validated saved run; its settings as it was trained (a pre-recipe
    checkpoint's ``arch``, ``qk_norm`` and ``optimizer`` included)."""
    settings = run.run_settings
    hp = {**run.hyperparameters, **settings}
    use_lora = bool(hp.get("use_lora"))
    shown = ARCHITECTURE_SETTINGS.get(run.model_type, ()) + (LORA_SETTINGS if use_lora else ())
    return CheckpointFacts(
        path=str(path), size_bytes=path.stat().st_size, format_version=run.format_version,
        lmtrain_version=run.lmtrain_version, run_name=run.run_name, step=run.step,
        planned_steps=hp.get("training_steps"), model_type=run.model_type, use_lora=use_lora,
        architecture={k: hp.get(k) for k in shown if k != "qk_norm" or hp.get("arch") == "llama"},
        optimizer=hp.get("optimizer"),
        parameters_saved=sum(int(t.numel()) for t in run.model_state.values()),
        tokenizer=TokenizerFacts(run.tokenizer_kind, run.vocab_size),
        batch_size=run.batch_size, training_data_source=hp.get("training_data_source"),
        last_losses={k: _finite(v) for k, v in run.last_losses.items()},
        best_val_loss=_finite(run.best_val_loss), best_step=run.best_step, digest=run.digest,
        tracker_run_ids=run.tracker_run_ids, settings=_by_group(settings))


def _by_group(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings under their group's label, groups in their usual order, empty ones left out."""
    grouped: dict[str, dict[str, Any]] = {label: {} for label in GROUPS}
    for name, value in settings.items():
        grouped[GROUP_OF[name]][name] = value
    return {label: values for label, values in grouped.items() if values}


def _finite(value: float | None) -> float | None:
    """A finite float, or ``None`` for a missing or non-finite value (JSON has no inf/nan)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
