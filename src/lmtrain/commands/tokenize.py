"""``lmtrain tokenize``: text to token ids (a JSON list) or, with ``--decode``, ids to text."""

from __future__ import annotations

import argparse
import json
import sys

from lmtrain.commands.prepare import add_data_options, config_from


def register(sub) -> None:
    p = sub.add_parser(
        "tokenize", help="encode text to token ids, or decode ids with --decode",
        description="Encode TEXT (or stdin) and print the ids as a JSON list; with --decode, read "
                    "a JSON list of ids and print the text. The tokenizer is a run's "
                    "(--checkpoint) or the one a fresh training run with these settings would "
                    "use (--method / TOKENIZATION_METHOD: GPT-2's, or one learned from --data).")
    p.add_argument("text", metavar="TEXT", nargs="?", default=None,
                   help="text to encode, or ids to decode (default: read stdin)")
    p.add_argument("--decode", action="store_true", help="TEXT is a JSON list of ids")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="use the tokenizer saved in this checkpoint")
    add_data_options(p)
    p.set_defaults(func=run)


def load_tokenizer(args: argparse.Namespace):
    """The checkpoint's tokenizer, or the one a fresh run with these settings would use."""
    if args.checkpoint:
        from lmtrain.checkpoint import load_run
        from lmtrain.data.tokenizers import saved_tokenizer

        return saved_tokenizer(load_run(args.checkpoint, label="--checkpoint"))
    from lmtrain.data.prepare import tokenizer_for

    config = config_from(args)
    return tokenizer_for(config.data, config.model.allow_download)


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """A JSON list of ids, each checked to lie inside the vocabulary."""
    from lmtrain.errors import UserError

    try:
        ids = json.loads(text)
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise UserError("tokenize --decode: give the ids as a JSON list, e.g. '[15496, 995]'")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"tokenize --decode: ids {bad[:10]} are outside the vocabulary "
                        f"(0..{vocab_size - 1})")
    return ids


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text in (None, "-") else args.text
    tokenizer = load_tokenizer(args)
    if not args.decode and hasattr(tokenizer, "check_known"):  # a character vocabulary
        vocabulary = ("the checkpoint's vocabulary" if args.checkpoint
                      else "the vocabulary learned from the data")
        tokenizer.check_known(text, where="TEXT", vocabulary=vocabulary,
                              advice="remove them, or use a tokenizer that knows them "
                                     "(--checkpoint, --method)")
    if args.decode:
        sys.stdout.write(tokenizer.decode(parse_ids(text, tokenizer.vocab_size)) + "\n")
    else:
        print(json.dumps(tokenizer.encode(text)))
    return 0
