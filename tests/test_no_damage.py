"""Issue 27's silent damage and lost work: an export folder holds exactly one export, a resume
from an older step never rewrites the run's history, bad text in records is refused when read,
and ``python training.py`` takes no arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmtrain.cli import main
from lmtrain.durable import atomic_folder, remove_stale_temp_files
from lmtrain.errors import UserError
from tests.test_trust import tmpfs  # noqa: F401  (a fixture: small tmpfs mounts)


@pytest.mark.unit
def test_atomic_folder_refuses_a_filled_folder_and_a_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"OUT_DIR=.*not empty.*--force"), \
            atomic_folder(out, "OUT_DIR"):
        pass
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match="is a file"), atomic_folder(tmp_path / "file", "OUT_DIR"):
        pass
    assert (out / "mine.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.unit
def test_atomic_folder_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    tmp_path = tmp_path / "exports"
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (out / "stale.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, "OUT_DIR", force=True) as tmp:
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left
    assert [p.name for p in out.iterdir()] == ["stale.json"]
    with atomic_folder(out, "OUT_DIR", force=True) as tmp:
        (tmp / "new.json").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.unit
def test_a_users_own_tmp_part_files_are_not_removed(tmp_path):
    from lmtrain.durable import _host_tag

    mine = [tmp_path / ".tmp-notes.part", tmp_path / ".tmp-12.part",
            tmp_path / f".tmp-999999999@{_host_tag()}-my-draft.part"]
    for p in mine:
        p.write_text("mine")
    dead = tmp_path / f".tmp-999999999@{_host_tag()}-0123456789ab.part"  # lmtrain's, writer gone
    dead.write_text("half")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert all(p.read_text() == "mine" for p in mine)


@pytest.mark.integration
def test_export_never_leaves_a_stale_tokenizer(train_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    bpe = train_run(tokenization_method="custom_bpe", custom_vocab_size=300, training_steps=1,
                    run_name="bpe")
    gpt2 = train_run(tokenization_method="gpt2", training_steps=1, run_name="gpt2tok")
    out = tmp_path / "hf"
    assert main(["export", str(bpe.checkpoint_dir / "step_0000001.pt"), str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["export", str(gpt2.checkpoint_dir / "step_0000001.pt"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # untouched
    assert main(["export", str(gpt2.checkpoint_dir / "step_0000001.pt"), str(out),
                 "--force"]) == 0
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


@pytest.mark.integration
def test_export_refuses_a_file_and_one_folder_for_model_and_adapter(train_run, tmp_path, capsys):
    run = train_run(tokenization_method="gpt2", training_steps=1)
    ckpt = str(run.checkpoint_dir / "step_0000001.pt")
    (tmp_path / "file").write_text("keep")
    assert main(["export", ckpt, str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"
    assert main(["export", ckpt, str(tmp_path / "x"), "--adapter", str(tmp_path / "x")]) == 2
    assert "one folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _steps(metrics: Path) -> list[int]:
    from lmtrain.reporting import read_metrics

    return [int(r["step"]) for r in read_metrics(metrics) if "step" in r]


@pytest.mark.integration
@pytest.mark.parametrize("enable", [True, False])
def test_resuming_an_older_step_branches_whatever_enable_checkpoints(train_run, tmp_path, enable):
    first = train_run(training_steps=6, checkpoint_interval=3, run_name="r")
    log_dir = Path(first.log_file).parent
    before = {p.name: p.read_bytes() for p in log_dir.iterdir() if p.is_file()}
    resumed = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000003.pt"),
                        resume_steps=2, enable_checkpoints=enable)
    assert resumed.run_name == "r-from-3"
    after = {p.name: p.read_bytes() for p in log_dir.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # history untouched


@pytest.mark.integration
def test_resuming_the_last_step_twice_without_checkpoints_branches(train_run):
    first = train_run(training_steps=3, checkpoint_interval=3, run_name="r")
    ckpt = str(first.checkpoint_dir / "step_0000003.pt")
    again = train_run(checkpoint_path=ckpt, resume_steps=2, enable_checkpoints=False)
    assert again.run_name == "r"  # continues the run's history
    branch = train_run(checkpoint_path=ckpt, resume_steps=2, enable_checkpoints=False)
    assert branch.run_name == "r-from-3"  # the history went past step 3 already


@pytest.mark.integration
def test_training_py_takes_no_arguments(tmp_path):
    from tests.conftest import run_entrypoint

    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    root = Path(__file__).resolve().parents[1]
    for args in (["--help"], ["--steps", "3"]):
        proc = run_entrypoint([str(root / "training.py"), *args], {}, tmp_path, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "training.py takes no arguments" in proc.stderr
        assert "lmtrain train --help" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []  # no run started


QA_SURROGATE = '{"question": "What is \\ud800?", "answer": "Lost."}\n'


@pytest.mark.integration
@pytest.mark.parametrize("method", ["character", "custom_bpe"])
def test_a_record_with_an_unpaired_surrogate_is_refused_when_read(train_run, tmp_path, method,
                                                                   capsys):
    data = tmp_path / "qa.jsonl"
    good = '{"question": "What is two?", "answer": "Two."}\n'
    data.write_text(good * 40 + QA_SURROGATE + good * 10, encoding="utf-8")
    with pytest.raises(UserError) as exc:
        train_run(training_data_source=str(data), tokenization_method=method,
                  custom_vocab_size=300, training_steps=2)
    message = str(exc.value)
    assert f"{data} line 41" in message and "'question'" in message
    assert "unpaired surrogate" in message


@pytest.mark.unit
@pytest.mark.parametrize("line, expected", [
    ('{"text": "a\\udc80"}', "field 'text' holds an unpaired surrogate"),
    ('{"q": 1' + "0" * 5000 + "}", "a number is too long"),
    ("[" * 200_000 + "]" * 200_000, "nests deeper"),
    ('{"messages": [{"content": ["\\ud800"]}]}', "field 'messages[0].content[0]' holds"),
])
def test_json_lines_that_python_reads_badly_are_one_line(line, expected):
    from lmtrain.data.sources import parse_json_line

    with pytest.raises(UserError, match=r"^f line 3") as exc:
        parse_json_line(line, "f line 3")
    assert expected in str(exc.value)


@pytest.mark.integration
def test_logged_losses_after_an_off_grid_resume_are_the_straight_runs(train_run):
    from tests.conftest import train_losses, whole_and_resumed

    whole, part, _ = whole_and_resumed(train_run, total=20, split=7, log_interval=5,
                                       lr_decay_steps=20, eval_interval=100,
                                       checkpoint_interval=100)
    straight = train_losses(Path(whole.log_file).parent / "metrics.jsonl")
    resumed = train_losses(Path(part.log_file).parent / "metrics.jsonl", since=8)
    assert sorted(resumed) == [10, 15, 20]
    assert resumed == {step: straight[step] for step in (10, 15, 20)}


@pytest.mark.integration
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(train_run, capsys, request):
    mount = request.getfixturevalue("tmpfs")
    run = train_run(tokenization_method="gpt2", training_steps=1)
    disk = mount("small", "256k")
    assert main(["export", str(run.checkpoint_dir / "step_0000001.pt"), str(disk / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: OUT_DIR:") and "\n" not in err, err
    assert list(disk.iterdir()) == []
