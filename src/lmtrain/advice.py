"""Warnings for settings that validate but mean nothing, or not what they seem, for this run.

Pure: config and where the run starts in, warning lines out (the session logs them).
"""

from __future__ import annotations

from lmtrain.config import TrainingConfig


def steps_to_run(cfg: TrainingConfig, start: int, resumed: bool) -> int:
    """``RESUME_STEPS`` more steps when given on resume, else up to ``TRAINING_STEPS``."""
    if resumed and cfg.checkpointing.resume_steps is not None:
        return cfg.checkpointing.resume_steps
    return max(cfg.optimization.training_steps - start, 0)


def run_warnings(cfg: TrainingConfig, start: int, resumed: bool) -> list[str]:
    """What to tell the user before a run from step ``start`` (a checkpoint's when
    ``resumed``) trains: ignored settings, an empty resume, a schedule that misses the run."""
    out = []
    n_steps = steps_to_run(cfg, start, resumed)
    end = start + n_steps
    if not resumed and cfg.checkpointing.resume_steps is not None:
        out.append(f"RESUME_STEPS={cfg.checkpointing.resume_steps} is ignored: this run starts "
                   f"fresh (no checkpoint to resume); TRAINING_STEPS="
                   f"{cfg.optimization.training_steps} sets its length")
    if resumed and n_steps == 0 and cfg.checkpointing.resume_steps is None:
        out.append(f"the checkpoint is at step {start}, which reaches TRAINING_STEPS="
                   f"{cfg.optimization.training_steps}: nothing to train; set RESUME_STEPS=N to "
                   f"train N more steps")
    if cfg.optimization.lr_scheduler == "none" or n_steps == 0:
        return out
    if end <= cfg.optimization.warmup_steps:
        out.append(f"WARMUP_STEPS={cfg.optimization.warmup_steps} covers every step of this "
                   f"run (it ends at step {end}): the learning rate never reaches LEARNING_RATE="
                   f"{cfg.optimization.learning_rate:g}; lower WARMUP_STEPS or train longer")
    horizon = cfg.optimization.decay_horizon
    if resumed and end > horizon:
        first = max(start, horizon)
        floor = cfg.optimization.learning_rate * cfg.optimization.min_lr_ratio
        span = "the whole resume" if start >= horizon else f"steps {first + 1}-{end}"
        out.append(f"{span} runs past LR_DECAY_STEPS={horizon} at the minimum learning rate "
                   f"{floor:.2e} (LEARNING_RATE × MIN_LR_RATIO); set LR_DECAY_STEPS={end} to "
                   f"stretch the cosine schedule to the end of this resume")
    return out
