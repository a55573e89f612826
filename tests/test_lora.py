"""LoRA through peft: what trains, what a checkpoint holds, and exact resume on a checked base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lmtrain import checkpoint_format as fmt
from lmtrain.config import TrainingConfig
from lmtrain.errors import UserError
from lmtrain.models import build_model, count_parameters
from lmtrain.models.lora import weights_fingerprint
from lmtrain.train.optim import build_optimizer
from tests.conftest import save_tiny_gpt2


def lora_size(base: nn.Module, r: int, targets: list[str]) -> int:
    """r * (fan_in + fan_out) summed over the target layers (nn.Linear or GPT-2's Conv1D)."""
    total = 0
    for name, module in base.named_modules():
        if name.split(".")[-1] in targets and hasattr(module, "weight"):
            total += r * sum(module.weight.shape)
    return total


def train_losses(metrics: Path, after: int) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows
            if r.get("kind") == "train" and r["step"] > after]


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["gpt2", "from_scratch"])
def test_only_adapters_train_and_the_optimizer_sees_only_them(model_type, tiny_gpt2_dir):
    settings = dict(model_type=model_type, gpt2_model_name=str(tiny_gpt2_dir), block_size=32,
                    tokenization_method="gpt2", n_layer=2, n_head=2, n_embd=32, lora_r=4)
    base = build_model(TrainingConfig.from_flat(**settings).model, 50257)
    model = build_model(TrainingConfig.from_flat(**settings, use_lora=True).model, 50257)
    trainable, total = count_parameters(model)
    expected = lora_size(base, 4, ["c_attn", "c_proj", "c_fc"])
    assert trainable == expected
    assert total == count_parameters(base)[1] + expected
    optimizer = build_optimizer(model, TrainingConfig.from_flat(**settings).optimization,
                                torch.device("cpu"))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == expected


@pytest.mark.integration
def test_fresh_lora_run_saves_a_small_adapter_checkpoint(train_run, tiny_gpt2_dir, qa_corpus):
    from transformers import GPT2LMHeadModel

    summary = train_run(model_type="gpt2", use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                        training_data_source=str(qa_corpus), training_steps=4,
                        checkpoint_interval=4)
    path = summary.checkpoint_dir / "step_0000004.pt"
    ckpt = torch.load(path, weights_only=True)
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    adapter = ckpt[fmt.MODEL_STATE_KEY]
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # it trained
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert path.stat().st_size < base_bytes / 10
    assert ckpt[fmt.LORA_BASE_KEY] == {"name": str(tiny_gpt2_dir), "resolved": str(tiny_gpt2_dir),
                                 "revision": "", "fingerprint": weights_fingerprint(base)}
    assert ckpt[fmt.HYPERPARAMETERS_KEY]["learning_rate"] == 3e-4  # the LoRA fine-tuning default
    expected = lora_size(base, 8, ["c_attn", "c_proj", "c_fc"])
    assert f"parameters: {expected:,} trainable" in summary.log_file.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("model_type", ["gpt2", "from_scratch"])
