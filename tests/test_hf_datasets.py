"""Hugging Face datasets as training data: Parquet/Arrow files and folders, hf: from the cache."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from lmtrain.data.hf_datasets import ArrowStream, parse_hub_source, resolve_dataset
from lmtrain.data.prepare import prepare_splits, prepare_tokens
from lmtrain.errors import UserError
from tests.conftest import data_config, token_data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TRAIN_DOCS = ["First document.\nIt has two lines.", "Second one, ¿qué? 東京", "third"] * 40
VAL_DOCS = ["A validation document.", "And another: zebra quiz."] * 20



#: These documents are short: one block is 8 tokens
config = functools.partial(data_config, block_size=8)


def write_parquet(path: Path, docs: list[str | None], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path,
                   row_group_size=7)
    return path


@pytest.mark.integration
def test_a_parquet_file_streams_its_text_column_in_order(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [*TRAIN_DOCS[:3], None, "last"])
    stream = ArrowStream(str(path), [path])
    assert "".join(stream) == "\n\n".join([*TRAIN_DOCS[:3], "last"])  # null rows are skipped
    assert stream.rows_read == stream.total_rows == 5
    assert stream.bytes_read == path.stat().st_size


@pytest.mark.unit
def test_arrow_files_and_streams_read_alike(tmp_path: Path) -> None:
    table = pa.table({"text": TRAIN_DOCS})
    as_file, as_stream = tmp_path / "f.arrow", tmp_path / "s.arrow"
    with pa.OSFile(str(as_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10)
    with pa.OSFile(str(as_stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=10)  # the layout datasets writes
    expected = "\n\n".join(TRAIN_DOCS)
    assert "".join(ArrowStream("f", [as_file])) == expected
    assert "".join(ArrowStream("s", [as_stream])) == expected


@pytest.mark.unit
def test_parquet_source_tokens_are_cached_by_content(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", TRAIN_DOCS)
    cfg = config(path, tmp_path)
    tok, first = prepare_tokens(cfg.data)
    assert not first.cached
    assert first.load().tolist() == tok.encode("\n\n".join(TRAIN_DOCS))
    _, again = prepare_tokens(cfg.data)
    assert again.cached and again.path == first.path
    write_parquet(path, [*TRAIN_DOCS, "one more document"])
    _, changed = prepare_tokens(cfg.data)
    assert not changed.cached and changed.path != first.path


@pytest.mark.unit
def test_text_field_selects_the_column_and_names_the_choices(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", TRAIN_DOCS, column="body")
    with pytest.raises(UserError, match=r"no column 'text' \(it has body, id\); set TEXT_FIELD"):
        prepare_tokens(config(path, tmp_path).data)
    with pytest.raises(UserError, match="holds int64, not text"):
        prepare_tokens(config(path, tmp_path, text_field="id").data)
    tok, arr = prepare_tokens(config(path, tmp_path, text_field="body").data)
    assert tok.decode(arr.load().tolist()) == "\n\n".join(TRAIN_DOCS)


@pytest.mark.unit
def test_a_validation_split_replaces_the_train_split_cut(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", TRAIN_DOCS)
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", VAL_DOCS)
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", ["never trained on: QX"])
    splits = resolve_dataset(str(folder))
    assert [p.name for p in splits.train] == ["train-00000-of-00001.parquet"]
    assert [p.name for p in splits.validation] == ["validation-00000-of-00001.parquet"]
    tok, data = token_data(config(folder, tmp_path))
    assert data.train.tolist() == tok.encode("\n\n".join(TRAIN_DOCS))
    assert data.val.tolist() == tok.encode("\n\n".join(VAL_DOCS))
    assert set("zbq") <= set(tok.decode(data.val.tolist()))  # the vocabulary covers validation


@pytest.mark.unit
def test_a_folder_without_split_names_trains_on_every_file(tmp_path: Path) -> None:
    write_parquet(tmp_path / "ds" / "a.parquet", TRAIN_DOCS[:30])
    write_parquet(tmp_path / "ds" / "b.parquet", TRAIN_DOCS[30:])
    cfg = config(tmp_path / "ds", tmp_path, train_split=0.75)
    tok, data = token_data(cfg)
    n = len(tok.encode("\n\n".join(TRAIN_DOCS)))
    assert len(data.train) == int(n * 0.75) and len(data.train) + len(data.val) == n


@pytest.mark.unit
def test_a_broken_parquet_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"bad\.parquet is not a Parquet file"):
        prepare_tokens(config(bad, tmp_path).data)


@pytest.mark.unit
def test_progress_bar_counts_rows(tmp_path: Path, capsys) -> None:
    path = write_parquet(tmp_path / "d.parquet", TRAIN_DOCS)
    prepare_splits(config(path, tmp_path).data, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "120/120" in err and "rows" in err
    prepare_splits(config(path, tmp_path, cache_dir=str(tmp_path / "c2")).data, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.unit
@pytest.mark.parametrize(("source", "parsed"), [
    ("hf:roneneldan/TinyStories", ("roneneldan/TinyStories", None, None)),
    ("hf:wikitext:wikitext-2-raw-v1@validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
    ("hf:me/data@test", ("me/data", None, "test")),
])
def test_hub_source_syntax(source: str, parsed: tuple) -> None:
    assert parse_hub_source(source) == parsed


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache holding ``someone/tiny`` (train + validation), as a download leaves it."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    files = {"train": str(write_parquet(src / "train.parquet", TRAIN_DOCS)),
             "validation": str(write_parquet(src / "validation.parquet", VAL_DOCS))}
    build = tmp_path / "build"
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(build))
    cache = tmp_path / "hf-cache"
    (built,) = (p for p in (build / "parquet").glob("default-*/*/*") if p.is_dir())
    target = cache / "someone___tiny" / "default" / built.parent.name / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", "tiny-"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.mark.unit
def test_hf_source_reads_the_local_cache_offline(tmp_path: Path, hub_cache: Path) -> None:
    tok, data = token_data(config("hf:someone/tiny", tmp_path))
    assert tok.decode(data.train.tolist()) == "\n\n".join(TRAIN_DOCS)
    assert tok.decode(data.val.tolist()) == "\n\n".join(VAL_DOCS)
    only_val = resolve_dataset("hf:someone/tiny@validation")  # trains on it: TRAIN_SPLIT cut
    assert len(only_val.train) == 1 and only_val.validation == []
    with pytest.raises(UserError, match=r"no split 'test'; it has train, validation"):
        prepare_tokens(config("hf:someone/tiny@test", tmp_path).data)
    with pytest.raises(UserError, match=r"not found in the local datasets cache.*ALLOW_DOWNLOAD=1"):
        prepare_tokens(config("hf:someone/absent", tmp_path).data)


@pytest.mark.unit
def test_save_to_disk_folders(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TRAIN_DOCS}),
                               "validation": datasets.Dataset.from_dict({"text": VAL_DOCS})})
    dd.save_to_disk(str(tmp_path / "saved"))
    tok, data = token_data(config(tmp_path / "saved", tmp_path))
    assert tok.decode(data.val.tolist()) == "\n\n".join(VAL_DOCS)
    dd["train"].save_to_disk(str(tmp_path / "one"))
    assert "".join(ArrowStream("one", resolve_dataset(str(tmp_path / "one")).train)) == \
        "\n\n".join(TRAIN_DOCS)


@pytest.mark.unit
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    import sys

    path = write_parquet(tmp_path / "d.parquet", TRAIN_DOCS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r"needs the datasets extra: pip install "
                                        r"'lmtrain\[datasets\]'"):
        prepare_tokens(config("hf:someone/tiny", tmp_path).data)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"Parquet/Arrow data sources need the datasets extra"):
        prepare_tokens(config(path, tmp_path).data)


@pytest.mark.unit
def test_prepare_command_reports_the_validation_split(tmp_path: Path, capsys) -> None:
    import json

    from lmtrain.cli import main

    folder = tmp_path / "ds"
    write_parquet(folder / "train.parquet", TRAIN_DOCS)
    write_parquet(folder / "validation.parquet", VAL_DOCS)
    assert main(["prepare", "--data", str(folder), "--cache-dir", str(tmp_path / "c")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["validation"]["n_tokens"] == len("\n\n".join(VAL_DOCS))  # characters
    assert summary["n_tokens"] == len("\n\n".join(TRAIN_DOCS))
