"""Answer accuracy: batched, cached greedy decoding gives what one-at-a-time decoding gives, and
exact-match accuracy counts what it should."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmtrain.answers import (
    AnswerReport,
    QAPair,
    answer_accuracy,
    answer_budget,
    cut_at_stop,
    default_stops,
    greedy_answers,
    greedy_ids,
    is_correct,
    naive_greedy_answers,
)
from lmtrain.config import TrainingConfig
from lmtrain.data.tokenizers import CharTokenizer
from lmtrain.errors import UserError
from lmtrain.models.gpt import GPT, BigramLM, GPTConfig
from tests.conftest import save_tiny_gpt2

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
CHARS = "abcdefghijklmnopqrstuvwxyz :QUESTIONANSWER\n"


def prompts(n: int = 24, seed: int = 0) -> list[str]:
    """Questions of 0 to 14 letters: prompts of many lengths."""
    rng = random.Random(seed)
    return [f"QUESTION: {''.join(rng.choice('abcdefgh') for _ in range(rng.randint(0, 14)))} "
            f"ANSWER:" for _ in range(n)]


def random_gpt(arch: str, vocab: int, block_size: int = 64, seed: int = 0) -> GPT:
    """A tiny GPT with large random weights, so greedy outputs vary from prompt to prompt."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=32, arch=arch, qk_norm=arch == "llama"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_rows_give_each_rows_own_logits(arch: str) -> None:
    model = random_gpt(arch, vocab=20).eval()
    rows = [[3, 4, 5, 6, 7, 8], [9, 1], [2, 2, 2, 5]]
    width = max(map(len, rows))
    pad = torch.tensor([width - len(r) for r in rows])
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    with torch.no_grad():
        cache = model.make_kv_cache(len(rows), width + 2)
        cache.left_pad = pad
        first, _ = model(ids, kv_cache=cache)
        nxt, _ = model(torch.tensor([[4], [5], [6]]), kv_cache=cache)
        for b, row in enumerate(rows):
            alone = model(torch.tensor([[*row, 4 + b]]))
            torch.testing.assert_close(first[b, -1], alone[0, len(row) - 1])
            torch.testing.assert_close(nxt[b, -1], alone[0, -1])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_greedy_equals_one_at_a_time_for_the_from_scratch_gpt(arch, batch_size) -> None:
    tok = CharTokenizer(CHARS)
    model = random_gpt(arch, tok.vocab_size, block_size=40)
    qs = [*prompts(), "", "QUESTION: " + "abcdefgh" * 5 + " ANSWER:"]  # empty; beyond the window
    got = greedy_answers(model, tok, qs, 10, device=CPU, block_size=40, batch_size=batch_size,
                         stops=())
    assert got == naive_greedy_answers(model, tok, qs, 10, device=CPU, block_size=40, stops=())
    assert got == naive_greedy_answers(model, tok, qs, 10, device=CPU, block_size=40, stops=(),
                                       use_cache=True)
    assert len(set(got)) > len(qs) // 2  # the outputs differ: the comparison means something
    assert all(len(a) == 10 for a in got)  # no stop: the whole budget


@pytest.mark.parametrize("use_lora", [False, True])
def test_batched_greedy_equals_one_at_a_time_for_gpt2(tmp_path: Path, use_lora: bool) -> None:
    from lmtrain.models import build_model
    from lmtrain.models.gpt2 import gpt2_tokenizer

    folder = save_tiny_gpt2(tmp_path / "gpt2", n_embd=32)
    cfg = TrainingConfig(model_type="gpt2", gpt2_model_name=str(folder), use_lora=use_lora,
                         tokenization_method="gpt2", block_size=32, n_layer=2, n_head=2,
                         n_embd=32)
    tok = gpt2_tokenizer(cfg.model, cfg.data)
    model = build_model(cfg.model, tok.vocab_size).train()  # lmtrain's loading path (+ peft)
    qs = [*prompts(12), "", "QUESTION: " + "abcdefgh " * 8 + "ANSWER:"]  # the last: > 32 tokens
    got = greedy_answers(model, tok, qs, 6, device=CPU, block_size=32, batch_size=5, stops=())
    assert got == naive_greedy_answers(model, tok, qs, 6, device=CPU, block_size=32, stops=())
    assert got == naive_greedy_answers(model, tok, qs, 6, device=CPU, block_size=32, stops=(),
                                       use_cache=True)
    assert len(set(got)) > 1
    assert model.training  # put back as it was


