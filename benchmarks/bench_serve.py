"""Serving under concurrent load: ``lmtrain serve`` with batching on and off, and ``transformers``
``generate`` per request on the exported model.

    python benchmarks/bench_serve.py --out bench-serve --plot     # a few minutes
    python benchmarks/bench_serve.py --quick                       # a smoke run (< 1 min)

A small question/answer model is trained first on bench_qa's synthetic tasks (the ``qa``
recipe with a learned 512-token BPE, ``--steps`` steps) and exported to Hugging Face format
(``lmtrain export``). Two servers then run side by side on 127.0.0.1: ``--max-batch 64``
(concurrent requests decode together) and ``--max-batch 1`` (one request at a time), both with
``--no-stop-at-eot`` so every answer has the same length. For each number of concurrent
clients (1, 4, 16, 64), each client sends ``--requests`` streamed completion requests one after
another (the unseen test questions, ``temperature: 0``, ``max_tokens`` tokens each, no stop),
and the bench records requests/s, generated tokens/s (from ``usage``), the p50/p95 latency and
time to first token, and the tokens per CPU-second of the server process (its user + system
time, all threads: a measure other load on the machine disturbs little). The two servers are
measured interleaved, level by level and round by round, so other load falls on both alike;
the table shows each measure's median over the rounds, the batched server's speed-ups too
(each round pairs its numbers with the one-at-a-time server's in the same round).
``transformers``' ``generate`` (greedy, the same ``max_tokens``) answers the same questions one
request at a time in this process, without HTTP. Writes ``table.md``, ``results.json`` (and
``serve.png`` with ``--plot``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_qa import RECIPES, make_questions, write_corpus

LEVELS = (1, 4, 16, 64)
SIDES = ("batched", "one at a time")


def train_model(out: Path, steps: int, seed: int) -> tuple[Path, list[str]]:
    """The checkpoint of a small QA run, and the prompts of its unseen test questions."""
    from lmtrain.config import explicit_settings
    from lmtrain.train.session import train

    records, test = make_questions(seed, 20_000, {"reverse": 100, "next letter": 16,
                                                  "next number": 16})
    corpus = write_corpus(out / "qa_train.jsonl", records)
    flags = {**RECIPES["qa"], "training_data_source": str(corpus), "training_steps": steps,
             "tokenization_method": "custom_bpe", "custom_vocab_size": 512,
             "device": "cpu", "max_new_tokens": 0, "eval_iters": 2, "eval_interval": 10**9,
             "checkpoint_interval": steps, "log_interval": 10**9, "eval_answers": 0,
             "run_name": "qa", "checkpoint_dir": str(out / "ckpt"), "log_dir": str(out / "logs"),
             "output_dir": str(out / "outputs"), "cache_dir": str(out / "cache")}
    values, sources = explicit_settings(flags=flags, env={})
    summary = train(values, sources)
    prompts = [f"QUESTION: {q.question} ANSWER:" for q in test]
    return summary.checkpoint_dir / f"step_{steps:07d}.pt", prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "serve", str(ckpt), "--port",
                             str(port), "--device", "cpu", "--max-batch", str(max_batch),
                             "--no-stop-at-eot"],
                            env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("a server did not start")


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": "qa", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": latency if first is None else first, "tokens": tokens}


async def load_test(url: str, prompts: list[str], clients: int, per_client: int,
                    max_tokens: int) -> dict[str, Any]:
    """``clients`` clients, each sending ``per_client`` requests one after another."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def run_client(c: int) -> list[dict[str, float]]:
            return [await one_request(client, url, prompts[(c * per_client + i) % len(prompts)],
                                      max_tokens) for i in range(per_client)]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(run_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return summarize([r for rows in done for r in rows], wall)


def summarize(rows: list[dict[str, float]], wall: float) -> dict[str, Any]:
    import numpy as np

    latency = np.array([r["latency"] for r in rows])
    ttft = np.array([r["ttft"] for r in rows])
    tokens = sum(r["tokens"] for r in rows)
    return {"requests": len(rows), "seconds": wall, "requests_per_s": len(rows) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_latency": float(np.percentile(latency, 50)),
            "p95_latency": float(np.percentile(latency, 95)),
            "p50_ttft": float(np.percentile(ttft, 50)), "p95_ttft": float(np.percentile(ttft, 95))}


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each measure's median over the rounds (the speed-ups too: each round pairs the two
    servers measured one after the other)."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]
            if isinstance(rounds[0][key], int | float)}


