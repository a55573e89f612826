"""``lmtrain prepare``: tokenize a data source once into the cached token array training uses."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtrain.config import TrainingConfig

#: (flag, setting) pairs: the data and tokenizer settings, each falling back to its env var.
DATA_OPTIONS = [
    ("--data", "training_data_source", "text file, folder, glob or .jsonl "
                                       "[env TRAINING_DATA_SOURCE; default: bundled corpus]"),
    ("--method", "tokenization_method", "character | gpt2 | custom_bpe "
                                        "[env TOKENIZATION_METHOD; default: character]"),
    ("--custom-vocab-size", "custom_vocab_size", "vocabulary size of the learned BPE "
                                                 "[env CUSTOM_VOCAB_SIZE; default: 1024]"),
    ("--text-field", "text_field", "field holding the text in .jsonl sources "
                                   "[env TEXT_FIELD; default: text]"),
    ("--train-split", "train_split", "fraction of the text a learned BPE trains on "
                                     "[env TRAIN_SPLIT; default: 0.9]"),
    ("--cache-dir", "cache_dir", "token-array cache [env CACHE_DIR; default: user cache]"),
]


def add_data_options(parser: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """Add the ``DATA_OPTIONS`` flags (all, or the settings named in ``only``)."""
    for flag, name, text in DATA_OPTIONS:
        if not only or name in only:
            parser.add_argument(flag, dest=name, default=None, help=text)


def config_from(args: argparse.Namespace, **overrides: Any) -> TrainingConfig:
    """The TrainingConfig of a fresh run with these flags (env vars fill in the rest)."""
    from lmtrain.config import explicit_settings, load_fresh

    flags = {name: getattr(args, name) for _, name, _ in DATA_OPTIONS
             if getattr(args, name, None) is not None}
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
    from lmtrain.data.prepare import prepare_tokens

    config = config_from(args)
    started = time.perf_counter()
    tokenizer, tokens = prepare_tokens(config, progress=args.progress)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "path": str(tokens.path), "cached": tokens.cached, "n_tokens": tokens.meta["n_tokens"],
        "dtype": tokens.meta["dtype"], "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size, "source_bytes": tokens.meta["source_bytes"],
        "seconds": round(seconds, 3)}))
    return 0
