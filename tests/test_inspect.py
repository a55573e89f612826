"""``lmtrain inspect CKPT``: facts about a checkpoint, and what is wrong with a bad one."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import save_checkpoint
from lmtrain.checkpoint_format import FORMAT_VERSION
from lmtrain.cli import main
from lmtrain.config import GROUPS


@pytest.mark.unit
def test_inspect_shows_the_checkpoint(tiny_checkpoint, capsys):
    assert main(["inspect", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    losses = ckpt[fmt.LAST_LOSSES_KEY]
    for expected in (
        "valid           yes", "step            4 of 4 planned", "model           from_scratch",
        "n_layer=1, n_head=2, n_embd=16, block_size=16",
        f"tokenizer       character, {ckpt['vocab_size']} tokens",
        f"format version  {FORMAT_VERSION}", "run name        tiny",
        f"train {losses['train']:.4f}, val {losses['val']:.4f} (at step 4)", "KiB",
    ):
        assert expected in out


@pytest.mark.unit
def test_inspect_json(tiny_checkpoint, capsys):
    assert main(["inspect", "--json", str(tiny_checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert info["valid"] is True
    assert info["size_bytes"] == tiny_checkpoint.stat().st_size
    assert (info["step"], info["model_type"], info["run_name"]) == (4, "from_scratch", "tiny")
    assert info["format_version"] == FORMAT_VERSION
    assert info["architecture"] == {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                    "block_size": 16, "dropout": 0.1}
    assert info["optimizer"] == "adamw"
    saved = ckpt[fmt.HYPERPARAMETERS_KEY]
    flat = {k: v for group in info["settings"].values() for k, v in group.items()}
    assert flat["n_layer"] == 1 and flat["learning_rate"] == saved["learning_rate"]
    assert "checkpoint_dir" not in flat and "device" not in flat  # invocation, not the run
    assert list(info["settings"]) == [g for g in GROUPS if g in info["settings"]]
    assert info["tokenizer"] == {"kind": "character", "vocab_size": ckpt["vocab_size"]}
    assert info["last_losses"] == ckpt[fmt.LAST_LOSSES_KEY]
    assert (info["best_step"], info["best_val_loss"]) == (4, ckpt[fmt.LAST_LOSSES_KEY]["val"])
    assert info["parameters_saved"] == sum(t.numel() for t in ckpt[fmt.MODEL_STATE_KEY].values())


@pytest.mark.unit
def test_inspect_bad_files_exit_2_with_the_reason(tmp_path, tiny_checkpoint, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    future = tmp_path / "future.pt"
    save_checkpoint(future, {**torch.load(tiny_checkpoint, weights_only=True),
                             fmt.FORMAT_VERSION_KEY: FORMAT_VERSION + 5})
    cases = {text: "not a torch.save archive", truncated: "not a torch.save archive",
             future: f"format version {FORMAT_VERSION + 5}, newer",
             tmp_path / "missing.pt": "no such file"}
    for path, reason in cases.items():
        assert main(["inspect", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: CKPT={str(path)!r}") and reason in captured.err
        assert main(["inspect", "--json", str(path)]) == 2
        report = json.loads(capsys.readouterr().out)
        assert report["valid"] is False and reason in report["error"]


@pytest.mark.integration
def test_inspect_shows_the_recipe_and_every_setting_by_group(train_run, capsys):
    summary = train_run(arch="llama", qk_norm=True, optimizer="muon", muon_learning_rate=0.02,
                        training_steps=2)
    ckpt = summary.checkpoint_dir / "step_0000002.pt"
    capsys.readouterr()
    assert main(["inspect", "--settings", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "arch=llama, qk_norm=True" in out
    assert "muon (lr 0.02) + adamw (lr " in out
    model_part = out.split("\nmodel settings\n")[1].split("\n\n")[0]
    assert "  N_LAYER = 1" in model_part and "LEARNING_RATE" not in model_part
    assert "\noptimization settings\n" in out and "  MUON_LEARNING_RATE = 0.02" in out
    assert "CHECKPOINT_DIR" not in out  # where this invocation wrote is not the run
    assert main(["inspect", str(ckpt)]) == 0
    assert "model settings" not in capsys.readouterr().out  # only when asked
