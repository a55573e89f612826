"""Sharp edges: typos, settings that mean nothing, values that would crash later, fast errors."""

from __future__ import annotations

import time

import pytest

from lmtrain.advice import run_warnings
from lmtrain.config import (
    TrainingConfig,
    check_settings,
    env_typos,
    explicit_settings,
    load_fresh,
    read_config_file,
)
from lmtrain.errors import UserError
from lmtrain.launch_checks import elastic_restart_warning
from tests.conftest import ROOT, run_entrypoint


@pytest.mark.unit
@pytest.mark.parametrize(("var", "suggestion"), [
    ("TRAINNG_STEPS", "TRAINING_STEPS"), ("LEARNING_RAT", "LEARNING_RATE"),
    ("LORA_RANK", "LORA_R"), ("TRAINING_STEP_COUNT", "TRAINING_STEPS"), ("SEEDS", "SEED"),
])
def test_misspelt_env_vars_get_a_did_you_mean(var, suggestion):
    (warning,) = env_typos({var: "3", "TRAINING_STEPS": "5", "PATH": "/bin", "HOME": "/root"})
    assert warning.startswith(f"{var} is not a setting")
    assert f"did you mean {suggestion}?" in warning


@pytest.mark.unit
def test_unrelated_env_vars_and_real_settings_pass_quietly():
    env = {"PATH": "/bin", "HOME": "/h", "LANG": "C", "RANK": "0", "WORLD_SIZE": "2",
           "MASTER_PORT": "1", "LOCAL_RANK": "0", "TERM": "xterm", "SHELL": "/bin/sh",
           "TRAINING_STEPS": "3", "LORA_R": "4", "lowercase_thing": "1"}
    assert env_typos(env) == []


@pytest.mark.unit
def test_a_toml_typo_is_still_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("trainng_steps = 3\n")
    with pytest.raises(UserError, match=r"unknown setting 'trainng_steps'; did you mean "
                                        r"training_steps\?"):
        read_config_file(path)


@pytest.mark.unit
@pytest.mark.parametrize(("name", "value", "words"), [
    ("learning_rate", "inf", "finite"), ("learning_rate", "nan", "finite"),
    ("dropout", "-inf", "finite"), ("min_lr_ratio", "nan", "finite"),
    ("seed", str(2**64), "less than"), ("seed", "-1", "greater than"),
    ("temperature", "1e-45", "greater than or equal to 0.001"),
])
def test_values_that_would_crash_later_are_refused_now(name, value, words):
    with pytest.raises(UserError, match=f"{name.upper()}=.*{words}"):
        load_fresh(*explicit_settings(env={name.upper(): value}))


@pytest.mark.unit
def test_largest_seed_is_accepted():
    loaded = load_fresh(*explicit_settings(env={"SEED": str(2**63 - 1)}))
    assert loaded.config.optimization.seed == 2**63 - 1


@pytest.mark.unit
def test_settings_are_checked_one_by_one_before_the_run_validates_them_together():
    # a combination that only the merged settings (or the checkpoint's N_EMBD) settle is left
    # to the run's one validation
    check_settings(*explicit_settings(env={"CHECKPOINT_PATH": "x.pt", "N_HEAD": "3"}))
    check_settings(*explicit_settings(env={"N_HEAD": "3", "N_EMBD": "10"}))
    with pytest.raises(UserError, match="N_LAYER='abc'"):
        check_settings(*explicit_settings(env={"CHECKPOINT_PATH": "x.pt", "N_LAYER": "abc"}))
    with pytest.raises(UserError, match="N_EMBD=10 must be divisible by N_HEAD=3"):
        load_fresh(*explicit_settings(env={"N_HEAD": "3", "N_EMBD": "10"}))


@pytest.mark.integration
def test_a_bad_setting_fails_before_torch_is_imported(tmp_path):
    t0 = time.monotonic()
    proc = run_entrypoint(["-X", "importtime", str(ROOT / "training.py")],
                          {"N_LAYER": "abc", "TRAINNG_STEPS": "3"}, tmp_path)
    seconds = time.monotonic() - t0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    messages = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2
    assert messages == [
        "warning: TRAINNG_STEPS is not a setting and is ignored; did you mean TRAINING_STEPS?",
        "error: N_LAYER='abc' (from env) is invalid: input should be a valid integer, unable to "
        "parse string as an integer; expected a whole number — transformer blocks (0 = bigram "
        "model)"]
    assert "torch" not in imported and "numpy" not in imported
    assert seconds < 3.0  # ~0.25 s alone; importing torch first took ~4 s


