"""The ``lmtrain`` command line. Heavy libraries are imported inside the commands that use them,
so ``lmtrain --help`` stays fast."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lmtrain import __version__
from lmtrain.config import (
    FIELDS,
    GROUP_OF,
    GROUPS,
    check_settings,
    check_value,
    env_name,
    env_typos,
    explicit_settings,
    flag_name,
    setting_help,
)
from lmtrain.errors import TrainingInterrupted, UserError
from lmtrain.host_memory import huge_pages_for_sharded_run
from lmtrain.launch_checks import elastic_restart_warning

#: Flags whose names differ from their setting (aliases users expect).
FLAG_ALIASES = {"checkpoint_path": ["--resume"], "training_data_source": ["--data"]}


def add_setting_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                      aliases: Mapping[str, list[str]] = FLAG_ALIASES,
                      default_text: str | None = None) -> None:
    """One flag per setting (every TrainingConfig field, or ``names``), documented from
    ``FIELDS``: what it does, its env twin, its default and the presets' values.

    A flag left out is absent from the parsed namespace, so the env var, the presets and the
    default fill in; values are validated with the settings (:func:`~lmtrain.config.load_fresh`),
    so a bad one gets the same one-line error as its env var. ``default_text`` replaces the
    defaults in the help (``lmtrain sample``'s settings default to the run's values).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in FIELDS if names is None else names:
        target: argparse._ActionsContainer = parser
        if names is None:  # every setting: one --help section per settings group
            label = GROUP_OF[name]
            if label not in groups:
                groups[label] = _settings_group(parser, label)
            target = groups[label]
        flags = [flag_name(name), *aliases.get(name, [])]
        if FIELDS[name].annotation is bool:
            target.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS,
                                help=setting_help(name, default_text))
        else:
            target.add_argument(*flags, dest=name, metavar=env_name(name),
                                default=argparse.SUPPRESS,
                                help=setting_help(name, default_text))


def setting_value(args: argparse.Namespace, name: str, fallback: Any) -> Any:
    """Setting ``name`` for a command on a trained run: its flag (from :func:`add_setting_flags`),
    else its env var, else ``fallback`` (the run's own value); a given value is checked against
    the setting's field, as training checks it."""
    if hasattr(args, name):
        return check_value(name, getattr(args, name), flag_name(name))
    raw = os.environ.get(env_name(name), "").strip()
    return check_value(name, raw, env_name(name)) if raw else fallback


def add_base_flag(parser: argparse.ArgumentParser) -> None:
    """``--base MODEL``: where a GPT-2 run's base model lives now (:func:`base_override`)."""
    parser.add_argument("--base", metavar="MODEL", default=None,
                        help="where the GPT-2 base model lives now (folder or hub id) "
                             "[env GPT2_MODEL_NAME; default: where the run found it]")


def base_override(args: argparse.Namespace) -> str | None:
    """``--base``, else ``GPT2_MODEL_NAME``, else ``None`` (the run's own base)."""
    return args.base or os.environ.get("GPT2_MODEL_NAME", "").strip() or None


def _settings_group(parser: argparse.ArgumentParser, label: str) -> argparse._ArgumentGroup:
    """A ``--help`` section for one settings group, described by its class's docstring."""
    doc = (GROUPS[label].__doc__ or "").replace("``", "")
    return parser.add_argument_group(f"{label} settings", " ".join(doc.split()))


