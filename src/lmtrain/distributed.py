"""Many processes, one run: torchrun's environment -> process group, DDP, and the few
collectives the loop needs. In a single process every function passes through unchanged.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous); the process group
uses NCCL on CUDA and gloo on the CPU. Rank 0 is the main process: it alone writes
checkpoints, logs and metrics. Every rank runs the same steps, evaluations and checkpoint
gathers, so the collectives line up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmtrain.errors import TrainingInterrupted, UserError

#: How long a rank waits in a collective for the others before the run fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Rank, local rank and world size from torchrun's variables (one process when unset)."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = environ.get(name, "").strip()
        try:
            values[name] = int(raw) if raw else default
        except ValueError:
            raise UserError(f"{name}={raw!r} is not a whole number; launch many processes "
                            f"with torchrun, which sets it") from None
    info = DistInfo(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UserError(f"RANK={info.rank} with WORLD_SIZE={info.world_size} is inconsistent; "
                        f"launch many processes with torchrun, which sets both")
    return info


def is_distributed() -> bool:
    """Whether this process is part of an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (idempotent); returns this rank's
    device: ``cuda:LOCAL_RANK`` for CUDA runs, ``device`` otherwise."""
    info = env_info()
    if info.world_size == 1:
        return info, device
    if device.type == "mps":
        raise UserError("DEVICE=mps does not support many processes; use DEVICE=cpu with "
                        "torchrun, or run one process")
    if device.type == "cuda":
        local_procs = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        if device.index is not None and local_procs.isdigit() and int(local_procs) > 1:
            raise UserError(
                f"DEVICE={device} would put all {local_procs} processes of this machine on one "
                f"GPU; use DEVICE=cuda (or auto) with torchrun: each process takes "
                f"cuda:LOCAL_RANK")
        if device.index is None:
            if info.local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"LOCAL_RANK={info.local_rank} but this machine has "
                    f"{torch.cuda.device_count()} CUDA devices; lower --nproc_per_node")
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return info, device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process run, else ``model``."""
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks, on every rank (e.g. a stop signal seen by one)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches, downloads); the others follow.

    Rank 0 releases the others even when its block fails, so that they fail on their own
    instead of waiting at the barrier for the collective timeout.
    """
    main = not is_distributed() or dist.get_rank() == 0
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def cleanup() -> None:
    """Leave the process group at the end of a run (call it from a ``finally``).

    After a normal end or a stop that all ranks agreed on, a barrier first lets every rank
    finish its last collective before any rank tears the group down: a gloo peer that vanishes
    mid-teardown can abort the process that remains. While another exception is propagating,
    this rank may have failed alone (a checkpoint write on rank 0) and the others wait in a
    different collective: the barrier would hang until the collective timeout, so it is skipped.
    """
    if is_distributed():
        failing = sys.exc_info()[1]
        if failing is None or isinstance(failing, TrainingInterrupted):
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()
