"""Time one LoRA fine-tuning step of a GPT-2-small-shaped model: lmtrain's loop vs Hugging Face
``Trainer`` + ``peft``, on the same random weights, batch shape, LoRA and optimizer settings.

    python benchmarks/bench_lora.py            # GPT2Config() defaults: 124M parameters
    python benchmarks/bench_lora.py --quick    # a tiny model, a few steps (smoke run)

Prints one markdown table row; ratio = lmtrain time / Trainer time (below 1: lmtrain is faster).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "c_attn,c_proj,c_fc"}
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP, DROPOUT = 3e-4, 0.1, (0.9, 0.95), 1.0, 0.1


def save_random_gpt2(folder: Path, quick: bool, seed: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64) if quick else GPT2Config()
    GPT2LMHeadModel(config).save_pretrained(folder)


def random_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n, dtype=np.int64).astype(np.uint16)


def time_lmtrain(folder: Path, args: argparse.Namespace, tokens: np.ndarray) -> float:
    """Seconds per step through lmtrain's build_model + build_optimizer + run_training."""
    from lmtrain.config import TrainingConfig
    from lmtrain.data.dataset import TokenData
    from lmtrain.data.tokenizers import GPT2Tokenizer
    from lmtrain.device import autocast_dtype, select_device
    from lmtrain.models import build_model
    from lmtrain.train.loop import run_training
    from lmtrain.train.optim import build_optimizer
    from lmtrain.train.state import RunContext

    logging.getLogger("lmtrain").setLevel(logging.WARNING)
    total = args.warmup + args.steps
    cfg = TrainingConfig(
        model_type="gpt2", use_lora=True, gpt2_model_name=str(folder), tokenization_method="gpt2",
        block_size=args.block_size, batch_size=args.batch_size, learning_rate=LR,
        weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, dropout=DROPOUT, training_steps=total,
        warmup_steps=args.warmup, lr_decay_steps=total, enable_checkpoints=False,
        eval_interval=10**9, log_interval=10**9, precision=args.precision, device=args.device,
        seed=args.seed, **LORA)
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, 50257).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(
            config=cfg, model=model, optimizer=build_optimizer(model, cfg, device),
            tokenizer=GPT2Tokenizer(), data=TokenData.split(tokens, 0.9, cfg.block_size),
            device=device, sampler=torch.Generator().manual_seed(cfg.seed), run_name="bench",
            checkpoint_dir=Path(tmp), log_dir=Path(tmp),
            autocast_dtype=autocast_dtype(cfg.precision, device))
        run_training(ctx, 0, args.warmup)
        _sync(device)
        t0 = time.perf_counter()
        run_training(ctx, args.warmup, args.steps)
        _sync(device)
        return (time.perf_counter() - t0) / args.steps


def time_hf_trainer(folder: Path, args: argparse.Namespace, tokens: np.ndarray) -> float:
    """Seconds per step of the same LoRA fine-tuning through transformers.Trainer + peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    block, n = args.block_size, args.warmup + args.steps
    windows = torch.from_numpy(tokens.astype(np.int64))
    starts = torch.randint(len(windows) - block, (n * args.batch_size,),
                           generator=torch.Generator().manual_seed(args.seed))
    data = [{"input_ids": windows[s:s + block], "labels": windows[s:s + block]} for s in starts]
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.float32, use_cache=False,
        resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = get_peft_model(model, LoraConfig(
        r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["lora_targets"].split(","), fan_in_fan_out=True,
        task_type="CAUSAL_LM"))
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                _sync(model.device)
                marks["start"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == n:
                _sync(model.device)
                marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=n,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
            adam_beta2=BETAS[1], max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine",
            warmup_steps=args.warmup, logging_strategy="no", save_strategy="no",
            report_to=[], disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
            use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
            bf16=args.precision == "bf16")
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)  # keep the output to the table row
        trainer.train()
    return (marks["end"] - marks["start"]) / args.steps


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps [20; quick 4]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first [3]")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences [8; quick 2]")
    parser.add_argument("--block-size", type=int, default=None, help="tokens [128; quick 32]")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 20)
    args.batch_size = args.batch_size or (2 if args.quick else 8)
    args.block_size = args.block_size or (32 if args.quick else 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore", FutureWarning)
    hf_logging.disable_progress_bar()
    tokens = random_tokens(200_000, 50257, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        save_random_gpt2(folder, args.quick, args.seed)
        ours = time_lmtrain(folder, args, tokens)
        theirs = time_hf_trainer(folder, args, tokens)
    shape = "tiny (2x64)" if args.quick else "GPT-2 small (124M)"
    print("| model | batch x block | precision | device | lmtrain ms/step "
          "| HF Trainer ms/step | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {shape} LoRA r={LORA['lora_r']} | {args.batch_size} x {args.block_size} "
          f"| {args.precision} | {args.device} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} "
          f"| {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
