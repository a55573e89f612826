"""Distributed runs: torchrun with 2 CPU processes (gloo) trains, checkpoints every rank's
sampler, resumes bit for bit, and a resume with another world size falls back clearly."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.distributed import DistInfo, env_info
from lmtrain.errors import UserError
from tests.conftest import ROOT, TINY, child_env

#: Output that marks a launch killed by a transient gloo / rendezvous failure, not by lmtrain.
TRANSIENT = re.compile(r"gloo|connection (reset|refused|closed)|broken pipe|rendezvous|"
                       r"address already in use|SIGABRT|Signals\.SIGABRT", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(env: dict[str, str], cwd: Path, nproc: int = 2,
             timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=nproc training.py`` on a free port; one retry when the
    launch died of a transient gloo / connection failure."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=localhost:{_free_port()}", str(ROOT / "training.py")]
        proc = subprocess.run(cmd, env=child_env({"OMP_NUM_THREADS": "1", **env}), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        proc.attempts = attempt + 1  # each launch writes its own log file
        if proc.returncode == 0 or attempt or not TRANSIENT.search(output):
            return proc
        print(f"torchrun failed transiently (exit {proc.returncode}); retrying once:\n"
              f"{output[-3000:]}", file=sys.stderr)
    raise AssertionError("unreachable")


def _env(corpus: Path, tmp_path: Path, **extra: object) -> dict[str, str]:
    settings = {**TINY, "training_data_source": str(corpus), "log_dir": str(tmp_path / "logs"),
                "cache_dir": str(tmp_path / "cache"), "max_new_tokens": 0,
                "checkpoint_interval": 4, "eval_interval": 4, "run_name": "ddp", **extra}
    return {k.upper(): str(v) for k, v in settings.items()}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_train_and_resume_bit_for_bit(corpus, tmp_path):
    full = torchrun(_env(corpus, tmp_path, training_steps=8,
                         checkpoint_dir=tmp_path / "full"), tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    mid = tmp_path / "full" / "ddp" / "step_0000004.pt"
    resumed = torchrun(_env(corpus, tmp_path, training_steps=8, checkpoint_path=mid,
                            resume_steps=4, checkpoint_dir=tmp_path / "resumed"), tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    a = _load(tmp_path / "full" / "ddp" / "step_0000008.pt")
    b = _load(tmp_path / "resumed" / "ddp" / "step_0000008.pt")
    assert a[fmt.WORLD_SIZE_KEY] == b[fmt.WORLD_SIZE_KEY] == 2
    assert a[fmt.MODEL_STATE_KEY].keys() == b[fmt.MODEL_STATE_KEY].keys()
    for name, tensor in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(tensor, b[fmt.MODEL_STATE_KEY][name]), name
    assert a[fmt.LAST_LOSSES_KEY] == b[fmt.LAST_LOSSES_KEY]
    # every rank's sampler is stored; the ranks draw different batches
    assert len(a[fmt.SAMPLER_STATE_KEY]) == 2
    assert not torch.equal(a[fmt.SAMPLER_STATE_KEY][0], a[fmt.SAMPLER_STATE_KEY][1])
    for sa, sb in zip(a[fmt.SAMPLER_STATE_KEY], b[fmt.SAMPLER_STATE_KEY], strict=True):
        assert torch.equal(sa, sb)
    # only rank 0 writes: one log file per launch (a retried launch leaves one more)
    logs = sorted(p.name for p in (tmp_path / "logs" / "ddp").glob("*.log"))
    assert len(logs) == full.attempts + resumed.attempts
    assert sum(name.startswith("resume-") for name in logs) == resumed.attempts
    assert "2 process(es) (DistributedDataParallel)" in full.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_resume_with_another_world_size_warns_and_continues(corpus, tmp_path, train_run):
    run = torchrun(_env(corpus, tmp_path, training_steps=4,
                        checkpoint_dir=tmp_path / "ckpt"), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    ckpt = tmp_path / "ckpt" / "ddp" / "step_0000004.pt"
    summary = train_run(checkpoint_path=str(ckpt), resume_steps=2)  # one process
    assert summary.end_step == 6
    text = summary.log_file.read_text(encoding="utf-8")
    assert "written by 2 process(es), this run has 1" in text
    assert "not a bit-exact continuation" in text
    assert _load(summary.checkpoint_dir / "step_0000006.pt")[fmt.WORLD_SIZE_KEY] == 1


@pytest.mark.unit
def test_env_info_reads_torchrun_variables():
    assert env_info({}) == DistInfo(0, 0, 1)
    info = env_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)
    with pytest.raises(UserError, match="RANK='x'"):
        env_info({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="inconsistent"):
        env_info({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.unit
def test_single_process_checkpoint_keeps_its_plain_sampler_state(tiny_checkpoint):
    ckpt = _load(tiny_checkpoint)
    assert ckpt[fmt.WORLD_SIZE_KEY] == 1
    assert isinstance(ckpt[fmt.SAMPLER_STATE_KEY], torch.Tensor)
    assert fmt.RANK_RNG_STATES_KEY not in ckpt


@pytest.fixture
def fake_group(monkeypatch) -> list[str]:
    """A process group of rank 0 whose barrier and teardown are only recorded."""
    import lmtrain.distributed as distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: calls.append("destroy"))
    return calls


@pytest.mark.unit
def test_cleanup_skips_the_barrier_when_this_rank_fails_alone(fake_group):
    from lmtrain.distributed import cleanup
    from lmtrain.errors import TrainingInterrupted

    with pytest.raises(UserError):
        try:
            raise UserError("CHECKPOINT_DIR='x': writing failed")  # rank 0 only
        finally:
            cleanup()  # the others wait in another collective: no barrier
    assert fake_group == ["destroy"]
    fake_group.clear()
    with pytest.raises(TrainingInterrupted):
        try:
            raise TrainingInterrupted(2)  # every rank stops at the same step
        finally:
            cleanup()
    cleanup()
    assert fake_group == ["barrier", "destroy", "barrier", "destroy"]


@pytest.mark.unit
def test_main_process_first_releases_the_others_when_rank_0_fails(fake_group):
    from lmtrain.distributed import main_process_first

    with pytest.raises(UserError), main_process_first():
        raise UserError("TRAINING_DATA_SOURCE='x': no such file")
    assert fake_group == ["barrier"]


@pytest.mark.unit
def test_one_cuda_index_for_many_processes_of_a_machine_is_refused(monkeypatch):
    from lmtrain.distributed import init_distributed

    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"),
                        ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"DEVICE=cuda:0 would put all 2 processes"):
        init_distributed(torch.device("cuda", 0))