def measure(side: str, server: tuple[subprocess.Popen, str], prompts: list[str], clients: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One load test of one server, with the CPU time the server used for it."""
    proc, url = server
    cpu, mine = cpu_seconds(proc.pid), time.process_time()
    r = asyncio.run(load_test(url, prompts, clients, args.requests, args.max_tokens))
    r["tokens_per_cpu_s"] = r["tokens"] / max(cpu_seconds(proc.pid) - cpu, 1e-9)
    r["client_cpu_share"] = (time.process_time() - mine) / r["seconds"]
    r["server_cpu_share"] = r["tokens"] / r["tokens_per_cpu_s"] / r["seconds"]
    print(f"{side}, {clients} "
          f"clients: {r['tokens_per_s']:.0f} tokens/s, {r['tokens_per_cpu_s']:.0f} per server "
          f"CPU-s, p95 {1000 * r['p95_latency']:.0f} ms; CPU cores used: server "
          f"{r['server_cpu_share']:.2f}, client {r['client_cpu_share']:.2f}", flush=True)
    return r


def hf_generate(folder: Path, prompts: list[str], n: int, max_tokens: int) -> dict[str, Any]:
    """``model.generate`` per request, one at a time, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            ids = tok(prompts[i % len(prompts)], return_tensors="pt").input_ids
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=0)
            latency = time.perf_counter() - start
            rows.append({"latency": latency, "ttft": latency,
                         "tokens": out.shape[1] - ids.shape[1]})
    return summarize(rows, time.perf_counter() - t0)


def table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    lines = ["| server | clients | requests/s | tokens/s | tokens per server CPU-s | "
             "p50 latency | p95 latency | p50 TTFT | p95 TTFT | vs one at a time: tokens/s "
             "(per CPU-s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for side, levels in results.items():
        for clients, r in levels.items():
            ratio = (f"{r['speedup']:.2f}x ({r['cpu_speedup']:.2f}x)" if "speedup" in r
                     else "")
            lines.append(
                f"| {side} | {clients} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_cpu_s']:.0f} | "
                f"{1000 * r['p50_latency']:.0f} ms | {1000 * r['p95_latency']:.0f} ms | "
                f"{1000 * r['p50_ttft']:.0f} ms | {1000 * r['p95_ttft']:.0f} ms | {ratio} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("tokens_per_s", 1, "generated tokens/s"),
              ("tokens_per_cpu_s", 1, "tokens per server CPU-second"),
              ("p95_latency", 1000, "p95 latency (ms)")]
    for side, levels in results.items():
        xs = list(levels)
        for ax, (key, scale, _) in zip(axes, panels, strict=True):
            ax.plot(xs, [scale * levels[x][key] for x in xs], marker="o", label=side)
    for ax, (_, _, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("lmtrain serve: batching on vs off, and transformers generate per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps [default: 300]")
    p.add_argument("--requests", type=int, default=2,
                   help="requests per client per round [default: 2]")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds [default: 2]")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer [default: 32]")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--plot", action="store_true", help="write serve.png")
    p.add_argument("--out", default="bench-serve-out")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.levels = 20, 1, "1,16"
    levels = [int(x) for x in args.levels.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    ckpt, prompts = train_model(out, args.steps, args.seed)
    from lmtrain.cli import main as lmtrain

    assert lmtrain(["export", str(ckpt), str(out / "hf"), "--force"]) == 0
    servers = {"batched": start_server(ckpt, 64, args.threads),
               "one at a time": start_server(ckpt, 1, args.threads)}
    rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} torch "
          f"thread(s) per server", flush=True)
    try:
        for clients in levels:
            for _ in range(args.rounds):
                one_round = {side: measure(side, servers[side], prompts, clients, args)
                             for side in SIDES}
                batched, alone = one_round["batched"], one_round["one at a time"]
                batched["speedup"] = batched["tokens_per_s"] / alone["tokens_per_s"]
                batched["cpu_speedup"] = batched["tokens_per_cpu_s"] / alone["tokens_per_cpu_s"]
                for side, r in one_round.items():
                    rounds.setdefault((side, clients), []).append(r)
        for _ in range(args.rounds):
            cpu = time.process_time()
            r = hf_generate(out / "hf", prompts, max(levels) * args.requests // 4 or 1,
                            args.max_tokens)
            r["tokens_per_cpu_s"] = r["tokens"] / (time.process_time() - cpu)
            rounds.setdefault(("transformers generate", 1), []).append(r)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for (side, clients), runs in rounds.items():
        results.setdefault(side, {})[clients] = median_round(runs)
    text = table(results)
    print(text)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(
        {"median": results, "rounds": {f"{side}, {clients}": runs
                                       for (side, clients), runs in rounds.items()}},
        indent=1), encoding="utf-8")
    if args.plot:
        plot(results, out / "serve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