def test_accuracy_is_exact_against_known_answers() -> None:
    """Half the expected answers are the model's own, half are not: exactly 50%."""
    tok = CharTokenizer(CHARS)
    model = random_gpt("llama", tok.vocab_size)
    qs = prompts(20)
    own = naive_greedy_answers(model, tok, qs, 6, device=CPU, block_size=64, stops=())
    pairs = [QAPair(q, f"  {a} " if i % 2 else "zz")
             for i, (q, a) in enumerate(zip(qs, own, strict=True))]
    report = answer_accuracy(model, tok, pairs, device=CPU, block_size=64, batch_size=7,
                             max_new_tokens=6, stops=(), examples=3, progress=False)
    assert (report.correct, report.total, report.accuracy) == (10, 20, 0.5)
    assert report.percent == 50.0 and report.summary() == "answer accuracy 50.0% (10/20)"
    assert [w.prompt for w in report.wrong] == [qs[0], qs[2], qs[4]]
    assert [(w.expected, w.got) for w in report.wrong] == [("zz", own[i].strip())
                                                          for i in (0, 2, 4)]
    assert report.metrics() == {"answer_accuracy": 0.5, "answers_correct": 10,
                                "answers_total": 20}
    assert report.answers == [a.strip() for a in own]


def bigram_stub(tok: CharTokenizer, follows: dict[str, str]) -> BigramLM:
    """A bigram model that deterministically writes ``follows[c]`` after ``c`` (else newline)."""
    model = BigramLM(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=0, n_head=1,
                               n_embd=1))
    with torch.no_grad():
        table = model.token_embedding_table.weight
        table.zero_()
        newline = tok.encode("\n")[0]
        table[:, newline] = 1.0
        for c, nxt in follows.items():
            table[tok.encode(c)[0], tok.encode(nxt)[0]] = 5.0
    return model


def test_stub_answers_stop_at_the_newline_budget_and_strip() -> None:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz =\n")
    # "=" -> " " -> "a" -> "b" -> newline; "x" -> "y" -> "y"...: runs on past any answer
    model = bigram_stub(tok, {"=": " ", " ": "a", "a": "b", "x": "y", "y": "y", "z": "\n"})
    pairs = [QAPair("q =", "ab"),  # correct, after a leading space
             QAPair("longer question =", " ab "),  # another length; surrounding space ignored
             QAPair("x", "y"),  # "yyyyy": runs on, wrong
             QAPair("z", ""),  # an empty answer, given at once: correct
             QAPair("c =", "abc")]  # wrong
    report = answer_accuracy(model, tok, pairs, device=CPU, block_size=16, progress=False)
    assert (report.correct, report.total) == (3, 5)
    assert report.max_new_tokens == 3 + 4  # the longest answer, "abc", plus the margin
    assert [(w.expected, w.got) for w in report.wrong] == [("y", "yyyyyyy"), ("abc", "ab")]
    texts = greedy_answers(model, tok, ["q ="], 10, device=CPU, block_size=16)
    assert texts == [" ab"]  # cut before the newline


def test_progress_callable_counts_every_question() -> None:
    tok = CharTokenizer(CHARS)
    model = random_gpt("gpt2", tok.vocab_size)
    seen: list[tuple[int, int]] = []
    pairs = [QAPair(q, "a") for q in prompts(9)]
    report = answer_accuracy(model, tok, pairs, device=CPU, block_size=64, batch_size=4,
                             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 9), (8, 9), (9, 9)]
    assert isinstance(report, AnswerReport) and report.total == 9


def test_no_questions_and_no_budget() -> None:
    tok = CharTokenizer(CHARS)
    model = random_gpt("gpt2", tok.vocab_size)
    report = answer_accuracy(model, tok, [], device=CPU, block_size=64, progress=False)
    assert (report.correct, report.total, report.accuracy) == (0, 0, 0.0)
    assert greedy_ids(model, [[1, 2]], 0, device=CPU, block_size=64) == [[]]
    with pytest.raises(ValueError, match="at least one id"):
        greedy_ids(model, [[]], 3, device=CPU, block_size=64)


def test_a_question_outside_the_vocabulary_is_one_clear_error() -> None:
    tok = CharTokenizer(CHARS)
    model = random_gpt("gpt2", tok.vocab_size)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        answer_accuracy(model, tok, [QAPair("QUESTION: Ä ANSWER:", "a")], device=CPU,
                        block_size=64, progress=False)


def test_answer_helpers() -> None:
    assert is_correct(" cba\n", "cba") and not is_correct("cba", "cb a")
    assert cut_at_stop(" cba\nQUESTION", ["\n"]) == (" cba", True)
    assert cut_at_stop("\n cba\n\nx", ["\n"]) == ("\n cba", True)  # leading newlines stay
    assert cut_at_stop("cba", ["\n"]) == ("cba", False)
    assert default_stops(["a", " b\n"]) == ("\n",)
    assert default_stops(["a", "line one\nline two"]) == ("\n\n",)
    tok = CharTokenizer(CHARS)
    assert answer_budget(tok, ["abc", " abcdef ", ""]) == 6 + 4
    assert answer_budget(tok, ["ÄÖ"], margin=1) == 3  # unknown characters: one token each
    assert QAPair.from_text("QUESTION: reverse abc ANSWER: cba") == QAPair(
        "QUESTION: reverse abc ANSWER:", "cba")
    assert QAPair.from_text("no prefix here") is None