def test_lora_resume_is_exact(model_type, train_run, tmp_path, tiny_gpt2_dir, qa_corpus):
    common = dict(training_data_source=str(qa_corpus), run_name="lora")
    first = dict(model_type=model_type, use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                 tokenization_method="gpt2", dropout=0.1, lora_dropout=0.1, training_steps=6,
                 checkpoint_interval=3, eval_interval=3, **common)
    whole = train_run(**first, checkpoint_dir=str(tmp_path / "a"), log_dir=str(tmp_path / "la"))
    resumed = train_run(checkpoint_path=str(whole.checkpoint_dir / "step_0000003.pt"),
                        checkpoint_dir=str(tmp_path / "b"), log_dir=str(tmp_path / "lb"),
                        **common)
    a = torch.load(whole.checkpoint_dir / "step_0000006.pt", weights_only=True)
    b = torch.load(resumed.checkpoint_dir / "step_0000006.pt", weights_only=True)
    assert a[fmt.MODEL_STATE_KEY].keys() == b[fmt.MODEL_STATE_KEY].keys()
    for k, v in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(v, b[fmt.MODEL_STATE_KEY][k]), k
    for pa, pb in zip(a[fmt.OPTIMIZER_STATE_KEY]["state"].values(),
                      b[fmt.OPTIMIZER_STATE_KEY]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a[fmt.LORA_BASE_KEY] == b[fmt.LORA_BASE_KEY]
    logged = train_losses(whole.metrics_file, after=3)
    assert [s for s, _ in logged] == [4, 5, 6]
    assert train_losses(resumed.metrics_file, after=3) == logged
    assert resumed.final_losses == whole.final_losses


@pytest.mark.integration
def test_resume_refuses_a_changed_base(train_run, tmp_path, tiny_gpt2_dir, qa_corpus,
                                       capsys):
    from lmtrain.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    first = train_run(model_type="gpt2", use_lora=True, gpt2_model_name=str(folder),
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2)
    ckpt = first.checkpoint_dir / "step_0000002.pt"
    save_tiny_gpt2(folder, seed=1)  # other weights under the same name
    with pytest.raises(UserError, match=r"trained on base model .* fingerprint .*--base"):
        train_run(checkpoint_path=str(ckpt), training_data_source=str(qa_corpus))
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


@pytest.mark.integration
def test_from_scratch_lora_run(train_run):
    summary = train_run(use_lora=True, lora_r=2, training_steps=3, checkpoint_interval=3)
    ckpt = torch.load(summary.checkpoint_dir / "step_0000003.pt", weights_only=True)
    assert all(".lora_" in k for k in ckpt[fmt.MODEL_STATE_KEY])
    assert ckpt[fmt.LORA_BASE_KEY]["name"].startswith("from_scratch(")
    log = summary.log_file.read_text()
    trainable, total = (int(x.replace(",", "")) for x in
                        log.split("parameters: ")[1].split(" total")[0].split(" trainable / "))
    assert 0 < trainable < total / 4


@pytest.mark.unit
def test_fingerprint_follows_every_weight(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    before = weights_fingerprint(model)
    assert weights_fingerprint(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)) == before
    with torch.no_grad():
        model.transformer.h[1].ln_2.bias[3] += 1e-6
    assert weights_fingerprint(model) != before


@pytest.mark.unit
def test_unknown_lora_targets_are_named(train_run):
    with pytest.raises(UserError, match=r"^LORA_TARGETS='q_proj' matches no layer"):
        train_run(use_lora=True, lora_targets="q_proj", training_steps=1)


@pytest.mark.unit
@pytest.mark.parametrize("targets", ["c_attn,c_proj,c_fc", "token_embedding_table"])
def test_lora_on_the_bigram_model_is_refused(targets):
    config = TrainingConfig.from_flat(n_layer=0, use_lora=True, lora_targets=targets)
    with pytest.raises(UserError, match=r"^USE_LORA=1 does not apply to N_LAYER=0"):
        build_model(config.model, 50)


@pytest.mark.integration
def test_adapter_follows_its_base_from_any_working_directory(train_run, tmp_path, tiny_gpt2_dir,
                                                             qa_corpus, monkeypatch, capsys):
    """The base is recorded as given and resolved; --base / GPT2_MODEL_NAME point at a moved
    base, and the weights fingerprint decides whether it fits."""
    from lmtrain.cli import main
    from lmtrain.inference import load_trained_model

    work = tmp_path / "work"
    shutil.copytree(tiny_gpt2_dir, work / "gpt2")
    monkeypatch.chdir(work)
    first = train_run(model_type="gpt2", use_lora=True, gpt2_model_name="./gpt2",
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2, checkpoint_dir=str(tmp_path / "ckpt"))
    ckpt = first.checkpoint_dir / "step_0000002.pt"
    ref = torch.load(ckpt, weights_only=True)[fmt.LORA_BASE_KEY]
    assert (ref["name"], ref["resolved"], ref["revision"]) == (
        "./gpt2", str(work / "gpt2"), "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = model_logits_of(load_trained_model(ckpt))  # found by its absolute path
    moved = tmp_path / "moved-gpt2"
    (work / "gpt2").rename(moved)
    with pytest.raises(UserError, match=r"base model './gpt2' .* not found .*--base") as info:
        load_trained_model(ckpt)
    assert "\n" not in str(info.value)
    torch.testing.assert_close(model_logits_of(load_trained_model(ckpt, base=str(moved))),
                               expected)
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--base", str(moved), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("QUESTION: ")
    monkeypatch.setenv("GPT2_MODEL_NAME", str(moved))
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    resumed = train_run(checkpoint_path=str(ckpt), resume_steps=1, gpt2_model_name=str(moved),
                        checkpoint_dir=str(tmp_path / "ckpt2"))
    assert resumed.end_step == 3
    monkeypatch.delenv("GPT2_MODEL_NAME")
    with pytest.raises(UserError, match="not found"):
        train_run(checkpoint_path=str(ckpt), resume_steps=1)
    other = save_tiny_gpt2(tmp_path / "other", seed=5)
    with pytest.raises(UserError, match="fingerprint"):
        load_trained_model(ckpt, base=str(other))


def model_logits_of(loaded) -> torch.Tensor:
    from lmtrain.models import model_logits

    with torch.no_grad():
        return model_logits(loaded.model, torch.tensor([[464, 3290, 318, 257]]))


@pytest.mark.integration
def test_a_hub_base_is_recorded_with_its_revision(tmp_path, tiny_gpt2_dir, qa_corpus):
    from tests.conftest import run_entrypoint

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--lmtrain-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"MODEL_TYPE": "gpt2", "USE_LORA": "1", "GPT2_MODEL_NAME": "lmtrain-test/tiny-gpt2",
           "TRAINING_DATA_SOURCE": str(qa_corpus), "HF_HOME": str(tmp_path / "hf"),
           "TEST_MODE": "1", "TRAINING_STEPS": "1", "PRECISION": "fp32", "DEVICE": "cpu",
           "LOG_DIR": str(tmp_path / "logs"), "CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "RUN_NAME": "hub", "MAX_NEW_TOKENS": "0"}
    proc = run_entrypoint(["-m", "lmtrain", "train"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "ckpt" / "hub" / "step_0000001.pt"
    ref = torch.load(ckpt, weights_only=True)[fmt.LORA_BASE_KEY]
    assert (ref["name"], ref["resolved"], ref["revision"]) == (
        "lmtrain-test/tiny-gpt2", "lmtrain-test/tiny-gpt2", commit)
    (repo / "refs" / "main").write_text("f" * 40)  # the cache moved on: the revision still loads
    proc = run_entrypoint(["-m", "lmtrain", "export", str(ckpt), "--adapter",
                           str(tmp_path / "adapter")], {"HF_HOME": str(tmp_path / "hf")},
                          tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (
        "lmtrain-test/tiny-gpt2", commit)
    # a resume finds the base in the cache's snapshot folder and still records it by hub id
    env = {**env, "CHECKPOINT_PATH": str(ckpt), "RESUME_STEPS": "1", "RUN_NAME": "hub2"}
    del env["GPT2_MODEL_NAME"]
    proc = run_entrypoint(["-m", "lmtrain", "train"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = torch.load(tmp_path / "ckpt" / "hub2" / "step_0000002.pt", weights_only=True)[
        "lora_base"]
    assert (ref["name"], ref["resolved"], ref["revision"]) == (
        "lmtrain-test/tiny-gpt2", "lmtrain-test/tiny-gpt2", commit)
