"""``lmtrain export CKPT [OUT_DIR] [--adapter DIR]``: a Hugging Face folder (LoRA merged,
tokenizer included) and/or a GPT-2 LoRA adapter in PEFT's layout."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmtrain.cli import add_base_flag

    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder or PEFT adapter",
        description="Write CKPT as a Hugging Face folder (GPT2LMHeadModel weights with any LoRA "
                    "adapter merged in, plus tokenizer files) that "
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR) and "
                    "AutoTokenizer.from_pretrained(OUT_DIR) load. Works for GPT-2 runs and for "
                    "from-scratch GPT runs with TOKENIZATION_METHOD=gpt2 or custom_bpe. With "
                    "--adapter DIR, write a GPT-2 LoRA checkpoint's adapter for "
                    "PeftModel.from_pretrained(base, DIR).")
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    parser.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default=None,
                        help="folder for the whole model (created if needed)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="folder for the LoRA adapter in PEFT's layout (created if needed)")
    add_base_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import base_override
    from lmtrain.errors import UserError
    from lmtrain.inference import load_trained_model
    from lmtrain.models.export import export_adapter, export_model
    from lmtrain.models.gpt2 import quiet_transformers

    if not args.out_dir and not args.adapter:
        raise UserError("export: give OUT_DIR (the whole model), --adapter DIR, or both")
    with quiet_transformers():  # one load serves both exports
        loaded = load_trained_model(args.checkpoint, base=base_override(args))
    model, config, tokenizer = loaded.model, loaded.config.model, loaded.tokenizer
    step = loaded.checkpoint.step
    if args.adapter:  # first: the whole-model export merges the adapter in place
        info = export_adapter(model, config, tokenizer, loaded.checkpoint.lora_base,
                              args.adapter)
        print(f"exported the LoRA adapter of step {step} (base {info['base']}, "
              f"n_positions {info['n_positions']}) to {info['out_dir']}")
    if args.out_dir:
        info = export_model(model, config, tokenizer, args.out_dir)
        merged = ", LoRA merged" if info["lora_merged"] else ""
        print(f"exported step {step} ({info['model_type']}{merged}, {info['tokenizer']} "
              f"tokenizer, n_positions {info['n_positions']}) to {info['out_dir']}")
    return 0
