"""Warnings for settings that validate but mean nothing, or not what they seem, for this run.

Pure: config and where the run starts in, warning lines out (the session logs them).
"""

from __future__ import annotations

from lmtrain.config import TrainingConfig


def steps_to_run(cfg: TrainingConfig, start: int, resumed: bool) -> int:
    """``RESUME_STEPS`` more steps when given on resume, else up to ``TRAINING_STEPS``."""
    if resumed and cfg.resume_steps is not None:
        return cfg.resume_steps
    return max(cfg.training_steps - start, 0)


def run_warnings(cfg: TrainingConfig, start: int, resumed: bool) -> list[str]:
    """What to tell the user before a run from step ``start`` (a checkpoint's when
    ``resumed``) trains: ignored settings, an empty resume, a schedule that misses the run."""
    out = []
    n_steps = steps_to_run(cfg, start, resumed)
    end = start + n_steps
    if not resumed and cfg.resume_steps is not None:
        out.append(f"RESUME_STEPS={cfg.resume_steps} is ignored: this run starts fresh (no "
                   f"checkpoint to resume); TRAINING_STEPS={cfg.training_steps} sets its length")
    if resumed and n_steps == 0 and cfg.resume_steps is None:
        out.append(f"the checkpoint is at step {start}, which reaches TRAINING_STEPS="
                   f"{cfg.training_steps}: nothing to train; set RESUME_STEPS=N to train N more "
                   f"steps")
    if cfg.lr_scheduler == "none" or n_steps == 0:
        return out
    if end <= cfg.warmup_steps:
        out.append(f"WARMUP_STEPS={cfg.warmup_steps} covers every step of this run (it ends at "
                   f"step {end}): the learning rate never reaches LEARNING_RATE="
                   f"{cfg.learning_rate:g}; lower WARMUP_STEPS or train longer")
    horizon = cfg.decay_horizon
    if resumed and end > horizon:
        first = max(start, horizon)
        floor = cfg.learning_rate * cfg.min_lr_ratio
        span = "the whole resume" if start >= horizon else f"steps {first + 1}-{end}"
        out.append(f"{span} runs past LR_DECAY_STEPS={horizon} at the minimum learning rate "
                   f"{floor:.2e} (LEARNING_RATE × MIN_LR_RATIO); set LR_DECAY_STEPS={end} to "
                   f"stretch the cosine schedule to the end of this resume")
    return out