@pytest.mark.integration
def test_bad_setting_error_is_fast_through_the_cli_too(tmp_path):
    proc = run_entrypoint(["-m", "lmtrain", "train", "--learning-rate", "inf"], {}, tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: LEARNING_RATE='inf'")
    assert "Traceback" not in proc.stderr


def cfg(**values) -> TrainingConfig:
    values.setdefault("lr_decay_steps", values.get("training_steps", 4000))
    values.setdefault("warmup_steps", 5)
    return TrainingConfig.from_flat(**values)


@pytest.mark.unit
def test_resume_steps_on_a_fresh_run_is_called_ignored():
    (warning,) = run_warnings(cfg(resume_steps=50, training_steps=200), 0, resumed=False)
    assert warning.startswith("RESUME_STEPS=50 is ignored: this run starts fresh")


@pytest.mark.unit
def test_resuming_a_finished_checkpoint_says_how_to_continue():
    (warning,) = run_warnings(cfg(training_steps=30), 30, resumed=True)
    assert "at step 30" in warning and "nothing to train" in warning
    assert "RESUME_STEPS=N" in warning
    assert run_warnings(cfg(training_steps=30, resume_steps=0), 30, resumed=True) == []


@pytest.mark.unit
def test_warmup_longer_than_the_run():
    (warning,) = run_warnings(cfg(training_steps=50, warmup_steps=100), 0, resumed=False)
    assert warning.startswith("WARMUP_STEPS=100 covers every step of this run (it ends at step 50)")
    assert run_warnings(cfg(training_steps=50, warmup_steps=49), 0, resumed=False) == []
    assert run_warnings(cfg(training_steps=50, warmup_steps=100, lr_scheduler="none"), 0,
                        resumed=False) == []


@pytest.mark.unit
def test_resuming_past_the_decay_horizon_says_how_to_extend():
    c = cfg(training_steps=30, resume_steps=30, learning_rate=1e-3, min_lr_ratio=0.1)
    (warning,) = run_warnings(c, 30, resumed=True)
    assert warning.startswith("the whole resume runs past LR_DECAY_STEPS=30 at the minimum "
                              "learning rate 1.00e-04")
    assert "set LR_DECAY_STEPS=60" in warning
    (partly,) = run_warnings(cfg(training_steps=30, resume_steps=30), 20, resumed=True)
    assert partly.startswith("steps 31-50 runs past") and "LR_DECAY_STEPS=50" in partly
    extended = cfg(training_steps=30, resume_steps=30, lr_decay_steps=60)
    assert run_warnings(extended, 30, resumed=True) == []


@pytest.mark.unit
def test_a_plain_run_gets_no_warnings():
    assert run_warnings(cfg(training_steps=200, warmup_steps=10), 0, resumed=False) == []
    assert run_warnings(cfg(training_steps=200), 100, resumed=True) == []


@pytest.mark.integration
def test_session_logs_the_warnings(train_run):
    summary = train_run(training_steps=3, warmup_steps=5, max_new_tokens=0)
    assert "WARMUP_STEPS=5 covers every step of this run" in summary.log_file.read_text()


@pytest.mark.unit
@pytest.mark.parametrize(("env", "warned"), [
    ({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}, True),
    ({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),
    ({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),
    ({"TORCHELASTIC_MAX_RESTARTS": "two", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),
    ({}, False),
])
def test_elastic_restarts_over_a_shared_store_are_warned_of(env, warned):
    warning = elastic_restart_warning(env)
    assert bool(warning) is warned
    if warned:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in warning and "--max-restarts=2" in warning


@pytest.mark.integration
def test_training_py_warns_of_a_restart_that_would_share_the_store(tmp_path):
    env = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TRAINING_STEPS": "-1"}  # a bad value: the run stops at once, after the warnings
    proc = run_entrypoint([str(ROOT / "training.py")], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "warning: torchrun may restart these workers (--max-restarts=3)" in proc.stderr
    assert "TRAINING_STEPS" in proc.stderr and "Traceback" not in proc.stderr
