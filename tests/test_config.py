"""The settings contract: sources, precedence, presets, resume overrides and bad values."""

from __future__ import annotations

import pytest

from lmtrain.config import (
    TEST_MODE_PRESET,
    TrainingConfig,
    explicit_settings,
    load_fresh,
    load_resumed,
)
from lmtrain.errors import UserError

pytestmark = pytest.mark.unit


def fresh(flags=None, env=None, config_file=None):
    values, sources = explicit_settings(flags=flags or {}, env=env or {}, config_file=config_file)
    return load_fresh(values, sources)


def test_defaults_when_nothing_is_set():
    loaded = fresh()
    assert loaded.config == TrainingConfig.from_flat()
    assert set(loaded.sources.values()) == {"default"}


def test_env_values_are_parsed_and_typed():
    loaded = fresh(env={"TRAINING_STEPS": "42", "LEARNING_RATE": "3e-4", "USE_LORA": "0",
                        "DROPOUT": "0.2", "ENABLE_CHECKPOINTS": "false", "DEVICE": "cpu"})
    cfg = loaded.config
    assert (cfg.optimization.training_steps, cfg.optimization.learning_rate, cfg.model.use_lora,
            cfg.model.dropout) == (42, 3e-4, False,
                                                                                  0.2)
    assert cfg.checkpointing.enable_checkpoints is False
    assert loaded.sources["training_steps"] == "env"


def test_empty_env_values_count_as_unset():
    assert fresh(env={"TRAINING_STEPS": ""}).config.optimization.training_steps == 800


def test_precedence_defaults_file_env_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("TRAINING_STEPS = 11\nbatch_size = 3\nn_embd = 48\n")
    loaded = fresh(flags={"training_steps": "13"}, env={"TRAINING_STEPS": "12", "BATCH_SIZE": "5"},
                   config_file=toml)
    cfg = loaded.config
    assert cfg.optimization.training_steps == 13 and loaded.sources["training_steps"] == "flag"
    assert cfg.optimization.batch_size == 5 and loaded.sources["batch_size"] == "env"
    assert cfg.model.n_embd == 48 and loaded.sources["n_embd"] == "config file"
    assert cfg.model.n_layer == 4 and loaded.sources["n_layer"] == "default"


def test_test_mode_preset_yields_to_explicit_settings():
    loaded = fresh(env={"TEST_MODE": "1", "N_EMBD": "64"})
    cfg = loaded.config
    assert cfg.optimization.training_steps == TEST_MODE_PRESET["training_steps"]
    assert loaded.sources["training_steps"] == "test_mode preset"
    assert cfg.model.n_embd == 64 and loaded.sources["n_embd"] == "env"


def test_gpt2_gets_fine_tuning_defaults():
    scratch = fresh().config
    gpt2 = fresh(env={"MODEL_TYPE": "gpt2"}).config
    lora = fresh(env={"MODEL_TYPE": "gpt2", "USE_LORA": "1"}).config
    assert gpt2.optimization.learning_rate < scratch.optimization.learning_rate
    assert gpt2.data.tokenization_method == "gpt2"
    assert lora.optimization.learning_rate > gpt2.optimization.learning_rate


@pytest.mark.parametrize(("env", "words"), [
    ({"TRAINING_STEPS": "abc"}, ["TRAINING_STEPS", "'abc'", "whole number"]),
    ({"LEARNING_RATE": "fast"}, ["LEARNING_RATE", "'fast'", "number"]),
    ({"MODEL_TYPE": "llama"}, ["MODEL_TYPE", "'llama'", "from_scratch", "gpt2"]),
    ({"BATCH_SIZE": "0"}, ["BATCH_SIZE", "'0'"]),
    ({"TRAIN_SPLIT": "1.5"}, ["TRAIN_SPLIT"]),
    ({"N_EMBD": "30", "N_HEAD": "4"}, ["N_EMBD=30", "N_HEAD=4", "divisible"]),
])
def test_bad_values_name_the_setting(env, words):
    with pytest.raises(UserError) as info:
        fresh(env=env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_config_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("trainig_steps = 3\n")
    with pytest.raises(UserError, match="unknown setting 'trainig_steps'"):
        fresh(config_file=toml)


def test_resume_takes_architecture_from_checkpoint_and_allows_training_overrides():
    saved = TrainingConfig.from_flat(n_layer=2, n_embd=32, n_head=2, learning_rate=1e-3,
                           training_steps=100).flat()
    values, sources = explicit_settings(env={"LEARNING_RATE": "5e-4", "N_LAYER": "2",
                                             "TEST_MODE": "1"})
    loaded = load_resumed(saved, values, sources)
    assert loaded.config.model.n_layer == 2 and loaded.sources["n_layer"] == "checkpoint"
    assert loaded.config.model.n_embd == 32  # TEST_MODE's preset does not apply on resume
    assert loaded.config.optimization.learning_rate == 5e-4
    assert loaded.sources["learning_rate"] == "env"
    assert any("learning_rate = 0.0005  (env)" in line for line in loaded.describe())


def test_resume_rejects_contradicting_architecture():
    saved = TrainingConfig.from_flat(n_layer=2, n_embd=32, n_head=2).flat()
    values, sources = explicit_settings(env={"N_EMBD": "64"})
    with pytest.raises(UserError, match=r"N_EMBD='64'.*contradicts the checkpoint.*N_EMBD=32"):
        load_resumed(saved, values, sources)
