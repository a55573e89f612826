"""Speed settings: which dtype ``PRECISION`` picks, bf16 training matching fp32, exact resume
under bf16, the fp16 gradient scaler's checkpointed state, COMPILE=1 wiring, and the timing
breakdown logged at the end of a run."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain import device as device_mod
from lmtrain.checkpoint import load_checkpoint, load_run
from lmtrain.config import explicit_settings
from lmtrain.device import CPU_BF16_MIN_WIDTH, autocast_dtype, make_grad_scaler, matmul_width
from lmtrain.errors import UserError
from lmtrain.models.gpt import GPT, GPTConfig, build_from_scratch
from lmtrain.train.loop import run_training
from tests.conftest import TINY, live_run

CPU = torch.device("cpu")


def _gpt(width: int) -> GPT:
    return GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=width))


@pytest.mark.unit
def test_explicit_precisions():
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(UserError, match="PRECISION=fp16"):
        autocast_dtype("fp16", CPU)


@pytest.mark.unit
def test_auto_uses_bf16_on_a_bf16_cpu_only_for_models_wide_enough(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_supports_bf16", lambda: True)
    narrow, wide = _gpt(CPU_BF16_MIN_WIDTH // 2), _gpt(CPU_BF16_MIN_WIDTH)
    assert matmul_width(narrow) == CPU_BF16_MIN_WIDTH // 2
    assert autocast_dtype("auto", CPU, narrow) is None
    assert autocast_dtype("auto", CPU, wide) is torch.bfloat16
    bigram = build_from_scratch(GPTConfig(vocab_size=500, block_size=8, n_layer=0, n_head=1,
                                          n_embd=8))
    assert autocast_dtype("auto", CPU, bigram) is None  # an embedding table, no matmuls
    monkeypatch.setattr(device_mod, "cpu_supports_bf16", lambda: False)
    assert autocast_dtype("auto", CPU, wide) is None
    assert autocast_dtype("auto", torch.device("mps"), wide) is None


@pytest.mark.unit
def test_grad_scaler_only_for_fp16():
    assert make_grad_scaler(None, CPU) is None
    assert make_grad_scaler(torch.bfloat16, CPU) is None
    assert isinstance(make_grad_scaler(torch.float16, CPU), torch.amp.GradScaler)


@pytest.mark.integration
def test_bf16_loss_matches_fp32_after_30_steps(train_run):
    common = {"training_steps": 30, "eval_interval": 30, "eval_iters": 8,
              "checkpoint_interval": 30, "max_new_tokens": 0, "learning_rate": 3e-3}
    fp32 = train_run(precision="fp32", run_name="fp32", **common).final_losses
    bf16 = train_run(precision="bf16", run_name="bf16", **common).final_losses
    assert fp32["val"] < 3.8  # it learned something (it starts near ln(vocab) ~ 4.1)
    assert fp32["val"] != bf16["val"]  # autocast really ran in bf16
    assert abs(fp32["val"] - bf16["val"]) < 0.05
    assert abs(fp32["train"] - bf16["train"]) < 0.05


@pytest.mark.integration
def test_bf16_resume_is_exact(train_run, run_dirs):
    common = {"precision": "bf16", "training_steps": 8, "checkpoint_interval": 4,
              "max_new_tokens": 0}
    full = train_run(run_name="full", **common)
    mid = full.checkpoint_dir / "step_0000004.pt"
    resumed = train_run(checkpoint_path=str(mid), resume_steps=4, precision="bf16",
                        checkpoint_dir=str(Path(run_dirs["checkpoint_dir"]) / "again"))
    a = load_checkpoint(full.checkpoint_dir / "step_0000008.pt")[fmt.MODEL_STATE_KEY]
    b = load_checkpoint(resumed.checkpoint_dir / "step_0000008.pt")[fmt.MODEL_STATE_KEY]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _fresh_run(corpus: Path, run_dirs: dict[str, str], **overrides):
    flags = {**TINY, "training_data_source": str(corpus), **run_dirs, "max_new_tokens": 0,
             "run_name": "ctx", **overrides}
    return live_run(*explicit_settings(flags=flags, env={}))


def _with_scaler(run, scaler):
    run.parts = replace(run.parts, grad_scaler=scaler)
    return run


@pytest.mark.unit
def test_grad_scaler_state_is_checkpointed_and_restored(corpus, run_dirs):
    run = _with_scaler(_fresh_run(corpus, run_dirs, training_steps=3),
                       torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1))
    run_training(run.parts, run.progress, run.settings, run.services, 3)  # each step grows it
    path = run.plan.paths.checkpoints / "step_0000003.pt"
    ckpt = load_checkpoint(path)
    assert ckpt[fmt.GRAD_SCALER_STATE_KEY]["scale"] == 256.0 * 2**3
    again = _with_scaler(_fresh_run(corpus, run_dirs, training_steps=3),
                         torch.amp.GradScaler("cpu"))
    again.services.checkpointer.restore(again.parts, again.progress, load_run(path))
    assert again.parts.grad_scaler.get_scale() == 256.0 * 2**3
    assert again.progress.step == 3


@pytest.mark.integration
def test_compile_wraps_the_model_but_checkpoints_hold_the_raw_one(corpus, run_dirs):
    run = _fresh_run(corpus, run_dirs, compile=True)
    parts = run.parts
    assert parts.model is not parts.raw_model
    assert isinstance(parts.raw_model, GPT)
    keys = run.services.checkpointer.state_dict(parts, run.progress)[fmt.MODEL_STATE_KEY].keys()
    assert keys == parts.raw_model.state_dict().keys()
    assert not any("_orig_mod" in k for k in keys)


@pytest.mark.integration
def test_timing_breakdown_puts_time_where_it_was_spent_and_is_logged(train_run, monkeypatch):
    import lmtrain.train.checkpointing as checkpointing
    import lmtrain.train.loop as loop

    def slowed(fn, seconds):
        return lambda *a, **k: (time.sleep(seconds), fn(*a, **k))[1]

    # evaluations at steps 3 and 6, checkpoints at 3 and 6: 0.4 s + 0.6 s of known cost
    monkeypatch.setattr(loop, "estimate_loss", slowed(loop.estimate_loss, 0.2))
    monkeypatch.setattr(checkpointing, "save_checkpoint",
                        slowed(checkpointing.save_checkpoint, 0.3))
    t0 = time.perf_counter()
    summary = train_run(training_steps=6, eval_interval=3, checkpoint_interval=3,
                        max_new_tokens=0, run_name="timed")
    wall = time.perf_counter() - t0
    t = summary.timings
    parts = ("setup", "data", "train", "eval", "checkpoint", "sample")
    assert set(parts) | {"other", "total"} == set(t)
    assert t["eval"] >= 0.4 and t["checkpoint"] >= 0.6
    assert 0 < t["train"] + t["data"] <= t["total"] - 1.0  # the sleeps are not training time
    assert t["setup"] > 0
    assert sum(t[k] for k in parts) <= t["total"] <= wall  # nothing is counted twice
    last = summary.log_file.read_text(encoding="utf-8").splitlines()[-1]
    assert "time: " in last and "checkpoint" in last and "total" in last


@pytest.mark.unit
def test_auto_skips_emulated_bf16_on_older_gpus(monkeypatch):
    # torch.cuda.is_bf16_supported() says yes on a T4 / V100 by default: bf16 is emulated there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
