"""The ``lmtrain`` command line. Heavy libraries are imported inside the commands that use them,
so ``lmtrain --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmtrain.config import (
    FIELDS,
    check_settings,
    env_name,
    env_typos,
    explicit_settings,
    flag_name,
)
from lmtrain.errors import TrainingInterrupted, UserError

#: Flags whose names differ from their setting (aliases users expect).
FLAG_ALIASES = {"checkpoint_path": ["--resume"], "training_data_source": ["--data"]}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingConfig field, documented with its env-var twin and default."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, info in FIELDS.items():
        default = info.default
        shown = "bundled corpus" if name == "training_data_source" else default
        text = f"{info.description} [env {env_name(name)}; default: {shown}]"
        group_name = _group_of(name)
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flags = [flag_name(name), *FLAG_ALIASES.get(name, [])]
        if info.annotation is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(*flags, dest=name, metavar=env_name(name),
                               default=argparse.SUPPRESS, help=text)


def _group_of(name: str) -> str:
    order = list(FIELDS)
    boundaries = [("model", "lora_targets"), ("data and tokenizer", "train_split"),
                  ("optimisation", "on_nan"), ("evaluation and generation", "top_k"),
                  ("checkpoints, logs and outputs", "run_name"), ("machine", "test_mode")]
    idx = order.index(name)
    for group, last in boundaries:
        if idx <= order.index(last):
            return group
    return "other"


def cmd_train(args: argparse.Namespace) -> int:
    """Train fresh, or resume when --resume / CHECKPOINT_PATH is given."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    values, sources = explicit_settings(flags=flags, config_file=args.config)
    return run_training_session(values, sources)


def run_training_session(values: dict[str, Any], sources: dict[str, str]) -> int:
    from lmtrain.signals import stop_on_signals

    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        for warning in env_typos():
            print(f"warning: {warning}", file=sys.stderr)
    check_settings(values, sources)  # before torch is imported: a bad value fails at once
    with stop_on_signals() as stop:  # from the start, so an early Ctrl-C is handled too
        from lmtrain.train.session import train

        stop.check()
        summary = train(values, sources)
    from lmtrain.distributed import env_info

    if env_info().is_main:  # under torchrun, one line for the whole run
        print(f"done: run {summary.run_name}, steps {summary.start_step}->{summary.end_step}, "
              f"checkpoints in {summary.checkpoint_dir}, log {summary.log_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtrain",
        description="Train small GPT-style language models: fresh runs and resumed runs "
                    "through one entrypoint. Every setting is also an environment variable.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train_p = sub.add_parser(
        "train", help="train fresh, or resume with --resume CKPT",
        description="Train a model. Precedence: defaults < --config file < env vars < flags. "
                    "With --resume (CHECKPOINT_PATH) the run continues from the checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_p.add_argument("--config", metavar="FILE.toml", default=None,
                         help="TOML file of settings (keys as in the env vars, any case)")
    _add_setting_flags(train_p)
    train_p.set_defaults(func=cmd_train)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lmtrain.commands.{name}").register(sub)
    return parser


#: Modules under ``lmtrain/commands/`` that each define ``register(subparsers)``, adding one
#: subcommand whose ``func(args) -> int`` runs it. They import heavy libraries lazily.
COMMAND_MODULES: list[str] = ["sample", "plot", "inspect", "tokenize", "prepare", "export",
                              "eval"]


def run_guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`UserError` becomes one ``error:`` line and exit status 2, a
    :class:`TrainingInterrupted` the resume command and exit status 130 / 143."""
    try:
        return fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingInterrupted as exc:
        from lmtrain.signals import interruption_report

        print(interruption_report(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C in a command without its own signal handling
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmtrain`` command; ``argv=None`` means it owns the process (:func:`run_process`)."""
    if argv is None:
        return run_process(lambda: _run_command(None))
    return _run_command(argv)


def _run_command(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args))


def run_process(fn: Callable[[], int]) -> int:
    """Run ``fn`` as the whole process: a signal outside a run exits at once, and a process
    stopped by a signal ends without the interpreter's teardown, during which a further
    signal would kill it half-way or raise inside ``atexit`` code."""
    from lmtrain.signals import exit_on_signals, exit_process

    exit_on_signals()
    code = run_guarded(fn)
    if code >= 128:
        exit_process(code)
    return code


def env_entrypoint() -> int:
    """``python training.py``: every setting from the environment."""
    def go() -> int:
        values, sources = explicit_settings()
        return run_training_session(values, sources)

    return run_process(go)
