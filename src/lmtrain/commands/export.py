"""``lmtrain export CKPT OUT_DIR``: a Hugging Face folder (LoRA merged, tokenizer included)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder",
        description="Write CKPT as a Hugging Face folder (GPT2LMHeadModel weights with any LoRA "
                    "adapter merged in, plus tokenizer files) that "
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR) and "
                    "AutoTokenizer.from_pretrained(OUT_DIR) load. Works for GPT-2 runs and for "
                    "from-scratch GPT runs with TOKENIZATION_METHOD=gpt2 or custom_bpe.")
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt checkpoint written by lmtrain")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if needed)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.models.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out_dir)
    merged = ", LoRA merged" if info["lora_merged"] else ""
    print(f"exported step {info['step']} ({info['model_type']}{merged}, {info['tokenizer']} "
          f"tokenizer) to {info['out_dir']}")
    return 0
