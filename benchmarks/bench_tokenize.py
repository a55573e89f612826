"""Benchmark ``lmtrain prepare``: throughput and peak memory of tokenizing large corpora.

Builds synthetic corpora of the requested sizes from the bundled Shakespeare (each copy with
its lines shuffled differently, so the text does not simply repeat) as a text file and as a
Parquet dataset (documents of a few KB in a ``text`` column, snappy-compressed), runs
``lmtrain prepare`` on each in a fresh subprocess, then once more to time the cache hit.
Prints markdown rows; "MB" is the size of the text (the Parquet file itself is smaller).

    python benchmarks/bench_tokenize.py --quick                          # 3 MB smoke run
    python benchmarks/bench_tokenize.py --sizes 30,300                   # docs/benchmarks.md
    python benchmarks/bench_tokenize.py --sizes 300 --formats parquet    # one Parquet row
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmtrain.config import DEFAULT_CORPUS


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write about ``size_mb`` MB of shuffled Shakespeare to ``path``; returns the bytes."""
    lines = Path(DEFAULT_CORPUS).read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(size_mb * 1e6), 0
    with path.open("w", encoding="utf-8") as fh:
        while written < target:
            rng.shuffle(lines)
            piece = "".join(lines)[: target - written]
            fh.write(piece)
            written += len(piece.encode("utf-8"))
    return path.stat().st_size


def make_parquet(path: Path, size_mb: float, seed: int = 0, doc_lines: int = 60) -> int:
    """Write about ``size_mb`` MB of shuffled Shakespeare as a Parquet ``text`` column, one
    document per ``doc_lines`` lines, a row group at a time; returns the bytes of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = Path(DEFAULT_CORPUS).read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(size_mb * 1e6), 0
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while written < target:
            rng.shuffle(lines)
            docs = ["".join(lines[i:i + doc_lines]) for i in range(0, len(lines), doc_lines)]
            docs = [d for d in docs if d.strip()]
            writer.write_table(pa.table({"text": docs}, schema=schema))
            written += sum(len(d.encode("utf-8")) for d in docs)
    return written


def run_prepare(data: Path, method: str, cache: Path) -> tuple[dict, float, float]:
    """(prepare's JSON summary, wall seconds, the child's own peak RSS in MB)."""
    cmd = [sys.executable, "-m", "lmtrain", "prepare", "--data", str(data), "--method", method,
           "--cache-dir", str(cache), "--no-progress"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage (ru_maxrss in KiB)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed ({proc.returncode}): {err.read().strip()}")
        return json.loads(out.read().strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30,300", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--method", default="gpt2", choices=["gpt2", "character", "custom_bpe"])
    parser.add_argument("--formats", default="text,parquet",
                        help="comma list of text, parquet [default: both]")
    parser.add_argument("--quick", action="store_true", help="one 3 MB corpus (smoke run)")
    parser.add_argument("--workdir", default=None, help="where corpora and cache go (temp dir)")
    args = parser.parse_args()
    sizes = [3.0] if args.quick else sorted(float(s) for s in args.sizes.split(","))

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        print(f"cpus: {os.cpu_count()}, method: {args.method}")
        print("| source | text MB | tokens | first run s | MB/s | peak RSS MB | cache hit s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size in sizes:
            for fmt in args.formats.split(","):
                data = root / f"corpus-{size:g}MB.{'txt' if fmt == 'text' else 'parquet'}"
                n_bytes = (make_corpus if fmt == "text" else make_parquet)(data, size)
                cache = root / f"cache-{size:g}-{fmt}"
                summary, wall, peak = run_prepare(data, args.method, cache)
                hit, hit_wall, _ = run_prepare(data, args.method, cache)
                assert hit["cached"] and not summary["cached"]
                print(f"| {fmt} | {n_bytes / 1e6:.0f} | {summary['n_tokens']:,} | {wall:.1f} | "
                      f"{n_bytes / 1e6 / wall:.1f} | {peak:.0f} | {hit_wall:.2f} |", flush=True)
                data.unlink()


if __name__ == "__main__":
    main()
