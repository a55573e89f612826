"""The CUDA paths: bf16/fp16 autocast, fused AdamW, torch.compile, NCCL, sampling on the GPU.

Skipped where no GPU is present (CI); ``benchmarks/gpu_check.sh`` runs them on a lent GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from tests.conftest import ROOT, train_losses

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = {"device": "cuda", "precision": "bf16"}


def test_bf16_run_on_cuda_uses_the_gpu_and_fused_adamw(train_run):
    summary = train_run(training_steps=10, **GPU)
    ckpt = torch.load(summary.checkpoint_dir / "step_0000010.pt", map_location="cpu",
                      weights_only=True)
    assert ckpt["step"] == 10
    log_text = summary.log_file.read_text()
    assert "device cuda" in log_text and "bfloat16" in log_text
    losses = train_losses(summary.metrics_file)
    assert len(losses) == 10 and all(v == v and v < 10 for v in losses.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_on_cuda_matches_an_unbroken_run(train_run, precision):
    """On one GPU the kernels are deterministic enough that a resume tracks the unbroken run."""
    whole = train_run(training_steps=10, run_name=f"whole-{precision}", dropout=0.0,
                      device="cuda", precision=precision)
    first = train_run(training_steps=10, run_name=f"split-{precision}", dropout=0.0,
                      device="cuda", precision=precision)
    resumed = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000005.pt"),
                        resume_steps=5, run_name=f"split-{precision}-b")
    a = train_losses(whole.metrics_file, since=5)
    b = train_losses(resumed.metrics_file, since=5)
    assert sorted(b) == [6, 7, 8, 9, 10]
    for step in b:
        assert abs(a[step] - b[step]) < 2e-2, (step, a[step], b[step])


def test_compiled_model_trains_and_checkpoints_the_raw_weights(train_run):
    summary = train_run(training_steps=6, compile=True, **GPU)
    ckpt = torch.load(summary.checkpoint_dir / "step_0000006.pt", map_location="cpu",
                      weights_only=True)
    keys = list(ckpt[fmt.MODEL_STATE_KEY])
    assert keys and not any(k.startswith("_orig_mod") for k in keys)


def test_sampling_on_cuda_returns_text(train_run):
    summary = train_run(training_steps=4, max_new_tokens=40, **GPU)
    assert len(summary.sample) > 0


def test_nccl_process_group_of_one_gpu(corpus, tmp_path):
    """torchrun with DEVICE=cuda joins an NCCL group, trains and tears it down."""
    env = {**os.environ, "TEST_MODE": "1", "DEVICE": "cuda", "TRAINING_STEPS": "4",
           "TRAINING_DATA_SOURCE": str(corpus), "CHECKPOINT_DIR": str(tmp_path / "c"),
           "LOG_DIR": str(tmp_path / "l"), "CACHE_DIR": str(tmp_path / "cache"),
           "RUN_NAME": "nccl", "MAX_NEW_TOKENS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "training.py")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "c" / "nccl" / "step_0000004.pt").is_file()


def test_gpt2_lora_bf16_on_cuda(tmp_path, qa_corpus, tiny_gpt2_dir, run_dirs):
    from lmtrain.config import explicit_settings
    from lmtrain.train.session import train

    flags = {"model_type": "gpt2", "use_lora": True, "gpt2_model_name": str(tiny_gpt2_dir),
             "training_data_source": str(qa_corpus), "test_mode": True, **run_dirs, **GPU}
    values, sources = explicit_settings(flags=flags, env={})
    summary = train(values, sources)
    assert summary.final_losses["val"] > 0
