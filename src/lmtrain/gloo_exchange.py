"""FSDP2's all-gather and reduce-scatter over gloo (CPU runs) as direct exchanges between each
pair of processes, through FSDP's own extension points (``set_custom_all_gather`` /
``set_custom_reduce_scatter``).

gloo's ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` are slow on one machine:
measured on 2 CPU processes (``benchmarks/bench_collectives.py``), a 48 MB block's all-gather
took 50 ms and its reduce-scatter 69 ms, where sending each peer its piece with paired
``isend``/``irecv`` took 17 and 22 ms. Every process sends ``(N-1)/N`` of the data, as a ring
does, and all exchanges are posted before any is waited on, so none can deadlock. The
layouts are torch's: piece ``r`` of the flat buffer is rank ``r``'s shard.

The reduce-scatter sums its own piece first, then the others in rank order: deterministic, so
a resumed FSDP run repeats the uninterrupted one bit for bit. A reduction other than a sum or
an average (FSDP's ``PREMUL_SUM`` under a custom divide factor) goes to gloo as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

# FSDP2's comm interfaces, the types of its public ``set_custom_*`` methods' arguments
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.nn import Module

_SUM, _AVG = dist.ReduceOp.SUM, dist.ReduceOp.AVG


class _PlainBuffers:
    """Buffers from torch's own allocator (FSDP's ``allocate`` hook)."""

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _Exchanges(dist.Work):
    """The pending sends and receives of one exchange, as the one ``Work`` FSDP waits on."""

    def __init__(self, works: list[dist.Work]) -> None:
        super().__init__()
        self._works = works

    def wait(self, timeout: Any = None) -> bool:
        while self._works:
            self._works.pop(0).wait()
        return True


def _exchange(sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor],
              group: dist.ProcessGroup) -> _Exchanges:
    """Send ``sends[peer]`` to each peer and receive ``receives[peer]`` from it (group ranks),
    all posted at once; the returned work waits for every one."""
    ops = []
    for peer in sorted(sends):
        to = dist.get_global_rank(group, peer)
        ops += [dist.P2POp(dist.isend, sends[peer], to, group),
                dist.P2POp(dist.irecv, receives[peer], to, group)]
    return _Exchanges(dist.batch_isend_irecv(ops))


class ExchangeAllGather(_PlainBuffers, AllGather):
    """All-gather: each process sends its shard to every peer and receives theirs in place.
    It returns at once, the exchange pending, whatever ``async_op`` says: FSDP waits on the
    returned work before it reads the weights, so a gather it prefetches (the next block's,
    in forward and backward) runs while the current block computes."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> dist.Work | None:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        pieces = output_tensor.view(size, -1)
        if pieces[rank].data_ptr() != input_tensor.data_ptr():  # FSDP copies in place already
            pieces[rank].copy_(input_tensor.view(-1))
        peers = [p for p in range(size) if p != rank]
        return _exchange({p: pieces[rank] for p in peers}, {p: pieces[p] for p in peers}, group)


class ExchangeReduceScatter(_PlainBuffers, ReduceScatter):
    """Reduce-scatter: each process sends every peer that peer's piece of its gradients,
    receives its own piece from each and sums them (averages under ``AVG``)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: dist.ReduceOp | dist.ReduceOp.RedOpType,
                 async_op: bool = False) -> dist.Work | None:
        if not (isinstance(op, dist.ReduceOp.RedOpType) and op in (_SUM, _AVG)):
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                              async_op=async_op)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        pieces = input_tensor.view(size, -1)
        peers = [p for p in range(size) if p != rank]
        received = {p: torch.empty_like(output_tensor) for p in peers}
        _exchange({p: pieces[p] for p in peers}, received, group).wait()
        output_tensor.copy_(pieces[rank])
        for p in peers:
            output_tensor.add_(received.pop(p))
        if op == _AVG:
            output_tensor.div_(size)
        return None


def use_direct_exchanges(modules: Sequence[Module]) -> bool:
    """Give each ``fully_shard``-ed module in ``modules`` the direct exchanges; returns whether
    it did (gloo only: NCCL's own collectives are already the fast path)."""
    if dist.get_backend() != "gloo":
        return False
    for module in modules:
        module.set_custom_all_gather(ExchangeAllGather())  # type: ignore[operator]
        module.set_custom_reduce_scatter(ExchangeReduceScatter())  # type: ignore[operator]
    return True
