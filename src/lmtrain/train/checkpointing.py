"""A live run's checkpoints: :class:`Checkpointer` saves a run's components and progress (the
format's :func:`~lmtrain.checkpoint_format.to_state_dict` lays them out) and restores a saved
run into freshly built components so that training continues bit for bit. The format itself
is :mod:`lmtrain.checkpoint_format`'s; the files are :mod:`lmtrain.checkpoint`'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain.checkpoint import checkpoint_filename, rotate_checkpoints, save_checkpoint
from lmtrain.checkpoint_format import RunSnapshot, SavedRun, to_state_dict
from lmtrain.config import TrainingConfig
from lmtrain.distributed import all_gather_objects, broadcast_object, max_across_ranks
from lmtrain.errors import UserError
from lmtrain.models.gpt2 import model_positions
from lmtrain.models.weights import check_lora_base, load_weights, model_state
from lmtrain.progress import Generators, TrainProgress
from lmtrain.sharded_checkpoint import ShardedRun, load_sharded_state, save_sharded
from lmtrain.sharding import is_sharded, local
from lmtrain.train.optim import load_optimizer_state
from lmtrain.train.plan import RunPlan
from lmtrain.train.state import Components

log = logging.getLogger("lmtrain")


def rank_generators(parts: Components, progress: TrainProgress) -> list[Generators]:
    """Every rank's sampler and generator states, each with its own CUDA device's state (a
    collective: all ranks call it); empty in a single process."""
    place = parts.placement
    if place.world_size == 1:
        return []
    device = place.device
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    mine = Generators(progress.sampler.get_state(), torch.get_rng_state(), cuda)
    return [Generators(*states) for states in all_gather_objects(tuple(mine))]


def _weights_finite(parts: Components) -> bool:
    """Whether every trainable weight is finite (one transfer to the host; FSDP: every
    rank's shard)."""
    params = [local(p) for p in parts.raw_model.parameters() if p.requires_grad]
    finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    if not is_sharded(parts.raw_model):
        return finite
    return not max_across_ranks(int(not finite), parts.placement.device)


@dataclass(frozen=True)
class Checkpointer:
    """Where and how a run is saved: its settings (all of them are saved with it), its name
    and its checkpoint folder."""

    config: TrainingConfig
    run_name: str
    folder: Path

    @classmethod
    def of(cls, plan: RunPlan) -> Checkpointer:
        return cls(plan.config, plan.run_name, plan.paths.checkpoints)

    def snapshot(self, parts: Components) -> RunSnapshot:
        """What the format saves of ``parts``, as plain data."""
        cfg, model = self.config, parts.raw_model
        lora_base = None
        if cfg.model.use_lora:  # the adapter's base model: name + weights fingerprint
            from lmtrain.models.lora import base_reference

            lora_base = base_reference(model)
        return RunSnapshot(
            config=cfg, run_name=self.run_name, weights=model_state(model, cfg.model),
            optimizer_state=parts.optimizer.state_dict(),
            tokenizer_state=parts.tokenizer.state(), vocab_size=parts.tokenizer.vocab_size,
            last_lr=parts.optimizer.param_groups[0]["lr"],
            n_positions=model_positions(model) or cfg.model.block_size,
            grad_scaler_state=parts.grad_scaler.state_dict() if parts.grad_scaler else {},
            lora_base=lora_base)

    def state_dict(self, parts: Components, progress: TrainProgress,
                   ranks: list[Generators] | None = None) -> dict[str, Any]:
        """The checkpoint of the run now (``ranks``: every rank's generators when many)."""
        return to_state_dict(self.snapshot(parts), progress, ranks or [])

    def _previous(self, progress: TrainProgress) -> str:
        return (f"the step {progress.saved_steps[-1]} checkpoint is intact"
                if progress.saved_steps else "earlier checkpoints are untouched")

    def save(self, parts: Components, progress: TrainProgress) -> Path | None:
        """Write the checkpoint for the current step (main process only) and rotate old ones.

        The best-validation checkpoint (the lowest val loss measured at a checkpointed step) is
        spared by rotation; older files go only once the new one is on disk. A model whose
        weights are no longer finite is never saved.
        """
        settings, step = self.config.checkpointing, progress.step
        if not settings.enable_checkpoints:
            return None
        sharded = self.config.run.parallel == "fsdp"  # every rank writes its shards
        path = self.folder / checkpoint_filename(step, sharded)
        if (progress.saved_steps and progress.saved_steps[-1] == step
                and (parts.placement.world_size > 1 or path.exists())):
            return path  # already written at this step
        if not _weights_finite(parts):  # every rank holds the same weights: all refuse together
            raise UserError(
                f"the model's weights are no longer finite at step {step} "
                f"(ON_NAN={self.config.optimization.on_nan}); the step is not saved and "
                f"{self._previous(progress)} — lower LEARNING_RATE or set GRAD_CLIP, then resume")
        ranks = rank_generators(parts, progress)  # every rank takes part; rank 0 writes
        if parts.placement.is_main or sharded:
            self._write(path, parts, progress, ranks, sharded)
        progress.saved_steps.append(step)
        return path

    def _write(self, path: Path, parts: Components, progress: TrainProgress,
               ranks: list[Generators], sharded: bool = False) -> None:
        best = progress.record_best()
        try:
            if sharded:
                self._write_sharded(path, parts, progress, ranks)
            else:
                save_checkpoint(path, self.state_dict(parts, progress, ranks))
        except OSError as exc:
            progress.best_val_loss, progress.best_step = best
            raise UserError(
                f"CHECKPOINT_DIR={str(self.folder)!r}: writing the step {progress.step} "
                f"checkpoint failed ({exc.strerror or exc}); the run stops here and "
                f"{self._previous(progress)} — free space or pick another CHECKPOINT_DIR, then "
                f"resume") from None
        if not parts.placement.is_main:
            return
        protect = {progress.best_step} if progress.best_step is not None else set()
        rotate_checkpoints(self.folder, self.config.checkpointing.keep_last_checkpoints, protect,
                           upto=progress.step)
        log.info("step %d: saved checkpoint %s", progress.step, path)

    def _write_sharded(self, folder: Path, parts: Components, progress: TrainProgress,
                       ranks: list[Generators]) -> None:
        """The sharded checkpoint (``PARALLEL=fsdp``; a collective). A write that failed on
        any rank raises ``OSError`` on every rank."""
        from torch.distributed.checkpoint.api import CheckpointException

        main = parts.placement.is_main
        payload = self.state_dict(parts, progress, ranks) if main else {}
        try:
            save_sharded(folder, parts.raw_model, parts.optimizer, payload, main,
                         parts.placement.world_size, trainable_only=self.config.model.use_lora,
                         agree=broadcast_object)
        except CheckpointException as exc:  # DCP's: raised on every rank
            raise OSError(str(exc).strip().splitlines()[-1][:160] or "DCP write failed") from None

    def restore(self, parts: Components, progress: TrainProgress, run: SavedRun) -> None:
        """Load weights, optimizer, scaler and progress (bookkeeping, RNG and sampler) so
        training continues bit for bit. Reads ``run`` (validated when it was loaded) and never
        changes it."""
        if isinstance(run, ShardedRun):  # PARALLEL=fsdp: DCP reshards onto this world size
            self._load_sharded(parts, run)
        else:
            load_weights(parts.raw_model, self.config.model, run)
            load_optimizer_state(parts.optimizer, run.optimizer_state, run.where)
        if parts.grad_scaler is not None and run.grad_scaler_state:
            parts.grad_scaler.load_state_dict(run.grad_scaler_state)
        place = parts.placement
        same_world = run.world_size == place.world_size
        progress.load_state_dict(run.progress_state(place.rank if same_world else 0))
        if run.run_name != self.run_name:  # a branch (or a renamed run) is a tracker run of its own
            progress.tracker_run_ids = {}
        if not same_world:
            self._reseed_for_new_world(progress, place.rank, place.world_size, run.world_size)
            return
        mine = run.rank_rng_state(place.rank)
        if mine is not None and place.device.type == "cuda" and len(mine[1]):
            torch.cuda.set_rng_state(mine[1], place.device)  # each rank's own dropout RNG

    def _reseed_for_new_world(self, progress: TrainProgress, rank: int, world: int,
                              saved_world: int) -> None:
        """Batch order and dropout for a resume with another number of processes: seeded from
        (SEED, rank, step), so ranks differ and no rank replays the run's first batches."""
        seed = int(np.random.SeedSequence([self.config.optimization.seed, rank,
                                           progress.step]).generate_state(1)[0])
        progress.sampler.manual_seed(seed)
        torch.manual_seed(seed)
        if rank == 0:
            log.warning(
                "the checkpoint was written by %d process(es), this run has %d: weights and "
                "optimizer continue, but batch order and dropout are freshly seeded and a step "
                "now takes %d× BATCH_SIZE sequences instead of %d×, so this is not a bit-exact "
                "continuation (resume with the same number of processes for that)", saved_world,
                world, world, saved_world)

    def _load_sharded(self, parts: Components, run: ShardedRun) -> None:
        """The weights and optimizer state of a sharded checkpoint (LoRA: the adapter's, once
        its base is verified)."""
        check_lora_base(parts.raw_model, self.config.model, run)
        load_sharded_state(run, parts.raw_model, parts.optimizer,
                           trainable_only=self.config.model.use_lora)


def check_checkpoint_kind(run: SavedRun, parallel: str) -> None:
    """A sharded checkpoint resumes only a ``PARALLEL=fsdp`` run, a single file only the
    others; one line naming the fix otherwise."""
    sharded = isinstance(run, ShardedRun)
    if sharded and parallel != "fsdp":
        raise UserError(f"{run.where} is a sharded checkpoint (PARALLEL=fsdp); resume it with "
                        f"PARALLEL=fsdp under torchrun, or make it one file with `lmtrain "
                        f"checkpoint consolidate` and resume that")
    if not sharded and parallel == "fsdp":
        raise UserError(f"{run.where} is a single-file checkpoint; resume it with PARALLEL=ddp "
                        f"(the default), or start a fresh PARALLEL=fsdp run")
