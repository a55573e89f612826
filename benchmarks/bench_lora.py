"""Time one LoRA fine-tuning step of a GPT-2-small-shaped model: lmtrain's loop vs Hugging Face
``Trainer`` + ``peft``, on the same random weights, batch shape, LoRA and optimizer settings.

The two sides alternate step by step (the Trainer runs in a thread that waits for its turn), so
load from other processes falls on both alike; the first ``--warmup`` steps are not timed.

    python benchmarks/bench_lora.py            # GPT2Config() defaults: 124M parameters
    python benchmarks/bench_lora.py --quick    # a tiny model, a few steps (smoke run)

Prints one markdown table row; ratio = lmtrain time / Trainer time (below 1: lmtrain is faster),
as the ratio of the mean step times and as the median over adjacent pairs of steps (the pair
shares whatever load the machine had at that moment).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
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


class LmtrainSide:
    """lmtrain's build_model + build_optimizer + run_training, one step at a time."""

    def __init__(self, folder: Path, args: argparse.Namespace, tokens: np.ndarray,
                 tmp: Path) -> None:
        from lmtrain.config import TrainingConfig
        from lmtrain.data.dataset import TokenData
        from lmtrain.data.tokenizers import GPT2Tokenizer
        from lmtrain.device import autocast_dtype, select_device
        from lmtrain.models import build_model
        from lmtrain.progress import TrainProgress
        from lmtrain.train.checkpointing import Checkpointer
        from lmtrain.train.frozen import store_frozen_base_in
        from lmtrain.train.optim import build_optimizer
        from lmtrain.train.state import Components, LiveRun, LoopSettings, Placement, RunServices

        logging.getLogger("lmtrain").setLevel(logging.WARNING)
        total = args.warmup + args.steps
        cfg = TrainingConfig.from_flat(
            model_type="gpt2", use_lora=True, gpt2_model_name=str(folder),
            tokenization_method="gpt2", block_size=args.block_size, batch_size=args.batch_size,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, dropout=DROPOUT,
            training_steps=total, warmup_steps=args.warmup, lr_decay_steps=total,
            enable_checkpoints=False, eval_interval=10**9, log_interval=10**9,
            precision=args.precision, device=args.device, seed=args.seed,
            optimizer="adamw", **LORA)  # the Trainer's optimizer (lmtrain's default is Muon)
        device = select_device(cfg.run.device)
        torch.manual_seed(cfg.optimization.seed)
        model = build_model(cfg.model, 50257).to(device)
        dtype = autocast_dtype(cfg.run.precision, device)
        if not args.without_speedups:  # as the session does (lmtrain.train.build.prepare_run)
            store_frozen_base_in(model, dtype)
        parts = Components(
            model=model, optimizer=build_optimizer(model, cfg.optimization, device),
            tokenizer=GPT2Tokenizer(), data=TokenData.split(tokens, 0.9, cfg.model.block_size),
            placement=Placement(device, precision=dtype))
        progress = TrainProgress(torch.Generator().manual_seed(cfg.optimization.seed))
        self.run = LiveRun(parts, progress, LoopSettings.of(cfg),
                           RunServices(Checkpointer(cfg, "bench", tmp)))
        self.device = device

    def run_step(self) -> float:
        from lmtrain.train.loop import run_training

        _sync(self.device)
        t0 = time.perf_counter()
        run_training(*self.run, 1)
        _sync(self.device)
        return time.perf_counter() - t0


class TrainerSide:
    """transformers.Trainer + peft running in a thread of its own, one step per go-ahead."""

    def __init__(self, folder: Path, args: argparse.Namespace, tokens: np.ndarray,
                 tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        block, n = args.block_size, args.warmup + args.steps
        windows = torch.from_numpy(tokens.astype(np.int64))
        starts = torch.randint(len(windows) - block, (n * args.batch_size,),
                               generator=torch.Generator().manual_seed(args.seed))
        data = [{"input_ids": windows[s:s + block], "labels": windows[s:s + block]}
                for s in starts]
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32, use_cache=False,
            resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
        model = get_peft_model(model, LoraConfig(
            r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
            target_modules=LORA["lora_targets"].split(","), fan_in_fan_out=True,
            task_type="CAUSAL_LM"))
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.seconds: list[float] = []
        self.error: BaseException | None = None
        side = self

        class Gate(TrainerCallback):  # each step waits for the go-ahead and reports its time
            def on_step_begin(self, targs, state, control, **kw):
                side.go.acquire()
                _sync(model.device)
                side.t0 = time.perf_counter()

            def on_step_end(self, targs, state, control, **kw):
                _sync(model.device)
                side.seconds.append(time.perf_counter() - side.t0)
                side.done.release()

        targs = TrainingArguments(
            output_dir=str(tmp), per_device_train_batch_size=args.batch_size, max_steps=n,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
            adam_beta2=BETAS[1], max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine",
            warmup_steps=args.warmup, logging_strategy="no", save_strategy="no",
            report_to=[], disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
            use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
            bf16=args.precision == "bf16")
        self.trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Gate()])
        self.trainer.remove_callback(PrinterCallback)  # keep the output to the table
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as exc:  # reported by run_step
            self.error = exc
            self.done.release()

    def run_step(self) -> float:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("transformers.Trainer failed") from self.error
        return self.seconds[-1]


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
    parser.add_argument("--without-speedups", action="store_true",
                        help="lmtrain as before its LoRA speed-ups: loss from the full logits, "
                             "frozen base re-cast by autocast at every step")
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
    if args.without_speedups:
        import lmtrain.train.evaluate

        lmtrain.train.evaluate.chunked_lm_loss = lambda *a: None
    tokens = random_tokens(200_000, 50257, args.seed)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        save_random_gpt2(folder, args.quick, args.seed)
        lmtrain = LmtrainSide(folder, args, tokens, Path(tmp))
        trainer = TrainerSide(folder, args, tokens, Path(tmp))
        for i in range(args.warmup + args.steps):  # alternate, and alternate who goes first
            pair = (lmtrain.run_step(), trainer.run_step()) if i % 2 == 0 else (
                tuple(reversed((trainer.run_step(), lmtrain.run_step()))))
            if i >= args.warmup:
                ours.append(pair[0])
                theirs.append(pair[1])
        trainer.thread.join()
    shape = "tiny (2x64)" if args.quick else "GPT-2 small (124M)"
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    print("| model | batch x block | precision | device (threads) | lmtrain ms/step "
          "| HF Trainer ms/step | ratio (means) | ratio (median of step pairs) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    loss = " (without speed-ups)" if args.without_speedups else ""
    print(f"| {shape} LoRA r={LORA['lora_r']}{loss} | {args.batch_size} x {args.block_size} "
          f"| {args.precision} | {args.device} ({threads}) | {_ms(ours)} | {_ms(theirs)} "
          f"| {statistics.mean(ours) / statistics.mean(theirs):.2f} "
          f"| {statistics.median(a / b for a, b in zip(ours, theirs, strict=True)):.2f} |")


def _ms(seconds: list[float]) -> str:
    """Mean ± standard deviation in milliseconds."""
    spread = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
    return f"{statistics.mean(seconds) * 1e3:.0f} ± {spread * 1e3:.0f}"

if __name__ == "__main__":
    main()
