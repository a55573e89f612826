"""benchmarks/bench_qa.py: its tasks, its held-out questions, the training text as lmtrain reads
it, and a smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script

bench = load_script("benchmarks/bench_qa.py", "bench_qa")


@pytest.mark.unit
def test_tasks_answer_correctly_and_test_questions_are_unseen() -> None:
    train, test = bench.make_questions(7, 3000, {"reverse": 50, "next letter": 10,
                                                 "next number": 20})
    assert len(train) == 3000 and len(test) == 80
    assert not {q.question for q in train} & {q.question for q in test}
    assert len({q.question for q in test}) == len(test)
    for q in train + test:
        words = q.question.split()
        if q.task == "reverse":
            assert words[0] == "reverse" and q.answer == words[1][::-1]
            assert 3 <= len(q.answer) <= 8 and q.answer.islower()
        elif q.task == "next letter":
            assert ord(q.answer) == ord(words[-1]) + 1 and 3 <= len(words) - 1 <= 5
        else:
            assert int(q.answer) == int(words[-1]) + 1 <= 100
    assert {q.task for q in train} == set(bench.TASKS)
    again = bench.make_questions(7, 3000, {"reverse": 50, "next letter": 10, "next number": 20})
    assert again == (train, test)  # seeded


RECORDS = [bench.Question("reverse", f"reverse {w}", w[::-1])
           for w in ("abc", "hello", "xyzzy", "qwerty")] * 20


@pytest.mark.unit
def test_prompts_follow_the_template() -> None:
    q = bench.Question("reverse", "reverse abc", "cba")
    assert q.text() == "QUESTION: reverse abc ANSWER: cba"
    assert (q.pair().prompt, q.pair().answer) == ("QUESTION: reverse abc ANSWER:", "cba")


@pytest.mark.unit
def test_text_records_get_the_end_of_text_between_them_and_answers_masked(tmp_path: Path) -> None:
    """``--format text``: lmtrain joins .jsonl text records with the end of text (a learned
    BPE), and LOSS_ON=answers keeps exactly the answers and that end of text."""
    from lmtrain.config import TrainingConfig
    from lmtrain.data.prepare import load_token_data

    corpus = bench.write_corpus(tmp_path / "qa.jsonl", RECORDS, "text")
    cfg = TrainingConfig(training_data_source=str(corpus), tokenization_method="custom_bpe",
                         custom_vocab_size=260, loss_on="answers", cache_dir=str(tmp_path),
                         train_split=0.5)
    tok, data = load_token_data(cfg.data, block_size=16)
    ids = np.asarray(data.train)
    assert tok.decode(ids[:80].tolist()).startswith(
        "QUESTION: reverse abc ANSWER: cba<|endoftext|>QUESTION: reverse hello")
    kept = tok.decode(ids[data.train_mask].tolist())
    assert kept.startswith(" cba<|endoftext|> olleh<|endoftext|> yzzyx<|endoftext|>")
    assert int((ids == tok.eot_id).sum()) == int((ids[data.train_mask] == tok.eot_id).sum())


@pytest.mark.unit
def test_qa_records_train_on_their_answers_with_a_character_vocabulary(tmp_path: Path) -> None:
    """``--format qa`` (the default): the template renders each record, a blank line ends it,
    and LOSS_ON=auto keeps the answers and that blank line."""
    from lmtrain.config import TrainingConfig
    from lmtrain.data.prepare import load_token_data

    corpus = bench.write_corpus(tmp_path / "qa.jsonl", RECORDS)
    assert json.loads(corpus.read_text().splitlines()[0]) == {"question": "reverse abc",
                                                              "answer": "cba"}
    cfg = TrainingConfig(training_data_source=str(corpus), cache_dir=str(tmp_path),
                         train_split=0.5)
    tok, data = load_token_data(cfg.data, block_size=16)
    ids = np.asarray(data.train)
    assert tok.kind == "character"
    assert tok.decode(ids[:80].tolist()).startswith(
        "QUESTION: reverse abc ANSWER: cba\n\nQUESTION: reverse hello")
    assert tok.decode(ids[data.train_mask].tolist()).startswith(" cba\n\n olleh\n\n")


@pytest.mark.integration
def test_quick_run_writes_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bench.main(["--quick", "--recipe", "default", "--threads", "1", "--evals", "1",
                       "--out", str(tmp_path / "out"), "--plot"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| default |" in table and "first >= 90%" in table
    result = json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]
    assert result["recipe"] == "default" and len(result["points"]) == 3  # calibration: 2
    assert (tmp_path / "out" / "qa.png").is_file()