def cmd_train(args: argparse.Namespace) -> int:
    """Train fresh, or resume when --resume / CHECKPOINT_PATH is given."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    values, sources = explicit_settings(flags=flags, config_file=args.config)
    return run_training_session(values, sources)


def run_training_session(values: dict[str, Any], sources: dict[str, str]) -> int:
    from lmtrain.signals import stop_on_signals

    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        for warning in [*env_typos(), elastic_restart_warning()]:
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
    check_settings(values, sources)  # before torch is imported: a bad value fails at once
    huge_pages_for_sharded_run(str(values.get("parallel", "ddp")))  # before torch, too
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
    parser.add_argument("--version", action="version", version=f"lmtrain {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the traceback of an internal error (a bug in lmtrain; "
                             "also LMTRAIN_DEBUG=1); allowed anywhere on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train_p = sub.add_parser(
        "train", help="train fresh, or resume with --resume CKPT",
        description="Train a model. Precedence: defaults < presets < --config file < env vars "
                    "< flags; the presets (MODEL_TYPE=gpt2, USE_LORA with gpt2, TEST_MODE) "
                    "change the defaults shown with each flag. With --resume (CHECKPOINT_PATH) "
                    "the run continues from the checkpoint.")
    train_p.add_argument("--config", metavar="FILE.toml", default=None,
                         help="TOML file of settings (keys as in the env vars, any case)")
    add_setting_flags(train_p)
    train_p.set_defaults(func=cmd_train)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lmtrain.commands.{name}").register(sub)
    for command_parser in sub.choices.values():  # its own usage for a flag it does not know
        command_parser.set_defaults(command_parser=command_parser)
    return parser


#: Modules under ``lmtrain/commands/`` that each define ``register(subparsers)``, adding one
#: subcommand whose ``func(args) -> int`` runs it. They import heavy libraries lazily.
COMMAND_MODULES: list[str] = ["sample", "plot", "inspect", "tokenize", "prepare", "export",
                              "eval", "checkpoint", "serve", "chat"]


def run_guarded(fn: Callable[[], int], debug: bool = False) -> int:
    """Run ``fn``; a :class:`UserError` becomes one ``error:`` line and exit status 2, a
    :class:`TrainingInterrupted` the resume command and exit status 130 / 143, a closed
    stdout a quiet exit, and any other exception one line naming what failed and where its
    traceback was written, exit status 1 (:mod:`lmtrain.crash_report`; ``debug`` shows it)."""
    from lmtrain.crash_report import debug_wanted, report_crash

    try:
        code = fn()
        sys.stdout.flush()  # a reader that went away shows here, not in the exit's flush
        return code
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
    except Exception as exc:  # the last line of defence: a bug, not the user's mistake
        return report_crash(exc, debug or debug_wanted())


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmtrain`` command; ``argv=None`` means it owns the process (:func:`run_process`)."""
    given = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in given[: given.index("--") if "--" in given else len(given)]
    if debug:
        given.remove(DEBUG_FLAG)
    args = _parse(given)
    if argv is None:
        return run_process(lambda: args.func(args), exit_on_signal=args.func is cmd_train,
                           debug=debug)
    return run_guarded(lambda: args.func(args), debug)


#: Anywhere before ``--``: show the traceback of an internal error (as ``LMTRAIN_DEBUG=1``).
DEBUG_FLAG = "--debug"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would show the top-level usage; the command's is the helpful one
        known = [s for a in args.command_parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def run_process(fn: Callable[[], int], exit_on_signal: bool, debug: bool = False) -> int:
    """Run ``fn`` as the whole process. One stopped by a signal ends without the interpreter's
    teardown, during which a further signal would kill it half-way or raise inside ``atexit``
    code. With ``exit_on_signal`` (training: its state is safe in atomic checkpoints) a signal
    outside the run's own handling exits at once too; other commands unwind as usual."""
    from lmtrain.signals import exit_on_signals, exit_process

    if exit_on_signal:
        exit_on_signals()
    code = run_guarded(fn, debug)
    if code >= 128:
        exit_process(code)
    return code


def env_entrypoint() -> int:
    """``python training.py``: every setting from the environment, and no arguments."""
    if sys.argv[1:]:
        script = os.path.basename(sys.argv[0]) or "training.py"
        print(f"error: {script} takes no arguments (got {' '.join(sys.argv[1:])!r}); settings "
              f"are environment variables, or use `lmtrain train --help`", file=sys.stderr)
        return 2

    def go() -> int:
        values, sources = explicit_settings()
        return run_training_session(values, sources)

    return run_process(go, exit_on_signal=True)
