"""The direct exchanges FSDP uses over gloo (``lmtrain.gloo_exchange``) against torch's own
collectives, in real gloo process groups of 2 and 3 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmtrain.gloo_exchange import ExchangeAllGather, ExchangeReduceScatter


def _check(rank: int, size: int, folder: str) -> None:
    """One process: the exchanges' results against gloo's collectives on the same inputs."""
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(folder) / "store"), size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    try:
        gen = torch.Generator().manual_seed(rank)
        numel = 6 * 1001
        shard = torch.randn(numel // size, generator=gen)
        grads = torch.randn(numel, generator=gen)
        found: dict[str, object] = {}

        expected, got = torch.empty(numel), torch.full((numel,), float("nan"))
        dist.all_gather_into_tensor(expected, shard)
        ExchangeAllGather()(got, shard, dist.group.WORLD).wait()  # pending until waited
        found["all_gather_equal"] = torch.equal(got, expected)
        inplace = torch.full((numel,), float("nan"))  # FSDP's layout: the input is a view of
        inplace.view(size, -1)[rank].copy_(shard)      # the output at this rank's piece
        ExchangeAllGather()(inplace, inplace.view(size, -1)[rank], dist.group.WORLD).wait()
        found["all_gather_inplace_equal"] = torch.equal(inplace, expected)

        for name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG),
                         ("max", dist.ReduceOp.MAX)):
            expected, got = torch.empty(numel // size), torch.empty(numel // size)
            dist.reduce_scatter_tensor(expected, grads.clone(), op=op)
            before = grads.clone()
            ExchangeReduceScatter()(got, grads, dist.group.WORLD, op)
            again = torch.empty(numel // size)
            ExchangeReduceScatter()(again, grads, dist.group.WORLD, op)
            found[f"{name}_max_diff"] = (got - expected).abs().max().item()
            found[f"{name}_deterministic"] = torch.equal(got, again)
            found[f"{name}_input_kept"] = torch.equal(grads, before)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("size", [2, 3])
def test_exchanges_give_what_gloo_gives(tmp_path, size):
    mp.spawn(_check, args=(size, str(tmp_path)), nprocs=size, join=True)
    for rank in range(size):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["all_gather_equal"] and found["all_gather_inplace_equal"], found
        for name in ("sum", "avg", "max"):
            # the same sums, perhaps added in another order: within fp32 rounding
            assert found[f"{name}_max_diff"] <= 1e-6, (name, found)
            assert found[f"{name}_deterministic"] and found[f"{name}_input_kept"], (name, found)
        if size == 2:  # a + b is b + a: bit for bit
            assert found["sum_max_diff"] == 0.0, found
