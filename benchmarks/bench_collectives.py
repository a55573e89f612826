"""gloo's all-gather and reduce-scatter against lmtrain's direct exchanges
(``lmtrain.gloo_exchange``), the collectives an FSDP step over gloo runs once per block.

    python benchmarks/bench_collectives.py                 # 2 processes, 48 and 206 MB
    python benchmarks/bench_collectives.py --nproc 4 --sizes 8,48

A size is the whole (unsharded) buffer in MB of fp32: 48 MB is one GPT-2-medium block's
weights, 206 MB its token embedding. Each collective runs ``--repeats`` times after one warm-up,
all in one run; the table gives the mean time of rank 0 and the ratio gloo / exchange.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cases(whole, shard, out, gather, scatter) -> dict:  # type: ignore[no-untyped-def]
    """Each collective, torch's way then the exchange, on these buffers."""
    import torch.distributed as dist

    group, avg = dist.group.WORLD, dist.ReduceOp.AVG
    return {"all-gather": (lambda: dist.all_gather_into_tensor(whole, shard),
                           lambda: gather(whole, shard, group).wait()),
            "reduce-scatter": (lambda: dist.reduce_scatter_tensor(out, whole, op=avg),
                               lambda: scatter(out, whole, group, avg))}


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: time each collective on buffers of each size."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "src"))
    from lmtrain.gloo_exchange import ExchangeAllGather, ExchangeReduceScatter

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    gather, scatter = ExchangeAllGather(), ExchangeReduceScatter()
    for mb in (int(s) for s in args.sizes.split(",")):
        numel = mb * 2 ** 20 // 4 // size * size
        whole, shard = torch.randn(numel), torch.randn(numel // size)
        out = torch.empty(numel // size)
        cases = _cases(whole, shard, out, gather, scatter)
        for name, (torch_way, exchange) in cases.items():
            times = []
            for fn in (torch_way, exchange):
                fn()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                dist.barrier()
                times.append((time.perf_counter() - t0) / args.repeats)
            if rank == 0:
                print(f"| {name} | {mb} MB | {times[0] * 1e3:.1f} ms | {times[1] * 1e3:.1f} ms "
                      f"| {times[0] / times[1]:.2f}x |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--sizes", default="48,206", help="comma list of buffer sizes in MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.nproc} processes, gloo, fp32, mean of {args.repeats}\n\n"
          "| collective | buffer | gloo | exchange | gloo / exchange |\n"
          "| --- | ---: | ---: | ---: | ---: |", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", __file__, "--worker", "--sizes", args.sizes,
           "--repeats", str(args.repeats)]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
