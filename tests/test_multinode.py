"""Many machines and elastic restarts, on one machine: two torchrun agents with ``--nnodes=2``
and a c10d rendezvous on 127.0.0.1 act as two machines; ``--max-restarts`` with
``CHECKPOINT_PATH=auto`` carries a run over a worker killed with SIGKILL. A launch that died of
a transient gloo / rendezvous failure is retried once (the message names it)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint_format import MODEL_STATE_KEY
from tests.conftest import ROOT, child_env
from tests.test_distributed import TRANSIENT, _env, _free_port, torchrun


def _two_agents(env: dict[str, str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Two torchrun agents of one process each, as two machines meeting at a c10d rendezvous
    on 127.0.0.1 (one retry on a transient failure). Returns (worst exit status, output)."""
    for attempt in range(2):
        port = _free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=lmtrain-two-nodes-{port}", str(ROOT / "training.py")]
        full_env = child_env({"OMP_NUM_THREADS": "1", **env})
        agents = [subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [a.communicate(timeout=timeout)[0] for a in agents]
        status = max(abs(a.returncode) for a in agents)
        output = "\n".join(outputs)
        if status == 0 or attempt or not TRANSIENT.search(output):
            return status, output
        print(f"two-agent launch failed transiently; retrying once:\n{output[-3000:]}",
              file=sys.stderr)
    raise AssertionError("unreachable")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)[MODEL_STATE_KEY]


@pytest.mark.integration
@pytest.mark.slow
def test_two_machines_match_one_machine_with_two_processes(corpus, tmp_path):
    one = torchrun(_env(corpus, tmp_path, training_steps=6, checkpoint_dir=tmp_path / "one"),
                   tmp_path)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    status, output = _two_agents(_env(corpus, tmp_path, training_steps=6,
                                      checkpoint_dir=tmp_path / "two"), tmp_path)
    assert status == 0, output[-4000:]
    a = _weights(tmp_path / "one" / "ddp" / "step_0000006.pt")
    b = _weights(tmp_path / "two" / "ddp" / "step_0000006.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("step_*.pt"))}


def _workers(agent: int) -> list[int]:
    """The worker processes torchrun's agent started (its children running training.py)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(agent)], capture_output=True,
                         text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "training.py" in line]


@pytest.mark.integration
@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_finishes_bit_for_bit(corpus, tmp_path):
    steps = 240
    settings = dict(training_steps=steps, checkpoint_interval=20, eval_interval=1000,
                    log_interval=1000, checkpoint_path="auto", keep_last_checkpoints=100)
    plain = torchrun(_env(corpus, tmp_path, checkpoint_dir=tmp_path / "plain", **settings),
                     tmp_path)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]

    folder = tmp_path / "elastic" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}",
           str(ROOT / "training.py")]
    # the restarted workers get a store of their own: in the rendezvous store they share with
    # the agent, torch 2.13 leaves the killed attempt's gloo addresses (docs/distributed.md)
    env = child_env({"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                     **_env(corpus, tmp_path, checkpoint_dir=tmp_path / "elastic", **settings)})
    log = tmp_path / "agent.log"  # a file, not a pipe: the run never waits for a reader
    with open(log, "w", encoding="utf-8") as out:
        agent = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (folder / "step_0000040.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        before = _digests(folder)
        workers = _workers(agent.pid)
        assert before and len(workers) == 2, "the run ended before a worker could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        agent.wait(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    output = log.read_text(encoding="utf-8")
    assert agent.returncode == 0, output[-4000:]
    assert max(int(n[5:12]) for n in before) < steps, "killed after the last checkpoint"
    assert "CHECKPOINT_PATH=auto: resuming" in output
    after = _digests(folder)
    for name, digest in before.items():  # nothing saved before the kill is lost or rewritten
        assert after.get(name) == digest, name
    a, b = _weights(tmp_path / "plain" / "ddp" / f"step_{steps:07d}.pt"), \
        _weights(folder / f"step_{steps:07d}.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
