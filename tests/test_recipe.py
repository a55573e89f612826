"""The recipe settings: ARCH=llama and OPTIMIZER=muon through real runs, their parameter split,
learning rates, exact resume and LoRA."""

from __future__ import annotations

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.config import TrainingConfig
from lmtrain.models import build_model
from lmtrain.train.optim import CombinedOptimizer, build_optimizer, set_learning_rate
from tests.conftest import load_file as load
from tests.conftest import train_losses, whole_and_resumed


def small(**kw) -> TrainingConfig:
    return TrainingConfig.from_flat(n_layer=2, n_head=2, n_embd=16, block_size=16, **kw)


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_muon_takes_hidden_matrices_and_adamw_the_rest(arch):
    cfg = small(arch=arch, optimizer="muon")
    model = build_model(cfg.model, 40)
    opt = build_optimizer(model, cfg.optimization, torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    assert muon == {n for n in names.values()
                    if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    assert "transformer.wte.weight" in adamw
    assert ("lm_head.weight" in adamw) == (arch == "llama")  # gpt2 ties it to wte


@pytest.mark.unit
def test_each_optimizer_follows_its_own_peak_learning_rate():
    cfg = small(arch="llama", optimizer="muon", learning_rate=4e-3, muon_learning_rate=0.03,
                warmup_steps=0, training_steps=10, min_lr_ratio=0.0)
    opt = build_optimizer(build_model(cfg.model, 40), cfg.optimization, torch.device("cpu"))
    assert set_learning_rate(opt, 5, cfg.optimization) == pytest.approx(2e-3)
    assert [g["lr"] for g in opt.optimizers["adamw"].param_groups] == [pytest.approx(2e-3)] * 2
    assert opt.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(0.015)


@pytest.mark.unit
def test_combined_state_refuses_another_optimizers_state():
    cfg = small(optimizer="muon")
    model = build_model(cfg.model, 40)
    opt = build_optimizer(model, cfg.optimization, torch.device("cpu"))
    plain = build_optimizer(model, small(optimizer="adamw").optimization, torch.device("cpu"))
    with pytest.raises(ValueError, match="expected the states"):
        opt.load_state_dict(plain.state_dict())


@pytest.mark.integration
@pytest.mark.parametrize(("arch", "optimizer"),
                         [("gpt2", "muon"), ("llama", "adamw"), ("llama", "muon")])
def test_exact_resume_is_bitwise(train_run, arch, optimizer):
    """N+M steps in one go == N steps, then M resumed steps: same weights, states and losses."""
    common = dict(dropout=0.2, warmup_steps=3, lr_decay_steps=14, eval_interval=4,
                  checkpoint_interval=100, n_layer=2, arch=arch, optimizer=optimizer,
                  qk_norm=arch == "llama")
    whole, part, resumed = whole_and_resumed(train_run, **common)
    a = load(whole.checkpoint_dir / "step_0000014.pt")
    b = load(resumed.checkpoint_dir / "step_0000014.pt")
    saved = b[fmt.HYPERPARAMETERS_KEY]
    assert saved["arch"] == arch and saved["optimizer"] == optimizer
    for key, tensor in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(tensor, b[fmt.MODEL_STATE_KEY][key]), key
    if optimizer == "muon":
        assert set(a[fmt.OPTIMIZER_STATE_KEY]) == {"adamw", "muon"}
        assert a[fmt.OPTIMIZER_STATE_KEY]["muon"]["state"]  # momentum buffers are saved
    for name in a[fmt.OPTIMIZER_STATE_KEY].get("muon", {}).get("state", {}):
        assert torch.equal(a[fmt.OPTIMIZER_STATE_KEY]["muon"]["state"][name]["momentum_buffer"],
                           b[fmt.OPTIMIZER_STATE_KEY]["muon"]["state"][name]["momentum_buffer"])
    whole_losses = train_losses(whole.metrics_file)
    assert whole_losses == {**train_losses(part.metrics_file),
                            **train_losses(resumed.metrics_file, since=6)}


@pytest.mark.integration
def test_resume_refuses_another_optimizer(train_run):
    from lmtrain.errors import UserError

    first = train_run(training_steps=4, optimizer="muon")
    with pytest.raises(UserError, match=r"OPTIMIZER='adamw'.*contradicts.*OPTIMIZER='muon'"):
        train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000004.pt"),
                  resume_steps=1, optimizer="adamw")


@pytest.mark.unit
def test_a_checkpoint_without_the_recipe_settings_resumes_as_gpt2_adamw():
    from lmtrain.config import load_resumed

    saved = small().flat()
    for key in ("arch", "qk_norm", "optimizer"):
        del saved[key]
    cfg = load_resumed(saved, {}, {}).config
    assert (cfg.model.arch, cfg.model.qk_norm, cfg.optimization.optimizer) == ("gpt2", False,
                                                                               "adamw")


@pytest.mark.unit
def test_qk_norm_applies_to_llama_only():
    names = [n for n, _ in build_model(small(arch="gpt2", qk_norm=True).model,
                                       40).named_parameters()]
    assert not [n for n in names if "q_norm" in n]
    names = [n for n, _ in build_model(small(arch="llama", qk_norm=True).model,
                                       40).named_parameters()]
    assert [n for n in names if "q_norm" in n]


@pytest.mark.integration
def test_lora_on_llama_trains_only_adapters(train_run):
    summary = train_run(training_steps=4, arch="llama", use_lora=True, optimizer="muon")
    ckpt = load(summary.checkpoint_dir / "step_0000004.pt")
    keys = list(ckpt[fmt.MODEL_STATE_KEY])
    assert keys and all("lora_" in k for k in keys)
    assert any("c_fc" in k for k in keys) and any("c_attn" in k for k in keys)


@pytest.mark.unit
def test_bad_recipe_settings_are_one_line_errors():
    from lmtrain.config import explicit_settings, load_fresh
    from lmtrain.errors import UserError

    for flags, match in (({"arch": "llama", "n_embd": 18, "n_head": 2}, "even head width"),):
        values, sources = explicit_settings(flags={"arch": "gpt2", **flags}, env={})
        with pytest.raises(UserError, match=match):
            load_fresh(values, sources)


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_llama_muon_resumes_bit_for_bit(corpus, tmp_path):
    from tests.test_distributed import _env, _load, torchrun

    recipe = dict(arch="llama", optimizer="muon", qk_norm=True, training_steps=8)
    full = torchrun(_env(corpus, tmp_path, checkpoint_dir=tmp_path / "full", **recipe), tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    mid = tmp_path / "full" / "ddp" / "step_0000004.pt"
    resumed = torchrun(_env(corpus, tmp_path, checkpoint_path=mid, resume_steps=4,
                            checkpoint_dir=tmp_path / "resumed", **recipe), tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = _load(tmp_path / "full" / "ddp" / "step_0000008.pt")
    b = _load(tmp_path / "resumed" / "ddp" / "step_0000008.pt")
    assert a[fmt.WORLD_SIZE_KEY] == 2 and set(a[fmt.OPTIMIZER_STATE_KEY]) == {"adamw", "muon"}
    for name, tensor in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(tensor, b[fmt.MODEL_STATE_KEY][name]), name
