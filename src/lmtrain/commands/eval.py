"""``lmtrain eval CKPT``: loss and perplexity of a checkpoint over a whole validation split, or
with ``--answers`` the exact-match accuracy of its greedy answers to held-out questions."""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The run's data settings ``eval`` may change (each defaults to the run's own value).
DATA_SETTINGS = ["training_data_source", "text_field", "data_format", "qa_template",
                 "answer_prefix", "drop_unknown_chars"]


def register(sub) -> None:
    from lmtrain.cli import add_base_flag, add_setting_flags

    p = sub.add_parser(
        "eval", help="loss and perplexity of a checkpoint over a whole split, or its answers",
        description="Score every token of the validation split once (consecutive windows of "
                    "BLOCK_SIZE, not a sample of batches) and print the mean loss per token and "
                    "the perplexity. The split is the run's: a dataset's own validation split, "
                    "else the tokens after the TRAIN_SPLIT cut (for question/answer records, "
                    "the records after it). A run whose loss is on answers is scored on its "
                    "answer tokens only, as it was trained. With --answers, answer every "
                    "held-out question greedily instead (the run's validation records, or "
                    "every question of --data FILE) and print the exact-match accuracy.")
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    add_setting_flags(p, DATA_SETTINGS, default_text="the run's")
    add_setting_flags(p, ["cache_dir", "device"])
    p.add_argument("--answers", action="store_true",
                   help="exact-match accuracy of greedy answers to the held-out questions: the "
                        "run's validation records, or every question of --data FILE (records "
                        "of any format, detected unless --data-format says, or plain-text lines "
                        "holding ANSWER_PREFIX)")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which split to score [default: val]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows scored (questions answered) at a time [default: the run's "
                        "BATCH_SIZE; 64 questions]")
    p.add_argument("--examples", type=int, default=5,
                   help="--answers: wrong answers shown [default: 5]")
    add_base_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar [default: when stderr is a terminal]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import base_override, setting_value
    from lmtrain.device import select_device
    from lmtrain.errors import UserError
    from lmtrain.inference import load_trained_model

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.answers and args.split != "val":
        raise UserError("--answers answers the held-out questions; leave out --split")
    device = select_device(setting_value(args, "device", "auto"))
    loaded = load_trained_model(args.checkpoint, device, base=base_override(args))
    result = (_answers(args, loaded, device) if args.answers
              else _loss(args, loaded, device))
    if args.json:
        print(json.dumps(result))
    return 0


def _data_settings(args: argparse.Namespace, loaded):
    """The run's data settings, as this command's flags (or their env vars) change them."""
    from pydantic import ValidationError

    from lmtrain.cli import setting_value
    from lmtrain.errors import UserError

    run = loaded.config.data
    fallback = {name: getattr(run, name) for name in DATA_SETTINGS} | {"cache_dir": None}
    changes = {name: setting_value(args, name, value) for name, value in fallback.items()}
    try:  # checked together, as training checks them (a QA_TEMPLATE's placeholders, ...)
        return loaded.config.replace(**changes).data
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str((err.get("loc") or ("",))[-1])
        shown = f"{name.upper()}={changes.get(name)!r}" if name in changes else "the settings"
        raise UserError(f"{shown} is invalid: {err['msg'].removeprefix('Value error, ')}"
                        ) from None


def _tokenizer(loaded, data_cfg):
    """The run's tokenizer, dropping unknown characters when DROP_UNKNOWN_CHARS says so."""
    if not data_cfg.drop_unknown_chars:
        return loaded.tokenizer
    from lmtrain.data.tokenizers import saved_tokenizer

    return saved_tokenizer(loaded.checkpoint, drop_unknown=True)


