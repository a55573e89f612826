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
    parser.add_argument("--force", action="store_true",
                        help="replace a folder that is not empty (the whole folder is replaced "
                             "with this export; without --force such a folder is refused)")
    add_base_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import base_override
    from lmtrain.durable import atomic_folder
    from lmtrain.errors import UserError
    from lmtrain.inference import load_trained_model
    from lmtrain.models.export import export_adapter, export_model
    from lmtrain.models.gpt2 import quiet_transformers

    if not args.out_dir and not args.adapter:
        raise UserError("export: give OUT_DIR (the whole model), --adapter DIR, or both")
    if args.out_dir and args.adapter and _same_folder(args.out_dir, args.adapter):
        raise UserError(f"export: OUT_DIR and --adapter are one folder ({args.out_dir!r}); a "
                        f"folder holding both loads as base + adapter, not the merged model: "
                        f"give them two folders")
    with quiet_transformers():  # one load serves both exports
        loaded = load_trained_model(args.checkpoint, base=base_override(args))
    model, config, tokenizer = loaded.model, loaded.config.model, loaded.tokenizer
    step = loaded.checkpoint.step
    if args.adapter:  # first: the whole-model export merges the adapter in place
        with atomic_folder(args.adapter, "--adapter", force=args.force) as tmp:
            info = export_adapter(model, config, tokenizer, loaded.checkpoint.lora_base, tmp)
        print(f"exported the LoRA adapter of step {step} (base {info['base']}, "
              f"n_positions {info['n_positions']}) to {args.adapter}")
    if args.out_dir:
        with atomic_folder(args.out_dir, "OUT_DIR", force=args.force) as tmp:
            info = export_model(model, config, tokenizer, tmp)
        merged = ", LoRA merged" if info["lora_merged"] else ""
        print(f"exported step {step} ({info['model_type']}{merged}, {info['tokenizer']} "
              f"tokenizer, n_positions {info['n_positions']}) to {args.out_dir}")
    return 0


def _same_folder(a: str, b: str) -> bool:
    """Whether two folder names lead to one folder (it need not exist yet)."""
    from pathlib import Path

    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b
