"""LOSS_ON=answers: only the tokens after ANSWER_PREFIX, up to and including the end of text,
are targets; everything else is -100, and runs still resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.data.dataset import IGNORE_INDEX, TokenData, answer_mask, prefix_variants
from lmtrain.data.tokenizers import CharTokenizer, GPT2Tokenizer
from lmtrain.errors import UserError
from lmtrain.train.lm_loss import compute_loss

EOT = 50256
PAIRS = [("What is the capital of France?", "Paris."), ("Who wrote Hamlet?", "Shakespeare."),
         ("How many legs has a spider?", "Eight."), ("What colour is the sky?", "Blue.")]


def reference_mask(tokens: list[int], variants: list[list[int]], eot: int) -> list[bool]:
    """The answer mask, one token at a time."""
    out, inside = [], False
    for t in range(len(tokens)):
        if any(t >= len(v) and tokens[t - len(v):t] == v for v in variants):
            inside = True
        out.append(inside)
        if tokens[t] == eot:
            inside = False
    return out


@pytest.mark.unit
def test_answer_mask_on_crafted_tokens() -> None:
    # 7 8 is the prefix, 0 the end of text
    tokens = np.array([1, 7, 8, 2, 3, 0, 7, 8, 0, 4, 7, 8, 5, 6])
    expected = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1]
    for chunk in (1, 2, 3, 5, 100):  # answers and prefixes across chunk edges
        assert answer_mask(tokens, [[7, 8]], 0, chunk=chunk).astype(int).tolist() == expected


@pytest.mark.unit
def test_answer_mask_matches_a_token_by_token_reference() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, 5000)  # 0 = end of text; prefixes [3, 4] and [5]
    variants = [[3, 4], [5]]
    expected = reference_mask(tokens.tolist(), variants, 0)
    for chunk in (7, 64, 1 << 22):
        assert answer_mask(tokens, variants, 0, chunk=chunk).tolist() == expected


@pytest.mark.integration
def test_gpt2_prefix_variants_find_the_answer_in_running_text() -> None:
    tok = GPT2Tokenizer()
    text = "".join(f"QUESTION: {q} ANSWER: {a}<|endoftext|>" for q, a in PAIRS)
    text += "ANSWER:at the start\nANSWER: after a newline"
    ids = np.array(tok.encode(text))
    mask = answer_mask(ids, prefix_variants(tok, "ANSWER:"), EOT)
    kept = tok.decode(ids[mask].tolist())
    assert kept == "".join(f" {a}<|endoftext|>" for _, a in PAIRS) + (
        "at the start\nANSWER: after a newline")


def qa_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    rows = [{"text": f"QUESTION: {q} ANSWER: {a}"} for _ in range(40) for q, a in PAIRS]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.unit
def test_batches_target_only_answers_and_inputs_stay_whole() -> None:
    tok = GPT2Tokenizer()
    ids = np.array(tok.encode("".join(f"QUESTION: {q} ANSWER: {a}<|endoftext|>"
                                      for _ in range(20) for q, a in PAIRS)), dtype=np.uint16)
    data = TokenData(ids, ids.copy())
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = data.get_batch("train", 8, 16, gen, torch.device("cpu"))
    data.mask_answers(tok, "ANSWER:")
    x, y = data.get_batch("train", 8, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(x, x_all)
    kept = y != IGNORE_INDEX
    assert torch.equal(y[kept], y_all[kept]) and 0 < kept.sum() < y.numel()
    answers = {tok.encode(f" {a}")[0] for _, a in PAIRS}
    first = [int(y[r, c]) for r, c in kept.nonzero().tolist()
             if c == 0 or not kept[r, c - 1]]
    assert first and all(t in answers for t in first if t != EOT)


@pytest.mark.unit
def test_a_batch_without_answer_tokens_has_zero_loss_not_nan() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    y = torch.full((2, 3), IGNORE_INDEX)
    loss = compute_loss(model, torch.zeros((2, 3), dtype=torch.long), y)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.unit
def test_character_vocabulary_and_missing_prefix_are_refused() -> None:
    ids = np.arange(40, dtype=np.uint16) % 5
    with pytest.raises(UserError, match=r"^LOSS_ON=answers .* character tokenizer lacks"):
        TokenData(ids, ids).mask_answers(CharTokenizer.train(["abcde"]), "ANSWER:")
    tok = GPT2Tokenizer()
    ids = np.array(tok.encode("no answers here " * 20), dtype=np.uint16)
    with pytest.raises(UserError, match=r"^ANSWER_PREFIX='A:' never occurs in the training"):
        TokenData(ids, ids).mask_answers(tok, "A:")
    answers = np.array(tok.encode("Q: x A: y<|endoftext|>"), dtype=np.uint16)
    with pytest.raises(UserError, match=r"never occurs in the validation split.*TRAIN_SPLIT"):
        TokenData(answers, ids).mask_answers(tok, "A:")


@pytest.mark.integration
def test_answers_only_training_resumes_exactly(train_run, tmp_path) -> None:
    source = str(qa_jsonl(tmp_path))
    common = dict(training_data_source=source, tokenization_method="gpt2", loss_on="answers",
                  run_name="answers")
    whole = train_run(**common, training_steps=6, checkpoint_interval=3, eval_interval=3,
                      checkpoint_dir=str(tmp_path / "a"), log_dir=str(tmp_path / "la"))
    resumed = train_run(checkpoint_path=str(whole.checkpoint_dir / "step_0000003.pt"),
                        checkpoint_dir=str(tmp_path / "b"), log_dir=str(tmp_path / "lb"),
                        training_data_source=source, run_name="answers")
    a = torch.load(whole.checkpoint_dir / "step_0000006.pt", weights_only=True)
    b = torch.load(resumed.checkpoint_dir / "step_0000006.pt", weights_only=True)
    assert b[fmt.HYPERPARAMETERS_KEY]["loss_on"] == "answers"
    for k, v in a[fmt.MODEL_STATE_KEY].items():
        assert torch.equal(v, b[fmt.MODEL_STATE_KEY][k]), k
    assert resumed.final_losses == whole.final_losses
    plain = train_run(**{**common, "loss_on": "all"}, training_steps=6, checkpoint_interval=3,
                      eval_interval=3, checkpoint_dir=str(tmp_path / "c"),
                      log_dir=str(tmp_path / "lc"))
    assert plain.final_losses["val"] != whole.final_losses["val"]  # another objective
