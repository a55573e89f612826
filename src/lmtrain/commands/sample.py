"""``lmtrain sample CKPT``: generate text from a checkpoint, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

from lmtrain.config import GenerationSettings

#: The run's settings a sample may change: the generation group and the seed. Their flags,
#: help and bounds come from the settings' own fields; each falls back to its env var, then to
#: the value the run was trained with.
SAMPLE_SETTINGS = (*GenerationSettings.model_fields, "seed")


def register(sub) -> None:
    from lmtrain.cli import add_base_flag, add_setting_flags

    p = sub.add_parser(
        "sample", help="generate text from a checkpoint",
        description="Generate text from a checkpoint, printing tokens as they are sampled. "
                    "Each setting falls back to its environment variable, then to the run's "
                    "own value (a GPT-2 run's prompt: 'QUESTION: ').")
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    add_setting_flags(p, SAMPLE_SETTINGS, default_text="the run's")
    add_setting_flags(p, ["device"])
    add_base_flag(p)
    p.add_argument("--num-samples", type=int, default=1, help="how many samples [default: 1]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lmtrain.cli import base_override, setting_value
    from lmtrain.device import select_device
    from lmtrain.errors import UserError
    from lmtrain.generate import default_prompt, start_context, stream_sample
    from lmtrain.healing import token_bytes
    from lmtrain.inference import load_trained_model

    device = select_device(setting_value(args, "device", "auto"))
    base = base_override(args)
    loaded = load_trained_model(args.checkpoint, device, base=base)
    cfg, tok = loaded.config, loaded.tokenizer
    run_values = {**cfg.generation.model_dump(), "seed": cfg.optimization.seed,
                  "prompt": default_prompt(cfg.generation, cfg.model.model_type)}
    value = {name: setting_value(args, name, run_values[name]) for name in SAMPLE_SETTINGS}
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    prompt = value["prompt"]
    sampling = GenerationSettings(**{name: value[name] for name in GenerationSettings.model_fields})
    generator = torch.Generator().manual_seed(value["seed"])
    start_context(tok, prompt)  # an unencodable prompt fails before any output
    table = token_bytes(tok)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        for piece in stream_sample(loaded.model, tok, prompt, sampling, cfg.model.block_size,
                                   device, generator, table):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
