"""Loss and perplexity over a whole split: `lmtrain eval` and the end-of-run report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmtrain.cli import main
from lmtrain.config import TrainingConfig
from lmtrain.models import build_model, model_logits
from lmtrain.train.perplexity import perplexity, split_loss


@pytest.mark.integration
@pytest.mark.parametrize(("n_tokens", "batch_size"), [(50, 3), (49, 1), (17, 8), (5, 2)])
def test_split_loss_scores_every_target_once(n_tokens: int, batch_size: int) -> None:
    torch.manual_seed(0)
    cfg = TrainingConfig.from_flat(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)
    model = build_model(cfg.model, 40)
    tokens = np.random.default_rng(0).integers(0, 40, n_tokens).astype(np.uint16)
    loss, n = split_loss(model, tokens, cfg.model.block_size, batch_size, torch.device("cpu"))
    assert n == n_tokens - 1
    total = 0.0  # one window at a time, summed by hand
    for start in range(0, n_tokens - 1, cfg.model.block_size):
        window = torch.from_numpy(tokens[start:start + cfg.model.block_size + 1].astype(np.int64))
        logits = model_logits(model, window[None, :-1])[0]
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
    assert loss == pytest.approx(total / (n_tokens - 1), rel=1e-5)
    assert model.training  # left as it was found


@pytest.mark.unit
def test_perplexity_is_exp_of_the_loss() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf


@pytest.mark.integration
def test_eval_scores_the_whole_validation_split(tiny_checkpoint, capsys) -> None:
    from lmtrain.data.prepare import load_token_data
    from lmtrain.inference import load_trained_model

    assert main(["eval", str(tiny_checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    loaded = load_trained_model(tiny_checkpoint)
    _, data = load_token_data(loaded.config.data, loaded.tokenizer,
                              block_size=loaded.config.model.block_size)
    assert result["tokens"] == len(data.val) - 1 and result["split"] == "val"
    expected, _ = split_loss(loaded.model, data.val, loaded.config.model.block_size, 4,
                             torch.device("cpu"))
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected))
    assert main(["eval", str(tiny_checkpoint), "--split", "train"]) == 0
    assert "train split" in capsys.readouterr().out


@pytest.mark.unit
def test_eval_on_other_data(tiny_checkpoint, tmp_path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    assert main(["eval", str(tiny_checkpoint), "--data", str(other), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == str(other) and result["tokens"] > 0
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("東京" * 200, encoding="utf-8")
    assert main(["eval", str(tiny_checkpoint), "--data", str(unknown)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.integration
def test_a_training_run_reports_val_perplexity(train_run) -> None:
    summary = train_run(training_steps=3)
    losses = summary.final_losses
    assert losses["val_perplexity"] == pytest.approx(math.exp(losses["val"]))
    assert f"val perplexity {losses['val_perplexity']:.2f}" in summary.log_file.read_text()


@pytest.mark.integration
def test_eval_reads_allow_download_as_training_does(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("ALLOW_DOWNLOAD", "maybe")
    assert main(["eval", str(tiny_checkpoint)]) == 2
    assert "ALLOW_DOWNLOAD='maybe' is invalid" in capsys.readouterr().err
    monkeypatch.setenv("ALLOW_DOWNLOAD", "off")
    assert main(["eval", str(tiny_checkpoint), "--json"]) == 0


@pytest.mark.unit
def test_split_loss_of_gpt2_equals_its_full_logits_loss(tiny_gpt2_dir) -> None:
    """GPT-2 is scored through training's chunked loss (no full logits); same value."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tokens = np.random.default_rng(0).integers(0, 50257, 70).astype(np.uint32)
    loss, n = split_loss(model, tokens, 32, 2, torch.device("cpu"))
    total = 0.0
    for start in range(0, n, 32):
        window = torch.from_numpy(tokens[start:start + 33].astype(np.int64))
        with torch.no_grad():
            logits = model(window[None, :-1]).logits[0]
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
    assert n == 69 and loss == pytest.approx(total / n, rel=1e-5)


@pytest.mark.unit
def test_split_loss_with_a_mask_scores_only_the_masked_targets() -> None:
    torch.manual_seed(0)
    cfg = TrainingConfig.from_flat(n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.0)
    model = build_model(cfg.model, 30)
    tokens = np.random.default_rng(1).integers(0, 30, 37).astype(np.uint16)
    mask = np.zeros(37, dtype=bool)
    mask[[3, 4, 9, 20, 36]] = True  # target positions; 36 lies in the shorter tail window
    loss, n = split_loss(model, tokens, cfg.model.block_size, 2, torch.device("cpu"), mask=mask)
    assert n == 5
    total = 0.0
    for start in range(0, 36, cfg.model.block_size):
        window = torch.from_numpy(tokens[start:start + cfg.model.block_size + 1].astype(np.int64))
        per_token = F.cross_entropy(model_logits(model, window[None, :-1])[0], window[1:],
                                    reduction="none")
        keep = torch.from_numpy(mask[start + 1:start + 1 + len(per_token)])
        total += per_token[keep].sum().item()
    assert loss == pytest.approx(total / 5, rel=1e-5)
    assert split_loss(model, tokens, 8, 2, torch.device("cpu"), mask=np.zeros(37, bool)) == (
        pytest.approx(math.nan, nan_ok=True), 0)


@pytest.mark.integration
def test_eval_of_an_answers_run_scores_its_answers(train_run, tmp_path, capsys) -> None:
    from lmtrain.data.prepare import load_token_data
    from lmtrain.inference import load_trained_model
    from tests.test_answers import qa_jsonl

    summary = train_run(training_data_source=str(qa_jsonl(tmp_path)),
                        tokenization_method="gpt2", loss_on="answers", training_steps=2)
    ckpt = summary.checkpoint_dir / "step_0000002.pt"
    capsys.readouterr()  # the training run's own output
    assert main(["eval", str(ckpt), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    loaded = load_trained_model(ckpt)
    _, data = load_token_data(loaded.config.data, loaded.tokenizer,
                              block_size=loaded.config.model.block_size)
    assert result["scored"] == "answers"
    assert result["tokens"] == int(data.val_mask[1:].sum()) < len(data.val) - 1
    assert main(["eval", str(ckpt)]) == 0
    assert "answer tokens (LOSS_ON=answers)" in capsys.readouterr().out


@pytest.mark.integration
def test_eval_shows_progress_in_tokens_when_asked(tiny_checkpoint, capsys) -> None:
    assert main(["eval", str(tiny_checkpoint), "--json", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert main(["eval", str(tiny_checkpoint), "--json", "--progress"]) == 0
    shown = capsys.readouterr()
    result = json.loads(shown.out)
    assert json.loads(quiet.out)["loss"] == result["loss"]
    assert "eval" in shown.err and "tok" in shown.err and "100%" in shown.err
