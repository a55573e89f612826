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
from lmtrain.checkpoint_format import LAST_LOSSES_KEY, MODEL_STATE_KEY, WORLD_SIZE_KEY
from lmtrain.consolidate import consolidate
from lmtrain.errors import UserError
from lmtrain.memory_estimate import check_shards_fit
from lmtrain.sharded_checkpoint import MANIFEST, ShardedRun, load_sharded_run
from lmtrain.sharding import check_fsdp_launch

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
    return dict(load_checkpoint(path)[MODEL_STATE_KEY])


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
    check_shards_fit(model, 2, torch.device("cpu"), available=16 * 2 ** 20)
    with pytest.raises(UserError, match=r"launch at least 4 processes"):
        check_shards_fit(model, 2, torch.device("cpu"), available=5 * 2 ** 20)


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
    home = Path.home()  # the test's own HOME
    shutil.copytree(sharded, home / "ck" / sharded.name)
    assert load_run(f"~/ck/{sharded.name}").step == 2  # ~ means the user's home here too
    from lmtrain.inference import load_trained_model

    with pytest.raises(UserError, match=r"sharded checkpoint .*lmtrain checkpoint consolidate"):
        load_trained_model(sharded)  # sample, eval, export: one file first
    out, path = consolidate(sharded, tmp_path / "one.pt")
    assert path == tmp_path / "one.pt" and out.step == 2
    one = load_run(path)  # today's single file, validated and sealed
    assert not isinstance(one, ShardedRun) and one.step == 2
    assert load_trained_model(path).checkpoint.step == 2
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


# --- many processes (torchrun, gloo) ---------------------------------------------------------

def _fsdp_env(corpus: Path, tmp_path: Path, **extra: object) -> dict[str, str]:
    from tests.test_distributed import _env

    return _env(corpus, tmp_path, **{"parallel": "fsdp", "run_name": "f", "grad_clip": 1.0,
                                     **extra})


