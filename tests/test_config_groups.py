"""The settings groups: one flat contract of env vars and flags, sliced into the groups each
module takes (model, data, optimization, evaluation, generation, checkpointing, run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pydantic
import pytest
import torch

from lmtrain.cli import build_parser, main
from lmtrain.config import (
    FIELDS,
    GROUP_OF,
    GROUPS,
    DataSettings,
    ModelSettings,
    OptimizationSettings,
    TrainingConfig,
)
from lmtrain.models import build_model
from lmtrain.train.optim import build_optimizer, lr_multiplier

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src" / "lmtrain"
#: The env contract the first release documented: it must keep working, flat.
CONTRACT = {
    "MODEL_TYPE", "USE_LORA", "TRAINING_DATA_SOURCE", "TRAINING_STEPS", "LEARNING_RATE",
    "BATCH_SIZE", "BLOCK_SIZE", "N_EMBD", "N_HEAD", "N_LAYER", "DROPOUT", "GPT2_MODEL_NAME",
    "TOKENIZATION_METHOD", "CUSTOM_VOCAB_SIZE", "ENABLE_CHECKPOINTS", "CHECKPOINT_INTERVAL",
    "CHECKPOINT_DIR", "LOG_DIR", "ENABLE_OUTPUT_TO_FILE", "OUTPUT_DIR", "TEST_MODE", "DEVICE",
    "CHECKPOINT_PATH", "RESUME_STEPS",
}


def test_groups_partition_the_settings_and_keep_the_flat_names():
    seen = [name for group in GROUPS.values() for name in group.model_fields]
    assert len(seen) == len(set(seen)), "a setting in two groups"
    assert set(seen) == set(FIELDS)
    assert list(TrainingConfig.model_fields) == list(GROUPS)  # the config is its groups
    assert list(FIELDS) == seen  # FIELDS (help, README table) follows the groups' order
    assert {name.upper() for name in FIELDS} >= CONTRACT
    assert GROUP_OF["n_layer"] == "model" and GROUP_OF["learning_rate"] == "optimization"
    assert GROUP_OF["checkpoint_path"] == "checkpointing" and GROUP_OF["device"] == "run"


def test_a_slice_holds_its_groups_values_and_nothing_else():
    cfg = TrainingConfig.from_flat(n_layer=2, n_head=2, n_embd=32, learning_rate=1e-3, batch_size=3)
    model = cfg.model
    assert type(model) is ModelSettings
    assert (model.n_layer, model.n_embd) == (2, 32)
    assert cfg.optimization.learning_rate == 1e-3 and cfg.optimization.batch_size == 3
    assert cfg.optimization.decay_horizon == cfg.optimization.decay_horizon
    with pytest.raises(AttributeError):
        model.learning_rate  # noqa: B018 - a model slice knows nothing of optimization
    with pytest.raises(AttributeError):
        cfg.data.n_layer  # noqa: B018
    for label, group in GROUPS.items():
        piece = getattr(cfg, label)
        assert type(piece) is group
        assert piece.model_dump() == {k: cfg.value(k) for k in group.model_fields}
        assert getattr(cfg, label) is piece  # a field, not a copy built on each access
    assert cfg.flat() == {k: cfg.value(k) for k in FIELDS}


def test_the_whole_config_is_none_of_its_groups():
    cfg = TrainingConfig.from_flat()
    for group in GROUPS.values():
        assert not isinstance(cfg, group)
    with pytest.raises(AttributeError):
        cfg.n_layer  # type: ignore[attr-defined]  # noqa: B018 - flat names live on the groups
    assert TrainingConfig.model_validate({"model": {"n_layer": 3}}).model.n_layer == 3


def test_flat_names_are_mapped_onto_the_groups_once():
    cfg = TrainingConfig.from_flat(n_layer=3, learning_rate=1e-3, device="cpu")
    assert (cfg.model.n_layer, cfg.optimization.learning_rate, cfg.run.device) == (3, 1e-3, "cpu")
    assert TrainingConfig.from_flat(**cfg.flat()) == cfg
    with pytest.raises(pydantic.ValidationError, match="n_layers"):
        TrainingConfig.from_flat(n_layers=3)


def test_settings_are_immutable_once_validated():
    cfg = TrainingConfig.from_flat()
    with pytest.raises(pydantic.ValidationError):
        cfg.model.n_layer = 9
    with pytest.raises(pydantic.ValidationError):
        cfg.model = ModelSettings(n_layer=9)
    assert cfg.replace(n_layer=9).model.n_layer == 9 and cfg.model.n_layer == 4
    with pytest.raises(pydantic.ValidationError):
        cfg.replace(n_layer=-1)  # a copy is validated too


def test_a_group_validates_on_its_own():
    with pytest.raises(pydantic.ValidationError, match="divisible by N_HEAD"):
        ModelSettings(n_embd=30, n_head=4)
    with pytest.raises(pydantic.ValidationError):
        OptimizationSettings(learning_rate=float("inf"))
    with pytest.raises(pydantic.ValidationError):
        DataSettings(n_layer=2)  # another group's setting is unknown here


def test_model_and_optimizer_are_built_from_their_slices_alone():
    cfg = TrainingConfig.from_flat(n_layer=1, n_head=2, n_embd=16, block_size=8, warmup_steps=2,
                         training_steps=10)
    model = build_model(cfg.model, 11)
    optimizer = build_optimizer(model, cfg.optimization, torch.device("cpu"))
    whole = build_model(TrainingConfig.from_flat(**cfg.flat()).model, 11)
    assert [p.shape for p in model.parameters()] == [p.shape for p in whole.parameters()]
    assert {k for g in optimizer.param_groups for k in g} >= {"lr", "weight_decay"}
    assert [lr_multiplier(s, cfg.optimization) for s in range(12)] == [
        lr_multiplier(s, cfg.optimization) for s in range(12)]


#: Modules that do one job take only the groups they need, never the whole config.
SLICED_MODULES = ("models/__init__.py", "models/gpt.py", "models/gpt2.py", "train/optim.py",
                  "data/prepare.py", "generate.py", "commands/sample.py")


@pytest.mark.parametrize("module", SLICED_MODULES)
def test_single_job_modules_do_not_take_the_whole_config(module):
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    annotations = " ".join(ast.unparse(a) for node in ast.walk(tree)
                           if isinstance(node, ast.arg) and (a := node.annotation) is not None)
    assert "TrainingConfig" not in names and "TrainingConfig" not in annotations


def test_train_help_lists_settings_by_group(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    sections = re.split(r"\n(?=\w[\w ]* settings:\n)", text)
    by_title = {s.split(":", 1)[0]: s for s in sections if " settings:" in s.split("\n", 1)[0]}
    assert list(by_title) == [f"{label} settings" for label in GROUPS]
    for label, group in GROUPS.items():
        for name in group.model_fields:
            assert "--" + name.replace("_", "-") in by_title[f"{label} settings"], name


def test_sample_settings_fall_back_to_env_then_the_run(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("TEMPERATURE", "hot")
    assert main(["sample", str(tiny_checkpoint), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TEMPERATURE='hot' is invalid") and err.count("\n") == 1
    monkeypatch.setenv("TEMPERATURE", "0.5")
    monkeypatch.setenv("MAX_NEW_TOKENS", "4")
    assert main(["sample", str(tiny_checkpoint), "--prompt", "AB"]) == 0
    assert len(capsys.readouterr().out) == len("AB") + 4 + 1
    assert main(["sample", str(tiny_checkpoint), "--prompt", "AB", "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out) == len("AB") + 2 + 1  # the flag beats the env var

