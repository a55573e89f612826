"""The fuzz lane (issue 27): Hypothesis draws hostile settings (env, flags and TOML), question/
answer records and mutations of a real checkpoint, and every command they reach must end in
success or one ``error:`` line with exit status 2: never a traceback, never exit 1, and no file
changed outside the run's folders.

``make test`` runs a fixed, derandomized budget (under three minutes); ``make fuzz``
(``LMTRAIN_FUZZ=long``) runs many more examples. Inputs that once found a bug stay as
``@example``s.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmtrain.cli import build_parser, run_guarded  # noqa: E402
from lmtrain.config import FIELDS, check_settings, env_name, explicit_settings  # noqa: E402
from tests.conftest import TINY  # noqa: E402

LONG = os.environ.get("LMTRAIN_FUZZ", "").strip().lower() == "long"

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(7200 if LONG else 300)]


def budget(examples: int) -> Callable[[Any], Any]:
    """The examples a test draws: ``examples`` in ``make test`` (derandomized, so the same ones
    every run), twenty times as many, freshly drawn, in ``make fuzz``."""
    return settings(max_examples=examples * 20 if LONG else examples, deadline=None,
                    derandomize=not LONG, database=None if not LONG else settings().database,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# --- what every example must show --------------------------------------------------------------

def snapshot(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (outside ``skip``) with its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and not any(p.is_relative_to(s) for s in skip):
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def assert_clean_exit(run: Callable[[], int], capsys: pytest.CaptureFixture[str]) -> int:
    """``run`` (a command) ends with exit status 0 or 2 and no traceback; returns the status."""
    try:
        code = run_guarded(run)
    except SystemExit as exc:  # argparse's own refusal of a flag: exit 2, one usage line
        code = exc.code if isinstance(exc.code, int) else 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert "error" in err, err
    return code


@contextlib.contextmanager
def workplace(tmp: Path) -> Iterator[dict[str, str]]:
    """The run's folders inside ``tmp`` as env vars, and the current folder moved there; on
    exit, nothing outside those folders may have changed."""
    dirs = {name: tmp / name.lower() for name in ("CHECKPOINT_DIR", "LOG_DIR", "OUTPUT_DIR",
                                                  "CACHE_DIR")}
    (tmp / "keep.txt").write_text("a file the run must not touch")
    before = snapshot(tmp, tuple(dirs.values()))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        yield {k: str(v) for k, v in dirs.items()}
    finally:
        os.chdir(cwd)
    assert snapshot(tmp, tuple(dirs.values())) == before


@pytest.fixture
def fresh_dir(tmp_path: Path) -> Callable[[], Path]:
    """A new empty folder per Hypothesis example."""
    count = iter(range(10**9))

    def make() -> Path:
        folder = tmp_path / f"ex{next(count)}"
        folder.mkdir()
        return folder

    return make


# --- settings: env, flags and TOML ------------------------------------------------------------

#: Settings that reach the network or another machine: never drawn.
NOT_DRAWN = {"allow_download"}
NAMES = sorted(set(FIELDS) - NOT_DRAWN)

ODD_TEXT = ["", " ", "nan", "inf", "-inf", "-1", "0", "1", "2", "true", "false", "yes", "auto",
            "none", "null", "1e12", "300000000", "1048576", "0.5", "-0.0", "~nosuchuser/x",
            "a" * 300, "/x" * 2100, "bad\0name", "caf\udcc3", "\ud800", "ＡＢＣ", "{question}",
            "Q: {question} A: {answer}", "hf:", "*.txt", "..", "/", "cuda:7", "meta",
            "9" * 5000]
raw_value = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=20),
)
toml_value = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "nan" if f != f else "inf" if f == float("inf") else "-inf"
        if f == float("-inf") else repr(f)),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.sampled_from(ODD_TEXT).map(lambda s: json.dumps(s)),
    st.just("[1, 2]"), st.just("{ a = 1 }"), st.just("1979-05-27T07:32:00Z"),
)
setting_name = st.sampled_from(NAMES)


def check_only(argv: list[str], env: dict[str, str]) -> int:
    """``lmtrain train`` up to its first allocation: parse, settings, plan, checks."""
    from lmtrain.device import select_device
    from lmtrain.train.build import check_before_start
    from lmtrain.train.plan import resolve_plan
    from lmtrain.train.state import Placement

    args = build_parser().parse_args(["train", *argv])
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    values, sources = explicit_settings(flags=flags, env=env, config_file=args.config)
    check_settings(values, sources)
    plan = resolve_plan(values, sources)
    check_before_start(plan, Placement(select_device(plan.config.run.device)))
    return 0


@budget(120)
@given(env=st.dictionaries(setting_name, raw_value, max_size=3),
       flags=st.dictionaries(setting_name, raw_value, max_size=2),
       toml=st.dictionaries(setting_name, toml_value, max_size=3))
@example(env={"BATCH_SIZE": "300000000"}, flags={}, toml={})
@example(env={"n_embd": "1048576", "n_head": "512"}, flags={}, toml={})
@example(env={}, flags={}, toml={"training_steps": "true"})
@example(env={"checkpoint_dir": "~nosuchuser/x"}, flags={"training_data_source": "a" * 300},
         toml={})
@example(env={"prompt": "caf\udcc3"}, flags={}, toml={})
@example(env={"max_new_tokens": "1e12"}, flags={}, toml={"max_new_tokens": "1000000000000"})
def test_settings_end_in_a_run_or_one_line(env, flags, toml, fresh_dir, capsys):
    tmp = fresh_dir()
    argv = []
    for name, value in flags.items():
        if FIELDS[name].annotation is bool:
            argv.append(f"--{name.replace('_', '-')}")
        else:
            argv.append(f"--{name.replace('_', '-')}={value}")
    if toml:
        lines = [f"{k} = {v}" for k, v in toml.items()]
        (tmp / "cfg.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        argv.append(f"--config={tmp / 'cfg.toml'}")
    with workplace(tmp) as dirs:
        environ = {**dirs, **{env_name(k) if k in FIELDS else k: v for k, v in env.items()}}
        assert_clean_exit(lambda: check_only(argv, environ), capsys)


#: Settings a fuzzed training run may draw (cheap to run whatever their value), and values.
RUN_SETTINGS = {
    "learning_rate": ["1e-3", "0", "-1", "nan", "1e308", "x"],
    "dropout": ["0", "0.5", "1", "-0.1"],
    "warmup_steps": ["0", "5", "-2"],
    "eval_interval": ["1", "0"], "eval_iters": ["0", "1", "2", "-1"],
    "max_new_tokens": ["0", "3", "2000001"], "temperature": ["0.001", "0", "5"],
    "top_k": ["1", "0", "1000000"], "top_p": ["0.01", "1", "0", "1.5"],
    "prompt": ["", "ZZZ \u2603", "\ud800", "\n\n"], "seed": ["0", "-1", str(2**63)],
    "optimizer": ["adamw", "muon", "sgd"], "arch": ["gpt2", "llama"],
    "on_nan": ["stop", "skip"], "grad_clip": ["0", "1e-9", "-1"],
    "train_split": ["0.5", "0.99", "1", "0"], "precision": ["fp32", "bf16", "fp8"],
    "tokenization_method": ["character", "custom_bpe", "gpt2"],
    "run_name": ["r", "..", "a/b", "x" * 300], "keep_last_checkpoints": ["1", "0"],
    "checkpoint_interval": ["1", "2"], "data_format": ["auto", "text", "qa"],
    "loss_on": ["auto", "all", "answers"], "training_steps": ["0", "1", "2"],
}


@budget(8)
@given(choice=st.dictionaries(st.sampled_from(sorted(RUN_SETTINGS)), st.integers(0, 5),
                              max_size=3))
@example(choice={"prompt": 2})  # an invalid UTF-8 prompt
def test_training_runs_end_in_success_or_one_line(choice, fresh_dir, corpus, capsys):
    tmp = fresh_dir()
    drawn = {k: RUN_SETTINGS[k][i % len(RUN_SETTINGS[k])] for k, i in choice.items()}
    base = {k: v for k, v in TINY.items() if not isinstance(v, bool)}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in {**base, "training_steps": 2,
                                                          "custom_vocab_size": 300,
                                                          "data": str(corpus), **drawn}.items()]
    with workplace(tmp) as dirs:
        argv += [f"--{k.lower().replace('_', '-')}={v}" for k, v in dirs.items()]

        def train() -> int:
            from lmtrain.cli import cmd_train

            return cmd_train(build_parser().parse_args(["train", *argv]))

        assert_clean_exit(train, capsys)


# --- question/answer records -----------------------------------------------------------------

odd_text = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfff", "", " ",
                                                            "\u0000", "{question}", "\u202e"]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30),
                      st.floats(allow_nan=False), odd_text)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(odd_text, inner, max_size=3), max_leaves=8)
field = st.sampled_from(["question", "answer", "instruction", "input", "output", "messages",
                         "text", "role", "content"])
message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "robot", ""]) | json_value,
    "content": odd_text | json_value})
record = st.one_of(
    st.fixed_dictionaries({"question": odd_text, "answer": odd_text}),
    st.fixed_dictionaries({"instruction": odd_text, "output": odd_text},
                          optional={"input": odd_text | json_value}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    st.dictionaries(field, json_value, max_size=3),
    json_value,
)
raw_line = st.one_of(
    record.map(json.dumps),
    st.integers(4000, 6000).map(lambda n: '{"question": ' + "7" * n + ', "answer": "a"}'),
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["", "{", "not json", '{"question": "a", "answer": "b"', "\xff"]),
)
GOOD = json.dumps({"question": "What is one plus one?", "answer": "Two."})


@budget(25)
@given(lines=st.lists(raw_line, max_size=4), good=st.integers(0, 40))
@example(lines=['{"question": "What is \\ud800?", "answer": "Lost."}'], good=30)
@example(lines=['{"question": ' + "7" * 5000 + ', "answer": "a"}'], good=30)
@example(lines=["[" * 200_000 + "]" * 200_000], good=30)
@example(lines=[json.dumps({"instruction": "Say hi."})], good=30)
def test_records_end_in_an_evaluation_or_one_line(lines, good, tiny_checkpoint, fresh_dir,
                                                  capsys):
    from lmtrain.cli import main

    tmp = fresh_dir()
    data = tmp / "qa.jsonl"
    data.write_text("\n".join([*lines, *[GOOD] * good]) + "\n", encoding="utf-8",
                    errors="surrogateescape")
    with workplace(tmp) as dirs:
        assert_clean_exit(lambda: main(["eval", str(tiny_checkpoint), "--answers", "--data",
                                        str(data), "--cache-dir", dirs["CACHE_DIR"],
                                        "--batch-size", "16"]), capsys)


# --- mutations of a real checkpoint ----------------------------------------------------------

_SAVED: dict[str, Any] = {}


def saved(path: Path) -> dict[str, Any]:
    import torch

    if "ckpt" not in _SAVED:
        _SAVED["ckpt"] = torch.load(path, weights_only=True)
    return _SAVED["ckpt"]


def _tensor_ops():
    import torch

    return {
        "nan": lambda t: t.float().fill_(float("nan")),
        "inf": lambda t: t.float().fill_(float("inf")),
        "half": lambda t: t.half(), "int": lambda t: t.long(), "bool": lambda t: t.bool(),
        "complex": lambda t: t.to(torch.complex64), "double": lambda t: t.double(),
        "flat": lambda t: t.reshape(-1), "empty": lambda t: t.reshape(-1)[:0],
        "sparse": lambda t: t.to_sparse(), "meta": lambda t: t.to("meta"),
        "transposed": lambda t: t.t() if t.dim() == 2 else t,
        "bigger": lambda t: torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else
        torch.zeros(2),
        "scalar": lambda t: torch.tensor(3.0),
    }


replacement = st.one_of(json_value, st.sampled_from(["tensor", "deep", "huge int", "big str"]))


def _replacement(kind: Any) -> Any:
    import torch

    if kind == "tensor":
        return torch.zeros(2, 3)
    if kind == "deep":
        value: Any = 1
        for _ in range(5000):
            value = [value]
        return value
    if kind == "huge int":
        return 2**80
    if kind == "big str":
        return "x" * 100_000
    return kind


mutation = st.tuples(st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
                     st.sampled_from(["delete", "replace", "tensor", "add key"]),
                     st.sampled_from(sorted(_tensor_ops())), replacement)


def _mutate(ckpt: Any, path: list[int], op: str, tensor_op: str, value: Any) -> Any:
    """``ckpt`` with one value along ``path`` (indices into keys / items) changed."""
    import copy

    import torch

    root = copy.copy(ckpt)
    node: Any = root
    for depth, index in enumerate(path):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[index % len(keys)]
        child = node[key]
        last = depth == len(path) - 1 or not isinstance(child, dict | list) or not child
        if last:
            if op == "delete":
                if isinstance(node, dict):
                    del node[key]
                else:
                    node.pop(key)
            elif op == "tensor" and isinstance(child, torch.Tensor):
                node[key] = _tensor_ops()[tensor_op](child.clone())
            elif op == "add key" and isinstance(node, dict):
                node[f"extra{index}"] = _replacement(value)
            else:
                node[key] = _replacement(value)
            return root
        node[key] = copy.copy(child)
        node = node[key]
    return root


@budget(40)
@given(mutations=st.lists(mutation, min_size=1, max_size=3), sealed=st.booleans())
@example(mutations=[([5, 0], "tensor", "nan", None)], sealed=True)  # NaN weights, sealed
@example(mutations=[([5, 0], "tensor", "sparse", None)], sealed=False)
@example(mutations=[([5, 0], "tensor", "meta", None)], sealed=False)
@example(mutations=[([8], "replace", "nan", "deep")], sealed=False)  # settings 5,000 deep
@example(mutations=[([4], "replace", "nan", "\ud800")], sealed=True)  # run_name not Unicode
@example(mutations=[([0], "replace", "nan", "deep")], sealed=False)  # format_version 5,000 deep
def test_checkpoint_mutations_end_in_success_or_one_line(mutations, sealed, tiny_checkpoint,
                                                         fresh_dir, capsys):
    import torch

    from lmtrain.checkpoint_format import seal
    from lmtrain.cli import main

    tmp = fresh_dir()
    ckpt = saved(tiny_checkpoint)
    for path, op, tensor_op, value in mutations:
        ckpt = _mutate(ckpt, path, op, tensor_op, value)
    target = tmp / "step_0000004.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        with contextlib.suppress(Exception):  # sealing walks it: a crafted file need not be
            ckpt = seal(ckpt) if sealed else ckpt
        torch.save(ckpt, target)
    finally:
        sys.setrecursionlimit(limit)
    written = target.read_bytes()
    with workplace(tmp):
        assert_clean_exit(lambda: main(["inspect", str(target)]), capsys)
        assert_clean_exit(lambda: main(["sample", str(target), "--max-new-tokens", "2",
                                        "--prompt", "a"]), capsys)
    assert target.read_bytes() == written
