"""``lmtrain eval CKPT``: loss and perplexity of a checkpoint over a whole validation split."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    from lmtrain.cli import add_base_flag, add_setting_flags

    p = sub.add_parser(
        "eval", help="loss and perplexity of a checkpoint over a whole split",
        description="Score every token of the validation split once (consecutive windows of "
                    "BLOCK_SIZE, not a sample of batches) and print the mean loss per token and "
                    "the perplexity. The split is the run's: a dataset's own validation split, "
                    "else the tokens after the TRAIN_SPLIT cut. A LOSS_ON=answers run is scored "
                    "on its answer tokens only, as it was trained.")
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    add_setting_flags(p, ["training_data_source", "text_field"], default_text="the run's")
    add_setting_flags(p, ["cache_dir", "device"])
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which split to score [default: val]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows scored at a time [default: the run's BATCH_SIZE]")
    add_base_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar [default: when stderr is a terminal]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import base_override, setting_value
    from lmtrain.data.prepare import load_token_data
    from lmtrain.device import autocast_context, autocast_dtype, select_device
    from lmtrain.errors import UserError
    from lmtrain.inference import load_trained_model
    from lmtrain.train.perplexity import perplexity, split_loss

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    device = select_device(setting_value(args, "device", "auto"))
    loaded = load_trained_model(args.checkpoint, device, base=base_override(args))
    cfg = loaded.config
    data_cfg = cfg.data.model_copy(update={  # the run's data settings, as this command sets them
        name: setting_value(args, name, fallback) for name, fallback in (
            ("training_data_source", cfg.data.training_data_source),
            ("text_field", cfg.data.text_field), ("cache_dir", None))})
    allow_download = setting_value(args, "allow_download", False)  # env only, as training
    _, data = load_token_data(data_cfg, loaded.tokenizer, block_size=cfg.model.block_size,
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
                        f"token to score" + (" after ANSWER_PREFIX" if mask is not None else ""))
    result = {"checkpoint": str(args.checkpoint), "step": loaded.checkpoint.step,
              "data": data_cfg.training_data_source, "split": args.split,
              "scored": "answers" if mask is not None else "all",
              "tokens": n_tokens, "loss": loss, "perplexity": perplexity(loss)}
    if args.json:
        print(json.dumps(result))
    else:
        what = "answer tokens (LOSS_ON=answers)" if mask is not None else "tokens"
        print(f"step {result['step']}, {args.split} split of {result['data']}: "
              f"{n_tokens:,} {what}, loss {loss:.4f}, perplexity {result['perplexity']:.2f}")
    return 0
