"""``lmtrain eval CKPT``: loss and perplexity of a checkpoint over a whole validation split."""

from __future__ import annotations

import argparse
import json
import os


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="loss and perplexity of a checkpoint over a whole split",
        description="Score every token of the validation split once (consecutive windows of "
                    "BLOCK_SIZE, not a sample of batches) and print the mean loss per token and "
                    "the perplexity. The split is the run's: a dataset's own validation split, "
                    "else the tokens after the TRAIN_SPLIT cut. A LOSS_ON=answers run is scored "
                    "on its answer tokens only, as it was trained.")
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    p.add_argument("--data", metavar="SOURCE", default=None,
                   help="data source to score [default: the run's TRAINING_DATA_SOURCE]")
    p.add_argument("--text-field", default=None,
                   help="column / field of the text in dataset and .jsonl sources "
                        "[env TEXT_FIELD; default: the run's]")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which split to score [default: val]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows scored at a time [default: the run's BATCH_SIZE]")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps "
                                                  "[env DEVICE; default: auto]")
    p.add_argument("--cache-dir", default=None,
                   help="token-array cache [env CACHE_DIR; default: user cache]")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="where the GPT-2 base model lives now (folder or hub id) "
                        "[env GPT2_MODEL_NAME; default: the run's]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def run(args: argparse.Namespace) -> int:
    from lmtrain.config import check_value
    from lmtrain.data.prepare import load_token_data
    from lmtrain.device import autocast_dtype, select_device
    from lmtrain.errors import UserError
    from lmtrain.inference import load_trained_model
    from lmtrain.perplexity import perplexity, split_loss

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    device = select_device(args.device or _env("DEVICE") or "auto")
    loaded = load_trained_model(args.checkpoint, device,
                                base=args.base or _env("GPT2_MODEL_NAME"))
    cfg = loaded.config
    data_cfg = cfg.data.model_copy(update={
        "training_data_source": args.data or cfg.training_data_source,
        "text_field": args.text_field or _env("TEXT_FIELD") or cfg.text_field,
        "cache_dir": args.cache_dir or _env("CACHE_DIR"),
    })
    allow_download = check_value("allow_download", _env("ALLOW_DOWNLOAD") or False,
                                 "ALLOW_DOWNLOAD")  # read as training reads it
    _, data = load_token_data(data_cfg, loaded.tokenizer, block_size=cfg.block_size,
                              allow_download=allow_download)
    tokens, mask = (data.val, data.val_mask) if args.split == "val" else (data.train,
                                                                           data.train_mask)
    dtype = autocast_dtype(cfg.precision, device, loaded.model)
    autocast = None
    if dtype is not None:
        import torch

        autocast = torch.autocast(device_type=device.type, dtype=dtype)
    loss, n_tokens = split_loss(loaded.model, tokens, cfg.block_size,
                                args.batch_size or cfg.batch_size, device, autocast, mask)
    if n_tokens == 0:
        raise UserError(f"the {args.split} split of {data_cfg.training_data_source!r} has no "
                        f"token to score" + (" after ANSWER_PREFIX" if mask is not None else ""))
    result = {"checkpoint": str(args.checkpoint), "step": int(loaded.checkpoint["step"]),
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
