"""PARALLEL=fsdp and its sharded checkpoints.

In-process tests run one process "under torchrun" (its variable set, no process group): the
model stays whole but every checkpoint is a sharded DCP folder, so the format, its checks and
its consolidation are tested fast. The torchrun tests (marked ``slow``) shard for real over 2
and 4 gloo processes; a launch that dies of a transient gloo abort is retried once (see
``tests.test_distributed.torchrun``).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint import load_checkpoint, load_run
from lmtrain.consolidate import consolidate
from lmtrain.errors import UserError
from lmtrain.sharded_checkpoint import MANIFEST, ShardedRun, load_sharded_run
from lmtrain.sharding import check_fits, check_fsdp_launch

FSDP = {"parallel": "fsdp", "training_steps": 4, "eval_interval": 2, "checkpoint_interval": 2,
        "max_new_tokens": 0, "run_name": "f", "grad_clip": 1.0}


@pytest.fixture
def under_torchrun(monkeypatch) -> None:
    """This process looks launched by torchrun, alone (world size 1)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sharded(train_run, under_torchrun) -> Path:
    """The step 2 sharded checkpoint of a 4-step one-process FSDP run."""
    summary = train_run(**FSDP)
    return summary.checkpoint_dir / "step_0000002.dcp"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(path)["model_state_dict"])


@pytest.mark.unit
def test_fsdp_needs_torchrun_and_adamw():
    check_fsdp_launch("ddp", "muon", {})  # nothing to check
    with pytest.raises(UserError, match=r"PARALLEL=fsdp .* needs torchrun: launch with"):
        check_fsdp_launch("fsdp", "adamw", {})
    with pytest.raises(UserError, match="OPTIMIZER=adamw"):
        check_fsdp_launch("fsdp", "muon", {"TORCHELASTIC_RUN_ID": "x"})
    check_fsdp_launch("fsdp", "adamw", {"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.unit
def test_a_world_size_that_cannot_hold_the_model_is_one_line():
    model = torch.nn.Linear(1000, 1000)  # ~1M parameters: 16 MB of weights+grads+AdamW
    check_fits(model, 2, torch.device("cpu"), available=16 * 2 ** 20)
    with pytest.raises(UserError, match=r"launch at least 4 processes"):
        check_fits(model, 2, torch.device("cpu"), available=5 * 2 ** 20)


@pytest.mark.integration
def test_fsdp_without_torchrun_is_one_line(train_run, monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="needs torchrun"):
        train_run(**FSDP)


@pytest.mark.integration
def test_sharded_checkpoint_is_a_sealed_folder_that_consolidates(sharded, tmp_path):
    folder = sharded.parent
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".lock")) == [
        "step_0000002.dcp", "step_0000004.dcp"]
    files = json.loads((sharded / MANIFEST).read_text())["files"]
    assert ".metadata" in files and "run.pt" in files and any(
        name.endswith(".distcp") for name in files)
    run = load_run(sharded)
    assert isinstance(run, ShardedRun) and run.step == 2
    out, path = consolidate(sharded, tmp_path / "one.pt")
    assert path == tmp_path / "one.pt" and out.step == 2
    one = load_run(path)  # today's single file, validated and sealed
    assert not isinstance(one, ShardedRun) and one.step == 2
    assert one.optimizer_state["state"]  # AdamW's moments came along
    with pytest.raises(UserError, match="exists; nothing was replaced"):
        consolidate(sharded, tmp_path / "one.pt")


@pytest.mark.integration
def test_fsdp_resume_at_the_same_world_size_is_bit_exact(sharded, train_run, tmp_path):
    resumed = train_run(**{**FSDP, "checkpoint_path": str(sharded), "resume_steps": 2,
                           "checkpoint_dir": str(tmp_path / "resumed")})
    assert resumed.end_step == 4
    a, _ = consolidate(sharded.parent / "step_0000004.dcp", tmp_path / "a.pt")
    b, _ = consolidate(resumed.checkpoint_dir / "step_0000004.dcp", tmp_path / "b.pt")
    wa, wb = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert a.last_losses == b.last_losses


@pytest.mark.integration
def test_a_missing_or_altered_shard_is_refused_and_kept(sharded, tmp_path):
    shard = next(sharded.glob("*.distcp"))
    damaged = tmp_path / "damaged.dcp"
    shutil.copytree(sharded, damaged)
    (damaged / shard.name).unlink()
    with pytest.raises(UserError, match=r"incomplete: shard file\(s\) __0_0.distcp are missing"):
        load_run(damaged)
    shutil.copy(shard, damaged / shard.name)
    data = bytearray((damaged / shard.name).read_bytes())
    data[-10] ^= 0xFF
    (damaged / shard.name).write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt: shard file"):
        load_run(damaged)
    assert (damaged / shard.name).read_bytes() == bytes(data)  # nothing deleted or rewritten
    load_run(sharded)  # the original is intact


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))  # type: ignore[attr-defined]


@pytest.mark.integration
def test_crafted_dcp_metadata_is_refused_without_running_it(sharded, tmp_path):
    crafted = tmp_path / "crafted.dcp"
    shutil.copytree(sharded, crafted)
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = str(marker)  # type: ignore[attr-defined]
    (crafted / ".metadata").write_bytes(pickle.dumps(payload))
    manifest = json.loads((crafted / MANIFEST).read_text())
    import hashlib

    manifest["files"][".metadata"] = hashlib.sha256((crafted / ".metadata").read_bytes()
                                                    ).hexdigest()
    (crafted / MANIFEST).write_text(json.dumps(manifest))  # digests right: only the pickle bad
    with pytest.raises(UserError, match=r"refused and nothing in it was run: .*refused global "
                                        r"pathlib.Path.touch"):
        load_sharded_run(crafted)
    assert not marker.exists()
    pickle.loads((crafted / ".metadata").read_bytes())  # plain pickle, as DCP reads it: runs
    assert marker.exists()


@pytest.mark.integration
def test_checkpoint_kinds_do_not_cross(sharded, train_run, tiny_checkpoint, under_torchrun,
                                       tmp_path):
    with pytest.raises(UserError, match=r"sharded checkpoint \(PARALLEL=fsdp\); resume it with "
                                        r"PARALLEL=fsdp"):
        train_run(checkpoint_path=str(sharded), resume_steps=1, run_name="d",
                  checkpoint_dir=str(tmp_path / "d"))
    with pytest.raises(UserError, match="single-file checkpoint; resume it with PARALLEL=ddp"):
        train_run(**{**FSDP, "checkpoint_path": str(tiny_checkpoint), "resume_steps": 1,
                     "checkpoint_dir": str(tmp_path / "e")})
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


@pytest.mark.integration
def test_fsdp_auto_resume_rotation_and_best(train_run, under_torchrun, run_dirs):
    first = train_run(**{**FSDP, "checkpoint_path": "auto", "keep_last_checkpoints": 1})
    kept = sorted(p.name for p in first.checkpoint_dir.glob("step_*"))
    run = load_run(first.checkpoint_dir / kept[-1])
    best = run.best_step
    assert kept == sorted({f"step_{s:07d}.dcp" for s in (4, best)})
    again = train_run(**{**FSDP, "checkpoint_path": "auto", "training_steps": 6,
                         "keep_last_checkpoints": 1})
    assert (again.start_step, again.end_step) == (4, 6)
    assert (again.checkpoint_dir / "step_0000006.dcp").is_dir()