def _launch(env: dict[str, str], tmp_path: Path, nproc: int = 2):
    from tests.test_distributed import torchrun

    proc = torchrun(env, tmp_path, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _consolidated(folder: Path, out: Path) -> dict:
    consolidate(folder, out)
    return load_checkpoint(out)


#: FSDP and DDP of the same model: the gradients are reduced in another order (reduce-scatter
#: vs all-reduce of buckets), so the weights drift apart by rounding only. Measured after 8
#: TINY steps on 2 CPU processes: 4e-7 (weights), 0 (eval losses to 1e-7).
FSDP_VS_DDP_WEIGHTS = 1e-5
FSDP_VS_DDP_LOSS = 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_two_processes_resume_exactly_and_reshard_to_1_and_4(corpus, tmp_path):
    _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_dir=tmp_path / "full"),
            tmp_path)
    mid = tmp_path / "full" / "f" / "step_0000004.dcp"
    assert load_run(mid).world_size == 2
    full = _consolidated(mid.parent / "step_0000008.dcp", tmp_path / "full.pt")
    for nproc in (2, 1, 4):
        out = tmp_path / f"res{nproc}"
        proc = _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_path=mid,
                                 resume_steps=4, checkpoint_dir=out), tmp_path, nproc)
        resumed = _consolidated(out / "f" / "step_0000008.dcp", tmp_path / f"res{nproc}.pt")
        assert resumed[WORLD_SIZE_KEY] == nproc
        same = all(torch.equal(t, resumed[MODEL_STATE_KEY][k])
                   for k, t in full[MODEL_STATE_KEY].items())
        if nproc == 2:  # the same world: bit for bit
            assert same
            assert resumed[LAST_LOSSES_KEY] == full[LAST_LOSSES_KEY]
        else:  # resharded: weights and AdamW state continue, batches are re-seeded
            assert not same
            assert (proc.stdout + proc.stderr).count("written by 2 process(es), this run has") == 1


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_and_ddp_agree_within_rounding(corpus, tmp_path):
    _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_dir=tmp_path / "fsdp"),
            tmp_path)
    _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_dir=tmp_path / "ddp",
                      parallel="ddp"), tmp_path)
    fsdp = _consolidated(tmp_path / "fsdp" / "f" / "step_0000008.dcp", tmp_path / "fsdp.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "f" / "step_0000008.pt")
    for name, tensor in ddp[MODEL_STATE_KEY].items():
        torch.testing.assert_close(fsdp[MODEL_STATE_KEY][name], tensor, rtol=0,
                                   atol=FSDP_VS_DDP_WEIGHTS)
    for key in ("train", "val"):
        assert abs(fsdp[LAST_LOSSES_KEY][key] - ddp[LAST_LOSSES_KEY][key]) < FSDP_VS_DDP_LOSS


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {"arch": "llama", "precision": "bf16", "grad_accum_steps": 2},
    {"model_type": "gpt2", "use_lora": 1, "precision": "bf16"},
    {"model_type": "gpt2", "grad_accum_steps": 2},
], ids=["llama-bf16-accum", "gpt2-lora-bf16", "gpt2-full-accum"])
def test_fsdp_trains_each_model_kind(corpus, tmp_path, tiny_gpt2_dir, extra):
    if extra.get("model_type") == "gpt2":
        extra = {**extra, "gpt2_model_name": str(tiny_gpt2_dir), "tokenization_method": "gpt2"}
        for name in ("n_layer", "n_head", "n_embd"):
            extra.setdefault(name, {"n_layer": 2, "n_head": 2, "n_embd": 64}[name])
    env = _fsdp_env(corpus, tmp_path, training_steps=4, checkpoint_dir=tmp_path / "c",
                    warmup_steps=8, **extra)  # a schedule the run never finishes: warned of
    proc = _launch(env, tmp_path)
    output = proc.stdout + proc.stderr
    assert "2 process(es) (FSDP2: weights, gradients and optimizer state sharded)" in output
    assert output.count("WARMUP_STEPS=8 covers every step") == 1  # said once, not per rank
    one = _consolidated(tmp_path / "c" / "f" / "step_0000004.dcp", tmp_path / "one.pt")
    run = load_run(tmp_path / "one.pt")
    assert run.step == 4 and all(torch.isfinite(t).all() for t in one[MODEL_STATE_KEY].values())
    if extra.get("use_lora"):  # only the adapter is saved, as in a single-file LoRA checkpoint
        assert all("lora_" in k for k in one[MODEL_STATE_KEY])
    assert "step 4/4: loss" in output


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_on_cuda_with_nccl_saves_resumes_and_consolidates(corpus, tmp_path):
    """On the GPU (NCCL across GPUs when there are 2; one GPU keeps the model whole, but the
    sharded checkpoint of CUDA tensors, bf16 and the resume are the same code)."""
    nproc = min(torch.cuda.device_count(), 2)
    gpu = {"device": "cuda", "precision": "bf16"}
    _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_dir=tmp_path / "full",
                      **gpu), tmp_path, nproc)
    mid = tmp_path / "full" / "f" / "step_0000004.dcp"
    _launch(_fsdp_env(corpus, tmp_path, training_steps=8, checkpoint_path=mid, resume_steps=4,
                      checkpoint_dir=tmp_path / "res", **gpu), tmp_path, nproc)
    full = _consolidated(mid.parent / "step_0000008.dcp", tmp_path / "full.pt")
    res = _consolidated(tmp_path / "res" / "f" / "step_0000008.dcp", tmp_path / "res.pt")
    for name, tensor in full[MODEL_STATE_KEY].items():  # GPU kernels: close, not bitwise
        torch.testing.assert_close(res[MODEL_STATE_KEY][name], tensor, rtol=1e-3, atol=1e-3)


@pytest.mark.integration
def test_a_stop_signal_writes_the_sharded_checkpoint_of_that_step(train_run, under_torchrun,
                                                                  tmp_path, monkeypatch):
    from lmtrain.errors import TrainingInterrupted
    from tests.test_signals import sigterm_during_step

    sigterm_during_step(monkeypatch)
    with pytest.raises(TrainingInterrupted) as err:
        train_run(**{**FSDP, "training_steps": 50, "checkpoint_interval": 100})
    assert err.value.checkpoint == tmp_path / "ckpt" / "f" / "step_0000003.dcp"
    assert load_run(err.value.checkpoint).step == 3
