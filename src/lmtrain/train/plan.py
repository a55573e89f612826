"""Resolve once, then run: settings (+ a checkpoint) become one immutable :class:`RunPlan`.

The plan fixes the config, the run's name and folders, and the resume source before anything
is created on disk; the session then runs it and changes nothing in it. What the run *is* may
come from the checkpoint; where this invocation works (every folder, ``RUN_NAME``, rotation,
downloads, outputs) only from the user or the defaults (``INVOCATION_FIELDS``).

The merged settings (defaults, presets or the checkpoint's, then the explicit ones) are
validated once (:func:`lmtrain.config.settle`); what the plan settles after that (the run's
name and resume file, the schedule's horizon, a GPT-2 folder's real shape and a resumed
adapter's base) are facts it records (:meth:`TrainingConfig.with_facts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtrain.checkpoint import AUTO_RESUME, find_resumable, list_checkpoints, load_run
from lmtrain.checkpoint_format import SavedRun
from lmtrain.config import LoadedConfig, TrainingConfig, load_fresh, load_resumed
from lmtrain.data.tokenizers import saved_tokenizer
from lmtrain.errors import UserError
from lmtrain.models.gpt2 import find_base, gpt2_shape
from lmtrain.reporting import default_run_name, read_metrics, stable_run_name
from lmtrain.run_folder import RunPaths, branch_name, check_run_name


@dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a resumed run starts from (read-only: nothing writes to it)."""

    path: Path
    step: int
    checkpoint: SavedRun


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before a run starts."""

    loaded: LoadedConfig
    run_name: str
    paths: RunPaths
    resume: ResumeSource | None = None
    #: lines for the run's log once it is open (auto-resume findings, branches, warnings)
    notes: tuple[str, ...] = ()

    @property
    def config(self) -> TrainingConfig:
        return self.loaded.config


def _identity(name: str) -> str:
    return name


def resolve_plan(values: dict[str, Any], sources: dict[str, str],
                 agree: Callable[[str], str] = _identity) -> RunPlan:
    """The plan for explicit settings ``values`` (with their ``sources``).

    ``CHECKPOINT_PATH=auto`` resumes the newest valid checkpoint of the run (``RUN_NAME``, else
    ``<model>-<data>``) or starts it fresh. ``agree`` makes all processes of a distributed run
    use one name (rank 0's: default names hold a timestamp).
    """
    if values.get("run_name") is not None:
        check_run_name(str(values["run_name"]))
    resume = values.get("checkpoint_path")
    if str(resume).strip().lower() == AUTO_RESUME:
        return _auto_plan(values, sources)
    if resume:
        return _resume_plan(Path(str(resume)), values, sources, agree)
    fresh = _load_fresh(values, sources)
    return _plan(fresh, agree(fresh.config.run.run_name or default_run_name(fresh.config)),
                 None, [])


def _auto_plan(values: dict[str, Any], sources: dict[str, str]) -> RunPlan:
    """``CHECKPOINT_PATH=auto``: the run's newest usable checkpoint, else a fresh start.
    (The fresh settings name the run and its folder; a resume validates its own.)"""
    fresh = _load_fresh(values, sources)
    # RUN_NAME is this invocation's (never the checkpoint's): the same for both plans below
    run_name, name_source = fresh.config.run.run_name, None
    if not run_name:
        run_name = stable_run_name(fresh.config)
        name_source = "CHECKPOINT_PATH=auto: <model>-<data>"
    folder = _paths(fresh.config, run_name).checkpoints
    path, ckpt, problems = find_resumable(folder, check=saved_tokenizer)
    notes = [f"CHECKPOINT_PATH=auto: {p}" for p in problems]
    if path is None or ckpt is None:
        notes.append(f"CHECKPOINT_PATH=auto: no usable checkpoint in {folder}; starting run "
                     f"{run_name} fresh")
        return _plan(fresh, run_name, None, notes, name_source)
    notes.append(f"CHECKPOINT_PATH=auto: resuming {path}")
    loaded = load_resumed(
        ckpt.hyperparameters, {**values, "checkpoint_path": str(path)},
        {**sources, "checkpoint_path": sources.get("checkpoint_path", "")})
    return _plan(loaded, run_name, ResumeSource(path, ckpt.step, ckpt), notes, name_source)


def _resume_plan(path: Path, values: dict[str, Any], sources: dict[str, str],
                 agree: Callable[[str], str]) -> RunPlan:
    """A resume from the checkpoint at ``path``: under RUN_NAME, else the run folder the file
    lies in, else a new name; a branch when that run already went further."""
    ckpt = load_run(path)
    saved_tokenizer(ckpt)  # a tokenizer that does not rebuild fails before anything is created
    loaded = load_resumed(ckpt.hyperparameters, values, sources)
    source = ResumeSource(path, ckpt.step, ckpt)
    cfg = loaded.config
    notes: list[str] = []
    run_name, name_source = cfg.run.run_name, None
    if not run_name:
        run_name = _run_folder_of(path, cfg)
        name_source = "the checkpoint's run folder" if run_name else "new name"
        run_name = run_name or agree(default_run_name(cfg))
    later = _steps_after(_paths(cfg, run_name), source.step,
                         metrics=not cfg.checkpointing.enable_checkpoints)
    if later:  # history is never rewritten, whatever the settings: branch instead
        branch = branch_name(run_name, source.step, lambda n: _paths(cfg, n).logs.exists()
                             or _paths(cfg, n).checkpoints.exists())
        notes.append(f"run {run_name} already went past step {source.step} (up to step "
                     f"{later}); this resume continues as run {branch} and leaves its "
                     f"checkpoints and history untouched")
        run_name, name_source = branch, f"branch of {run_name} at step {source.step}"
    return _plan(loaded, run_name, source, notes, name_source)


def _steps_after(paths: RunPaths, step: int, metrics: bool) -> int | None:
    """The furthest step past ``step`` that the run reached: a later checkpoint, or (with
    ``metrics``: a resume that writes no checkpoint, whose run's checkpoints may not tell) the
    end of a run past it in its metrics (a ``final`` or ``text`` record). Plain metrics past
    the newest checkpoint (a run killed between checkpoints) do not count: resuming continues
    it."""
    later = [s for s, _ in list_checkpoints(paths.checkpoints) if s > step]
    if not metrics:
        return max(later) if later else None
    metrics_file = paths.logs / "metrics.jsonl"
    try:
        records = read_metrics(metrics_file) if metrics_file.is_file() else []
    except (OSError, UnicodeDecodeError):
        records = []
    later += [r["step"] for r in records if isinstance(r, dict)
              and r.get("kind") in ("final", "text")
              and isinstance(r.get("step"), int) and r["step"] > step]
    return max(later) if later else None


def _run_folder_of(path: Path, cfg: TrainingConfig) -> str | None:
    """The run a checkpoint file belongs to when it lies in ``CHECKPOINT_DIR/<run>/``."""
    try:
        inside = path.resolve().parent.parent == Path(cfg.checkpointing.checkpoint_dir).resolve()
    except OSError:
        return None
    return path.resolve().parent.name if inside else None


def _paths(cfg: TrainingConfig, run_name: str) -> RunPaths:
    return RunPaths.of(cfg.checkpointing.checkpoint_dir, cfg.run.log_dir, cfg.run.output_dir,
                       run_name)


def _load_fresh(values: dict[str, Any], sources: dict[str, str]) -> LoadedConfig:
    """A fresh run's settings, validated once, with the schedule's horizon recorded."""
    loaded = load_fresh(values, sources)
    if loaded.config.optimization.lr_decay_steps is not None:
        return loaded
    horizon = max(loaded.config.optimization.training_steps, 1)  # the horizon is saved with the run
    return LoadedConfig(loaded.config.with_facts(lr_decay_steps=horizon),
                        {**loaded.sources, "lr_decay_steps": "TRAINING_STEPS"})


#: Where a setting that nobody set came from: a GPT-2 run takes its value from the model.
_UNSET_SOURCES = ("default", "checkpoint")


def _gpt2_facts(loaded: LoadedConfig, saved_base: Any) -> LoadedConfig:
    """A GPT-2 run as it will run: a resumed LoRA run finds the base model its checkpoint
    names (``saved_base``; unless GPT2_MODEL_NAME is set), and the shape is the model's (an
    explicit different shape is refused)."""
    cfg, sources = loaded.config, dict(loaded.sources)
    if cfg.model.model_type != "gpt2":
        return loaded
    if (saved_base is not None and cfg.model.use_lora
            and sources.get("gpt2_model_name", "default") in _UNSET_SOURCES):
        cfg = cfg.with_facts(gpt2_model_name=find_base(dict(saved_base), None))
        sources["gpt2_model_name"] = "checkpoint's lora_base"
    facts = {}
    for name, real in gpt2_shape(cfg.model).items():  # GPT-2's shape: the model fixes it
        src = sources.get(name, "default")
        explicit = src not in _UNSET_SOURCES and not src.endswith("preset")
        if explicit and cfg.value(name) != real:
            raise UserError(
                f"{name.upper()}={cfg.value(name)} (from {src}) does not match "
                f"GPT2_MODEL_NAME={cfg.model.gpt2_model_name!r}, whose model has {name.upper()}="
                f"{real}; unset {name.upper()}: MODEL_TYPE=gpt2 takes its shape from the model")
        if cfg.value(name) != real or not explicit:
            facts[name], sources[name] = real, "GPT2_MODEL_NAME"
    return LoadedConfig(cfg.with_facts(**facts), sources)


def _plan(loaded: LoadedConfig, run_name: str, resume: ResumeSource | None,
          notes: list[str], name_source: str | None = None) -> RunPlan:
    """The final plan: the config names its run (and where that name came from, when lmtrain
    chose it) and its resume file."""
    check_run_name(run_name)
    loaded = _gpt2_facts(loaded, resume.checkpoint.lora_base if resume else None)  # base, shape
    cfg = loaded.config.with_facts(run_name=run_name,
                                   checkpoint_path=str(resume.path) if resume else None)
    loaded = LoadedConfig(cfg, {**loaded.sources,
                                **({"run_name": name_source} if name_source else {})})
    if resume is not None and loaded.sources.get("training_data_source") == "checkpoint":
        notes.append(f"data: TRAINING_DATA_SOURCE={cfg.data.training_data_source!r} comes from "
                     f"the checkpoint (set TRAINING_DATA_SOURCE to train on other data)")
    # Settings that validate but mean nothing for this run (RESUME_STEPS on a fresh run,
    # WARMUP_STEPS past the steps run, ...) are not notes: the session warns about them in the
    # run's log (advice.run_warnings), once the start step is known.
    return RunPlan(loaded, run_name, _paths(cfg, run_name), resume, tuple(notes))
