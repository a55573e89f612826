"""Question/answer records: the three formats, the template, the answer mask their structure
gives, the split by records, and one clear line for a malformed record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.config import TrainingConfig
from lmtrain.data.prepare import load_token_data, open_streams
from lmtrain.data.qa_format import (
    QATemplate,
    RecordError,
    detect_format,
    encode_records,
    record_turns,
)
from lmtrain.data.qa_source import RecordStream, source_format
from lmtrain.data.tokenizers import EOT_TEXT, CharTokenizer, GPT2Tokenizer
from lmtrain.errors import UserError
from tests.conftest import TINY, write_jsonl

DEFAULT = QATemplate("QUESTION: {question} ANSWER: {answer}")
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def qa_records(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"question": f"what is {i} plus 1?", "answer": str(i + 1)}
            for i in range(start, start + n)]


# ------------------------------------------------------------------ formats and template


@pytest.mark.unit
@pytest.mark.parametrize(("record", "text", "answers"), [
    ({"question": "  What is 2+2? ", "answer": "4\n"},
     "QUESTION: What is 2+2? ANSWER: 4\n\n", [" 4\n\n"]),
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
     "QUESTION: Add the numbers.\n2 and 2 ANSWER: 4\n\n", [" 4\n\n"]),
    ({"instruction": "Say yes.", "input": "", "output": "yes"},
     "QUESTION: Say yes. ANSWER: yes\n\n", [" yes\n\n"]),
    ({"instruction": "Say no.", "output": "no"}, "QUESTION: Say no. ANSWER: no\n\n", [" no\n\n"]),
    (CHAT, "QUESTION: Be brief.\nHi ANSWER: Hello\n\nQUESTION: 2+2? ANSWER: 4\n\n",
     [" Hello\n\n", " 4\n\n"]),
])
def test_each_format_renders_and_its_mask_covers_the_answers(record, text, answers) -> None:
    turns = record_turns(record, detect_format(record))
    tokenizer = CharTokenizer(text)
    ids, mask, lengths = encode_records(tokenizer, DEFAULT, [turns], tokenizer.encode("\n\n"))
    assert tokenizer.decode(ids.tolist()) == text and lengths.tolist() == [len(text)]
    expected = np.zeros(len(text), dtype=bool)  # token by token: one token per character here
    for answer in answers:
        at = text.index(answer)
        expected[at:at + len(answer)] = True
    assert mask.tolist() == expected.tolist()


@pytest.mark.unit
def test_the_mask_comes_from_the_structure_not_from_a_prefix_search() -> None:
    """An answer that itself says ANSWER: is one answer; a question that says it is no answer."""
    turns = [("what follows ANSWER: here?", "ANSWER: 42")]
    tokenizer = CharTokenizer(DEFAULT.render(turns, "\n\n"))
    ids, mask, _ = encode_records(tokenizer, DEFAULT, [turns], tokenizer.encode("\n\n"))
    assert tokenizer.decode(ids[mask].tolist()) == " ANSWER: 42\n\n"


@pytest.mark.unit
def test_gpt2_ids_of_the_parts_are_the_ids_of_the_whole_text() -> None:
    """Prompts and answers are encoded apart, yet a prompt has the ids it has alone: what the
    model is asked at evaluation is what it trained on."""
    tok = GPT2Tokenizer()
    records = [record_turns(r, detect_format(r)) for r in [
        *qa_records(3), CHAT, {"instruction": "Translate.", "input": "chat", "output": "cat"}]]
    ids, mask, _ = encode_records(tok, DEFAULT, records, [tok.eot_id])
    whole = "".join(DEFAULT.render(turns, EOT_TEXT) for turns in records)
    assert ids.tolist() == tok.encode(whole)
    assert tok.decode(ids[mask].tolist()) == "".join(
        f" {answer}{EOT_TEXT}" for turns in records for _, answer in turns)
    chat_ids, _, _ = encode_records(tok, DEFAULT, [records[3]], [tok.eot_id])
    for question in DEFAULT.questions(records[3], EOT_TEXT):  # the second holds the first turn
        prompt_ids = tok.encode(question.prompt)
        answer_ids = [*tok.encode(" " + question.answer), tok.eot_id]
        assert chat_ids.tolist()[:len(prompt_ids) + len(answer_ids)] == prompt_ids + answer_ids


@pytest.mark.unit
@pytest.mark.parametrize(("template", "prompt", "answer"), [
    ("Q: {question}\nA: {answer}", "Q: x?\nA:", " y"),
    ("### Question\n{question}\n### Answer\n{answer}\n", "### Question\nx?\n### Answer", "\ny\n"),
    ("{question} => {answer}", "x? =>", " y"),
])
def test_a_template_splits_prompt_and_answer(template, prompt, answer) -> None:
    t = QATemplate(template)
    assert (t.prompt("x?"), t.answer("x?", "y")) == (prompt, answer)
    assert t.render([("x?", "y")], "<eot>") == prompt + answer + "<eot>"


@pytest.mark.unit
def test_chat_questions_carry_the_conversation_so_far() -> None:
    questions = DEFAULT.questions(record_turns(CHAT, "chat"), EOT_TEXT)
    assert [q.answer for q in questions] == ["Hello", "4"]
    assert questions[0].prompt == "QUESTION: Be brief.\nHi ANSWER:"
    assert questions[1].prompt == (f"QUESTION: Be brief.\nHi ANSWER: Hello{EOT_TEXT}"
                                   f"QUESTION: 2+2? ANSWER:")


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["no fields", "{answer} {question}", "{question}",
                                 "{question} {answer} {answer}"])
def test_a_template_without_its_fields_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"must hold \{question\} once, then \{answer\} once"):
        TrainingConfig.from_flat(qa_template=bad)


@pytest.mark.unit
def test_formats_are_told_apart_by_their_fields(tmp_path) -> None:
    assert detect_format({"messages": [], "question": "q", "answer": "a"}) == "chat"
    assert detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_format({"question": "q", "answer": "a", "id": 3}) == "qa"
    assert detect_format({"text": "t", "question": "q"}) == "text"
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_records(2))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    assert source_format("auto", [qa]) == "qa" and source_format("auto", [text]) == "text"
    assert source_format("alpaca", [qa]) == "alpaca"  # forced: then checked record by record
    assert source_format("auto", [tmp_path / "plain.txt"]) == "text"


@pytest.mark.unit
def test_parquet_columns_are_records(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"instruction": ["Say hi.", "Add."], "input": [None, "1 1"],
                             "output": ["hi", "2"]}), path)
    cfg = TrainingConfig.from_flat(training_data_source=str(path))
    train, val = open_streams(cfg.data)
    assert isinstance(train, RecordStream) and train.format == "alpaca" and val is None
    assert list(train.records()) == [[("Say hi.", "hi")], [("Add.\n1 1", "2")]]


# ------------------------------------------------------------------ malformed records


@pytest.mark.unit
@pytest.mark.parametrize(("fmt", "record", "problem"), [
    ("qa", {"question": "q"}, "field 'answer' is missing"),
    ("qa", {"question": "q", "answer": 4}, "field 'answer' is a number, not text"),
    ("qa", {"question": "q", "answer": "  "}, "field 'answer' is empty"),
    ("qa", ["q", "a"], "the record is a list, not an object"),
    ("alpaca", {"instruction": "i", "input": 3, "output": "o"},
     "field 'input' is a number, not text"),
    ("chat", {"messages": []}, "field 'messages' is empty"),
    ("chat", {"messages": "hi"}, "field 'messages' is text, not a list of turns"),
    ("chat", {"messages": [{"role": "assistant", "content": "a"}]},
     r"messages\[0\] is an assistant turn before any user turn"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     r"messages\[1\].role is 'bot', not one of system, user, assistant"),
    ("chat", {"messages": [{"role": "user"}]}, r"messages\[0\].content is missing"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                              "content": "a"},
                           {"role": "user", "content": "q2"}]},
     "the last user turn of 'messages' has no assistant turn after it"),
    ("chat", {"messages": [{"role": "system", "content": "s"}]},
     "field 'messages' has no user turn"),
])
def test_a_malformed_record_names_the_field(fmt, record, problem) -> None:
    with pytest.raises(RecordError, match=problem):
        record_turns(record, fmt)


def _train(tmp_path: Path, source: Path, *extra: str) -> int:
    flags = {**TINY, "training_steps": 2, "block_size": 8, "max_new_tokens": 0,
             "checkpoint_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
             "cache_dir": str(tmp_path / "cache")}
    argv = ["train", "--data", str(source), *extra]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return main(argv)


@pytest.mark.integration
@pytest.mark.parametrize(("line", "problem"), [
    ('{"question": "q", "answer": ', "line 3 is not JSON"),
    ('{"question": "q"}', "line 3: field 'answer' is missing"),
    ('{"question": "q", "answer": ["a"]}', "line 3: field 'answer' is a list, not text"),
    ('{"messages": []}', "line 3: field 'question' is missing"),  # line 1 made it qa
])
def test_the_cli_stops_on_a_malformed_record_with_one_line(tmp_path, capsys, line, problem):
    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps(qa_records(1)[0]) + "\n\n" + line + "\n", encoding="utf-8")
    assert _train(tmp_path, source) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: TRAINING_DATA_SOURCE: {source} {problem}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("*.pt")) and not list((tmp_path / "cache").glob("*.bin"))


@pytest.mark.integration
def test_chat_errors_name_the_turn_and_tables_name_the_row(tmp_path, capsys):
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT, {"messages": [
        {"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}]}])
    assert _train(tmp_path, source) == 2
    err = capsys.readouterr().err
    assert err == (f"error: TRAINING_DATA_SOURCE: {source} line 2: messages[0] is an assistant "
                   f"turn before any user turn (chat records hold messages)\n")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["a", "b", "c"], "answer": ["1", None, "3"]}), table)
    assert _train(tmp_path, table) == 2
    assert capsys.readouterr().err.startswith(
        f"error: TRAINING_DATA_SOURCE: {table} row 2: field 'answer' is null, not text")
    assert _train(tmp_path, table, "--data-format", "chat") == 2
    assert "has no column 'messages' (it has question, answer)" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.unit
def test_a_record_format_refuses_plain_text_files(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("QUESTION: q ANSWER: a\n", encoding="utf-8")
    cfg = TrainingConfig.from_flat(training_data_source=str(tmp_path / "notes.txt"),
                                   data_format="qa")
    with pytest.raises(UserError, match=r"notes.txt is not a .jsonl, .parquet or .arrow file"):
        open_streams(cfg.data)


# ------------------------------------------------------------------ split, mask, cache


def _data(tmp_path: Path, source: Path, **settings: Any):
    cfg = TrainingConfig.from_flat(training_data_source=str(source),
                                   cache_dir=str(tmp_path / "cache"), **settings)
    return load_token_data(cfg.data, block_size=8)


@pytest.mark.unit
def test_the_split_is_by_records_and_held_out_questions_were_never_trained_on(tmp_path):
    records = qa_records(40)
    records[36] = dict(records[3])  # a validation record that repeats a training question
    source = write_jsonl(tmp_path / "qa.jsonl", records)
    tokenizer, data = _data(tmp_path, source, train_split=0.9)
    train_text = tokenizer.decode(data.train.tolist())
    val_text = tokenizer.decode(data.val.tolist())
    assert train_text == "".join(DEFAULT.render(record_turns(r, "qa"), "\n\n")
                                 for r in records[:36])
    assert val_text.startswith("QUESTION: what is 3 plus 1?")  # the cut falls between records
    held = data.held_out.get("\n\n")
    assert held.seen == 1 and [q.answer for q in held.questions] == ["38", "39", "40"]
    for question in held.questions:
        assert question.prompt + " " not in train_text and question.prompt in val_text
    assert tokenizer.decode(data.val[data.val_mask].tolist()) == "".join(
        f" {r['answer']}\n\n" for r in records[36:])


@pytest.mark.unit
def test_loss_on_auto_trains_on_answers_of_records_only(tmp_path, corpus):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    _, data = _data(tmp_path, source)
    assert data.train_mask is not None and data.val_mask is not None
    _, everything = _data(tmp_path, source, loss_on="all")
    assert everything.train_mask is None and everything.held_out is not None
    _, text = _data(tmp_path, corpus)
    assert text.train_mask is None and text.held_out is None


@pytest.mark.unit
def test_the_cache_key_holds_the_format_and_the_template(tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    tok_a, a = _data(tmp_path, source)
    tok_b, b = _data(tmp_path, source, qa_template="Q: {question}\nA: {answer}")
    assert tok_b.decode(b.train[:40].tolist()).startswith("Q: what is 0 plus 1?\nA: 1\n\nQ:")
    assert tok_a.decode(a.train[:40].tolist()).startswith("QUESTION: what is 0 plus 1? ANSWER")
    _, again = _data(tmp_path, source)
    assert np.array_equal(np.asarray(again.train), np.asarray(a.train))
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2
    assert len(list((tmp_path / "cache").glob("*.mask"))) == 2


@pytest.mark.unit
def test_too_few_records_to_split_is_one_line(tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records(9))
    with pytest.raises(UserError, match=r"its 9 records cannot be split .* TRAIN_SPLIT=0.1 "
                                        r"\(the first 0 train"):
        _data(tmp_path, source, train_split=0.1)


@pytest.mark.unit
def test_a_dataset_validation_split_holds_the_held_out_questions(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, records in (("train", qa_records(30)), ("validation", qa_records(8, 100))):
        columns = {k: [r[k] for r in records] for k in ("question", "answer")}
        pq.write_table(pa.table(columns), folder / f"{name}-00000.parquet")
    tokenizer, data = _data(tmp_path, folder)
    assert tokenizer.decode(data.val[:40].tolist()).startswith("QUESTION: what is 100 plus 1?")
    held = data.held_out.get("\n\n")
    assert [q.answer for q in held.questions] == [str(i + 1) for i in range(100, 108)]


@pytest.mark.integration
def test_training_py_stops_on_a_malformed_record_without_a_traceback(tmp_path):
    from tests.conftest import ROOT, run_entrypoint, tiny_env

    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps(qa_records(1)[0]) + '\n{"question": "q", "answer": 7}\n',
                      encoding="utf-8")
    env = tiny_env(TRAINING_DATA_SOURCE=str(source), CHECKPOINT_DIR=str(tmp_path / "ckpt"),
                   LOG_DIR=str(tmp_path / "logs"), CACHE_DIR=str(tmp_path / "cache"),
                   TRAINING_STEPS=2)
    done = run_entrypoint([str(ROOT / "training.py")], env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"error: TRAINING_DATA_SOURCE: {source} line 2: field 'answer' is "
                           f"a number, not text (qa records hold question, answer)\n")
    assert not list(tmp_path.rglob("*.pt"))