def _loss(args: argparse.Namespace, loaded, device) -> dict[str, Any]:
    """Loss and perplexity over a whole split (printed unless ``--json``)."""
    from lmtrain.cli import setting_value
    from lmtrain.data.prepare import load_token_data
    from lmtrain.device import autocast_context, autocast_dtype
    from lmtrain.errors import UserError
    from lmtrain.train.perplexity import perplexity, split_loss

    cfg = loaded.config
    data_cfg = _data_settings(args, loaded)
    allow_download = setting_value(args, "allow_download", False)  # env only, as training
    _, data = load_token_data(data_cfg, _tokenizer(loaded, data_cfg),
                              block_size=cfg.model.block_size,
                              allow_download=allow_download)
    tokens, mask = (data.val, data.val_mask) if args.split == "val" else (data.train,
                                                                           data.train_mask)
    autocast = autocast_context(device, autocast_dtype(cfg.run.precision, device, loaded.model))
    loss, n_tokens = split_loss(loaded.model, tokens, cfg.model.block_size,
                                args.batch_size or cfg.optimization.batch_size, device,
                                autocast, mask,
                                progress=args.progress)
    if n_tokens == 0:
        raise UserError(f"the {args.split} split of {data_cfg.training_data_source!r} has no "
                        f"token to score" + (" in an answer" if mask is not None else ""))
    result = {"checkpoint": str(args.checkpoint), "step": loaded.checkpoint.step,
              "data": data_cfg.training_data_source, "split": args.split,
              "scored": "answers" if mask is not None else "all",
              "tokens": n_tokens, "loss": loss, "perplexity": perplexity(loss)}
    if not args.json:
        what = "answer tokens (LOSS_ON=answers)" if mask is not None else "tokens"
        print(f"step {result['step']}, {args.split} split of {result['data']}: "
              f"{n_tokens:,} {what}, loss {loss:.4f}, perplexity {result['perplexity']:.2f}")
    return result


def _answers(args: argparse.Namespace, loaded, device) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers (printed unless ``--json``)."""
    from lmtrain.answers import BATCH_SIZE, QAPair, answer_accuracy
    from lmtrain.cli import setting_value
    from lmtrain.data.prepare import open_record_streams, source_questions
    from lmtrain.data.qa_source import HeldOut, HeldOutSource
    from lmtrain.data.tokenizers import document_separator
    from lmtrain.errors import UserError

    data_cfg = _data_settings(args, loaded)
    allow_download = setting_value(args, "allow_download", False)
    end_of_text = document_separator(loaded.tokenizer)
    given = setting_value(args, "training_data_source", None) is not None
    if given:  # every question of the file, in whichever format it holds
        fmt = setting_value(args, "data_format", "auto")
        held = HeldOut(source_questions(data_cfg.model_copy(update={"data_format": fmt}),
                                        end_of_text, allow_download))
    else:
        held = HeldOutSource(lambda: open_record_streams(data_cfg, allow_download),
                             data_cfg.train_split).get(end_of_text)
    where = "every question" if given else "validation records"
    if not held.questions:
        source = f"TRAINING_DATA_SOURCE={data_cfg.training_data_source!r}"
        if held.seen:
            raise UserError(f"{source}: all {held.seen} questions of its validation records "
                            f"are also asked in its training records, so none is held out; "
                            f"give unseen questions with --data FILE")
        raise UserError(f"{source}: no question to answer in "
                        f"{'the file' if given else 'its validation records'}")
    report = answer_accuracy(loaded.model, _tokenizer(loaded, data_cfg),
                             [QAPair(q.prompt, q.answer) for q in held.questions],
                             device=device, block_size=loaded.config.model.block_size,
                             batch_size=args.batch_size or BATCH_SIZE,
                             examples=args.examples, progress=args.progress)
    result = {"checkpoint": str(args.checkpoint), "step": loaded.checkpoint.step,
              "data": data_cfg.training_data_source, "split": "all" if given else "val",
              "questions": report.total, "correct": report.correct,
              "accuracy": report.accuracy, "percent": round(report.percent, 2),
              "seen_in_training": held.seen, "seconds": round(report.seconds, 3),
              "wrong": [{"prompt": w.prompt, "expected": w.expected, "got": w.got}
                        for w in report.wrong]}
    if not args.json:
        left_out = (f" ({held.seen} also asked in training, left out)" if held.seen else "")
        print(f"step {result['step']}, {where} of {result['data']}{left_out}: "
              f"{report.summary()}")
        for line in report.lines()[1:]:
            print(line)
    return result
