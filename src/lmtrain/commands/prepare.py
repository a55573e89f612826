"""``lmtrain prepare``: tokenize a data source once into the cached token array training uses."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtrain.config import TrainingConfig

#: The data and tokenizer settings, as flags that fall back to their env vars and defaults.
DATA_SETTINGS = ("training_data_source", "tokenization_method", "custom_vocab_size",
                 "text_field", "data_format", "qa_template", "train_split", "cache_dir")
#: A short flag these commands add to the settings' common aliases (``--data``, ...).
METHOD_ALIAS = {"tokenization_method": ["--method"]}


def add_data_options(parser: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """Add the ``DATA_SETTINGS`` flags (all, or the settings named in ``only``)."""
    from lmtrain.cli import FLAG_ALIASES, add_setting_flags

    add_setting_flags(parser, [n for n in DATA_SETTINGS if not only or n in only],
                      {**FLAG_ALIASES, **METHOD_ALIAS})


def config_from(args: argparse.Namespace, **overrides: Any) -> TrainingConfig:
    """The TrainingConfig of a fresh run with these flags (env vars fill in the rest); a bad
    value is refused like the setting's env var."""
    from lmtrain.config import explicit_settings, load_fresh

    flags = {name: getattr(args, name) for name in DATA_SETTINGS if hasattr(args, name)}
    values, sources = explicit_settings(flags={**flags, **overrides})
    return load_fresh(values, sources).config


def register(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a data source into the cached token array",
        description="Tokenize a data source once (streamed, multi-threaded) into a uint16/uint32 "
                    "memory-mapped token array in the cache, keyed by the data's content and the "
                    "tokenizer. Training on the same data and tokenizer reuses it. Prints a JSON "
                    "summary.")
    add_data_options(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar [default: when stderr is a terminal]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.data.prepare import prepare_splits

    config = config_from(args)
    started = time.perf_counter()
    tokenizer, tokens, val = prepare_splits(config.data, progress=args.progress,
                                            allow_download=config.model.allow_download)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "path": str(tokens.path), "cached": tokens.cached, "n_tokens": tokens.meta["n_tokens"],
        "dtype": tokens.meta["dtype"], "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size, "source_bytes": tokens.meta["source_bytes"],
        "records": tokens.records,  # question/answer records (None: plain text)
        "validation": ({"path": str(val.path), "n_tokens": val.meta["n_tokens"]}
                       if val is not None else None),  # a dataset's own validation split
        "seconds": round(seconds, 3)}))
    return 0
