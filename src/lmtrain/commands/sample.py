"""``lmtrain sample CKPT``: generate text from a checkpoint, streaming tokens as they come."""

from __future__ import annotations

import argparse
import os
import sys

OPTIONS = [  # (flag, env twin, type, help)
    ("--prompt", "PROMPT", str, "text to continue [default: the run's PROMPT; 'QUESTION: ' for "
                                "gpt2, empty otherwise]"),
    ("--max-new-tokens", "MAX_NEW_TOKENS", int, "tokens to generate per sample [default: the "
                                                "run's]"),
    ("--temperature", "TEMPERATURE", float, "sampling temperature [default: the run's, 0.8]"),
    ("--top-k", "TOP_K", int, "sample from the k most likely tokens [default: the run's, 200]"),
    ("--top-p", "TOP_P", float, "sample from the most likely tokens holding this probability "
                                "mass [default: the run's, 1 = off]"),
    ("--seed", "SEED", int, "random seed of the sampler [default: the run's SEED]"),
    ("--device", "DEVICE", str, "auto | cpu | cuda | cuda:N | mps [default: auto]"),
    ("--base", "GPT2_MODEL_NAME", str, "where the GPT-2 base model lives now (folder or hub id) "
                                       "[default: where the run found it]"),
]


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a checkpoint",
        description="Generate text from a checkpoint, printing tokens as they are sampled. "
                    "Each option falls back to its environment variable, then to the run's "
                    "own setting.")
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    for flag, env, typ, text in OPTIONS:
        p.add_argument(flag, type=typ, default=None, help=f"{text} [env {env}]")
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a sample at the end-of-text token [default: the run's, on] "
                        "[env STOP_AT_EOT]")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples [default: 1]")
    p.set_defaults(func=run)


def _flag(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``."""
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _option(args: argparse.Namespace, flag: str, env: str, typ, fallback):
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None:
        return value
    raw = os.environ.get(env, "").strip()
    if raw:
        from lmtrain.errors import UserError

        try:
            return typ(raw)
        except ValueError:
            name = "boolean (1 or 0)" if typ is _flag else typ.__name__
            raise UserError(f"{env}={raw!r} is not a valid {name}") from None
    return fallback


def run(args: argparse.Namespace) -> int:
    import torch

    from lmtrain.config import check_value, flag_name
    from lmtrain.device import select_device
    from lmtrain.errors import UserError
    from lmtrain.generate import Sampling, default_prompt, start_context, stream_sample
    from lmtrain.healing import token_bytes
    from lmtrain.inference import load_trained_model

    device = select_device(_option(args, "--device", "DEVICE", str, "auto"))
    loaded = load_trained_model(args.checkpoint, device,
                                base=_option(args, "--base", "GPT2_MODEL_NAME", str, None))
    cfg, tok = loaded.config, loaded.tokenizer
    prompt = _option(args, "--prompt", "PROMPT", str,
                     default_prompt(cfg.generation, cfg.model_type))
    max_new = _option(args, "--max-new-tokens", "MAX_NEW_TOKENS", int, cfg.max_new_tokens)
    temperature = _option(args, "--temperature", "TEMPERATURE", float, cfg.temperature)
    top_k = _option(args, "--top-k", "TOP_K", int, cfg.top_k)
    top_p = _option(args, "--top-p", "TOP_P", float, cfg.top_p)
    stop_at_eot = _option(args, "--stop-at-eot", "STOP_AT_EOT", _flag, cfg.stop_at_eot)
    seed = _option(args, "--seed", "SEED", int, cfg.seed)
    for name, value in (("temperature", temperature), ("max_new_tokens", max_new),
                        ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        check_value(name, value, flag_name(name))  # the bounds of the training setting
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    sampling = Sampling(temperature, top_k, top_p, stop_at_eot)
    generator = torch.Generator().manual_seed(seed)
    start_context(tok, prompt)  # an unencodable prompt fails before any output
    table = token_bytes(tok)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        for piece in stream_sample(loaded.model, tok, prompt, max_new, cfg.block_size, device,
                                   sampling, generator, table):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
