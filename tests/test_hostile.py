"""Issue 27's traceback classes, as attacks: crafted checkpoints that pass the loader, settings
that ask for more memory than there is, paths the OS cannot take, TOML that lies about types.
Each ends in one line and exit status 2, and changes no file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.cli import main
from lmtrain.errors import UserError


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def craft(src: Path, dest: Path, sealed: bool = True, **changes: Any) -> Path:
    """A copy of checkpoint ``src`` with top-level keys (or hyperparameters, given as a dict)
    changed; sealed with a valid digest, or written as ``torch.save`` would."""
    ckpt = torch.load(src, weights_only=True)
    for key, value in changes.items():
        ckpt[key] = {**ckpt[key], **value} if key == "hyperparameters" else value
    if sealed:
        save_checkpoint(dest, ckpt)
    else:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 50_000))
        try:
            torch.save(ckpt, dest)
        finally:
            sys.setrecursionlimit(limit)
    return dest


def _weights(src: Path, change) -> dict[str, Any]:
    weights = dict(torch.load(src, weights_only=True)["model_state_dict"])
    name = next(iter(weights))
    weights[name] = change(weights[name])
    return weights


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


ATTACKS = {
    "deep settings": (lambda src: {"hyperparameters": {"prompt": _deep(10_000)}}, False,
                      "nests deeper"),
    "sparse weights": (lambda src: {"model_state_dict": _weights(src, lambda t: t.to_sparse())},
                       False, "not a dense one"),
    "meta weights": (lambda src: {"model_state_dict": _weights(src, lambda t: t.to("meta"))},
                     False, "the meta device"),
    "NaN weights": (lambda src: {"model_state_dict": _weights(src, _nan)}, True,
                    "NaN or infinite"),
    "complex weights": (lambda src: {"model_state_dict": _weights(
        src, lambda t: t.to(torch.complex64))}, False, "dtype torch.complex64"),
    "huge step": (lambda src: {"step": 2**70}, False, "beyond 64 bits"),
    "odd key": (lambda src: {"last_losses": {(1, 2): 1.0}}, False, "key of type tuple"),
    "endless sample": (lambda src: {"hyperparameters": {"max_new_tokens": 10**12}}, True,
                       "max_new_tokens"),
}


@pytest.mark.integration
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_checkpoints_are_one_line_in_every_command(attack, tiny_checkpoint, tmp_path,
                                                           capsys):
    make, sealed, expected = ATTACKS[attack]
    bad = craft(tiny_checkpoint, tmp_path / "bad.pt", sealed=sealed, **make(tiny_checkpoint))
    before = bad.read_bytes()
    for command in (["inspect", str(bad)], ["sample", str(bad), "--max-new-tokens", "3"],
                    ["export", str(bad), str(tmp_path / "hf")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert expected in err and "damaged" in err, err
    assert bad.read_bytes() == before and not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_a_checkpoint_claiming_a_huge_model_is_refused_before_allocating(tiny_checkpoint,
                                                                          tmp_path, capsys):
    big = craft(tiny_checkpoint, tmp_path / "big.pt",
                hyperparameters={"n_embd": 1_048_576, "n_head": 512})
    assert main(["sample", str(big)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's N_EMBD=1048576" in err and "TB" in err


@pytest.mark.unit
@pytest.mark.parametrize("setting, value, named", [
    ("batch_size", 300_000_000, "BATCH_SIZE=300000000"),
    ("n_embd", 1_048_576, "N_EMBD=1048576"),
])
def test_memory_is_estimated_before_allocating(setting, value, named):
    from lmtrain.config import ModelSettings
    from lmtrain.memory_estimate import check_memory

    model = ModelSettings(**({"n_embd": value, "n_head": 512} if setting == "n_embd" else {}))
    batch = value if setting == "batch_size" else 4
    with pytest.raises(UserError, match=named) as exc:
        check_memory(model, 50257, "cpu", batch)
    assert "needs about" in str(exc.value) and "of memory of this cpu" in str(exc.value)
    check_memory(ModelSettings(), 50257, "cpu", 32)  # the default run fits


@pytest.mark.integration
def test_training_with_a_batch_no_memory_holds_is_refused_before_anything_is_written(
        train_run, tmp_path):
    with pytest.raises(UserError, match=r"BATCH_SIZE=300000000.*needs about"):
        train_run(batch_size=300_000_000)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.unit
@pytest.mark.parametrize("value, expected", [
    ("a" * 300, "over the 255 a file name may have"),
    ("/x" * 2100, "over the 4095 a path may have"),
    ("~nosuchuser_lmtrain/x", "~nosuchuser_lmtrain names the home folder"),
    ("bad\0name", "nul character"),
])
@pytest.mark.parametrize("setting", ["TRAINING_DATA_SOURCE", "CHECKPOINT_PATH",
                                     "CHECKPOINT_DIR", "LOG_DIR"])
def test_paths_the_os_cannot_take_are_one_line(setting, value, expected):
    from lmtrain.config import explicit_settings, load_fresh

    values, sources = explicit_settings(env={setting: value})
    with pytest.raises(UserError, match=f"^{setting}=") as exc:
        load_fresh(values, sources)
    assert expected in str(exc.value)


@pytest.mark.unit
def test_what_is_no_file_is_told_apart(tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dir").mkdir()
    for name, said in (("fifo", "a FIFO"), ("loop", "a symlink loop"), ("dir", "a folder"),
                       ("none", "no such file")):
        assert main(["inspect", str(tmp_path / name)]) == 2
        assert said in capsys.readouterr().err
    assert main(["inspect", "~nosuchuser_lmtrain/x.pt"]) == 2
    assert "home folder of a user" in capsys.readouterr().err


@pytest.mark.unit
def test_toml_true_for_a_number_is_refused(tmp_path):
    from lmtrain.config import read_config_file

    (tmp_path / "c.toml").write_text("training_steps = true\nenable_checkpoints = false\n")
    with pytest.raises(UserError, match="training_steps = true is true/false, not a whole"):
        read_config_file(tmp_path / "c.toml")
    (tmp_path / "ok.toml").write_text("enable_checkpoints = false\n")
    assert read_config_file(tmp_path / "ok.toml") == {"enable_checkpoints": False}


@pytest.mark.unit
def test_a_lock_that_is_a_folder_is_named(tmp_path):
    from lmtrain.run_folder import LOCK_NAME, RunLock

    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(UserError, match=r"\.lock' is a folder, where lmtrain keeps"):
        RunLock(tmp_path).acquire()


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def _damage(folder: Path, how: str) -> str:
    """Damage a copy of a tiny GPT-2 folder; returns the file a message must name."""
    import pickle

    weights = folder / "model.safetensors"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return "model.safetensors"
    if how == "code in pytorch_model.bin":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Code()}))
        return "pytorch_model.bin"
    from lmtrain.data.tokenizers import gpt2_file

    (folder / "vocab.json").write_bytes(gpt2_file("encoder.json"))
    (folder / "merges.txt").write_bytes(gpt2_file("vocab.bpe"))
    if how == "invalid vocab.json":
        (folder / "vocab.json").write_text('{"a": 1,')
        return "vocab.json"
    (folder / "merges.txt").write_text("#version: 0.2\nthis is not a merge line\n\x00\x01\n")
    return "merges.txt"


@pytest.mark.integration
@pytest.mark.parametrize("how", ["truncated weights", "code in pytorch_model.bin",
                                 "invalid vocab.json", "garbage merges.txt"])
def test_a_damaged_gpt2_folder_is_one_line_naming_the_file(how, tiny_gpt2_dir, train_run,
                                                           tmp_path, capsys):
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2_dir, folder)
    name = _damage(folder, how)
    with pytest.raises(UserError) as exc:
        train_run(model_type="gpt2", gpt2_model_name=str(folder), training_steps=1)
    message = str(exc.value)
    assert message.startswith(f"GPT2_MODEL_NAME={str(folder)!r}") and name in message, message
    assert "code ran" not in capsys.readouterr().out


def _table(path: Path, rows: int = 400) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"question": [f"What is {i} plus one, my friend?" for i in range(rows)],
                      "answer": [f"It is {i + 1}, as always." for i in range(rows)],
                      "text": [f"line {i} " * 8 for i in range(rows)]})
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=50)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=50):
                w.write_batch(batch)
    return path


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    if path.suffix == ".parquet":  # garbage over the data pages in the middle
        for i in range(len(data) // 4, len(data) * 3 // 4, 7):
            data[i] = 0xFF
    else:  # a stream cut in the middle of a batch
        data = data[: len(data) * 2 // 3]
    path.write_bytes(bytes(data))


@pytest.mark.integration
@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
@pytest.mark.parametrize("fmt", ["text", "qa"])
def test_a_damaged_table_is_one_line_naming_the_file(suffix, fmt, train_run, tmp_path):
    data = _table(tmp_path / f"data{suffix}")
    _corrupt(data)
    with pytest.raises(UserError) as exc:
        train_run(training_data_source=str(data), data_format=fmt, training_steps=1)
    assert str(data) in str(exc.value), str(exc.value)


@pytest.mark.integration
def test_an_invalid_utf8_prompt_is_one_line(train_run, tmp_path, capsys):
    run = train_run(tokenization_method="custom_bpe", custom_vocab_size=300, training_steps=1)
    ckpt = str(run.checkpoint_dir / "step_0000001.pt")
    bad = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # as Python reads such argv
    assert main(["sample", ckpt, "--prompt", bad, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prompt=") and "invalid utf-8" in err and "\n" not in err


def _qa_records(path: Path, n: int = 60) -> Path:
    import json

    lines = [json.dumps({"question": f"What is {i} plus one?", "answer": f"{i + 1}."})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.integration
def test_eval_checks_templates_as_training_does(train_run, tmp_path, capsys):
    data = _qa_records(tmp_path / "qa.jsonl")
    run = train_run(training_data_source=str(data), training_steps=1)
    ckpt = str(run.checkpoint_dir / "step_0000001.pt")
    assert main(["eval", ckpt, "--answers", "--qa-template", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: QA_TEMPLATE='bad' is invalid") and "{question}" in err


@pytest.mark.integration
def test_eval_says_when_every_held_out_question_was_seen_in_training(train_run, tmp_path,
                                                                      capsys):
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": "Same?", "answer": "Yes."}) + "\n"
                            for _ in range(60)), encoding="utf-8")
    run = train_run(training_data_source=str(data), training_steps=1)
    assert main(["eval", str(run.checkpoint_dir / "step_0000001.pt"), "--answers"]) == 2
    err = capsys.readouterr().err
    assert "are also asked in its training records" in err and "every question" not in err


@pytest.mark.integration
def test_eval_follows_its_own_drop_unknown_chars_advice(train_run, tmp_path, corpus_text,
                                                         capsys):
    run = train_run(training_steps=1)
    ckpt = str(run.checkpoint_dir / "step_0000001.pt")
    other = tmp_path / "other.txt"
    other.write_text(corpus_text[:5000] + " ✓ ☃ " * 50, encoding="utf-8")
    assert main(["eval", ckpt, "--data", str(other), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "DROP_UNKNOWN_CHARS=1" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", str(other), "--cache-dir", str(tmp_path / "c"),
                 "--drop-unknown-chars"]) == 0


@pytest.mark.unit
def test_a_from_scratch_shape_mismatch_does_not_speak_of_gpt2(tiny_checkpoint):
    from lmtrain.config import ModelSettings
    from lmtrain.models import build_model
    from lmtrain.models.weights import load_model_state

    weights = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    config = ModelSettings(n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(UserError) as exc:
        load_model_state(build_model(config, 65), config, weights)
    assert "GPT2_MODEL_NAME" not in str(exc.value) and "N_EMBD=32" in str(exc.value)


@pytest.mark.integration
def test_the_format_is_told_from_more_than_the_first_record(train_run, tmp_path):
    import json

    data = tmp_path / "alpaca.jsonl"
    first = json.dumps({"instruction": "Say hi."})  # no output: refused as alpaca, not text
    rest = [json.dumps({"instruction": f"Count to {i}.", "output": "1 2 3."}) for i in range(40)]
    data.write_text("\n".join([first, *rest]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        train_run(training_data_source=str(data), training_steps=1)
    assert "line 1" in str(exc.value) and "'output' is missing" in str(exc.value)
    assert "TEXT_FIELD" not in str(exc.value)
