"""Guard: lmtrain's bf16 LoRA step is not pathologically slower than the same step written
plainly under autocast (issue 28: a timed "step" that was 28x the Trainer's).

In one process, on the same random GPT-2 weights and LoRA settings, it alternates lmtrain's
training loop (``run_training`` for one step, exactly as ``bench_lora.py`` times it) with a
plain step: ``peft`` LoRA on the fp32 model, ``torch.autocast`` bf16, the loss from the model's
logits, backward, clipping, AdamW. It fails (exit 1) with the environment printed when the median
over adjacent pairs of lmtrain's time / the plain time exceeds ``--limit`` (1.5). Not a timed
test: the limit is far below a pathology (issue 28's step, ``--quick --threads 1``: 17x with
``--eval-iters 50``, 4.9x with 20) and above what a sound step gives (0.34-0.37 at one thread;
up to 1.25 at two threads on a 2-core machine with load 8, where OpenMP threads wait on each
other: see docs/benchmarks.md).

    python benchmarks/guard_lora_step.py            # a small model (2 x 256), 10 step pairs
    python benchmarks/guard_lora_step.py --quick    # tiny sizes (the test suite's smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench_lora import (
    BETAS,
    DROPOUT,
    GRAD_CLIP,
    LORA,
    LR,
    WEIGHT_DECAY,
    LmtrainSide,
    random_tokens,
    save_random_gpt2,
)
from environment import print_environment

#: The guard's model: GPT-2's vocabulary and output layer (where lmtrain's fused loss works)
#: with a small body, so a step takes a fraction of a second on two CPU cores
SHAPE = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_positions": 128}
QUICK_SHAPE = {"n_layer": 1, "n_embd": 128, "n_head": 2, "n_positions": 64}


class PlainSide:
    """The same LoRA step written plainly: autocast around the model's own loss."""

    def __init__(self, folder: Path, args: argparse.Namespace, tokens: np.ndarray) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32, use_cache=False,
            resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
        self.model = get_peft_model(model, LoraConfig(
            r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
            target_modules=LORA["lora_targets"].split(","), fan_in_fan_out=True,
            task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=BETAS,
                                           weight_decay=WEIGHT_DECAY)
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.generator = torch.Generator().manual_seed(args.seed)
        self.batch_size, self.block_size = args.batch_size, args.block_size
        self.device = torch.device(args.device)

    def run_step(self) -> float:
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,),
                               generator=self.generator)
        x = torch.stack([self.tokens[s:s + self.block_size] for s in starts]).to(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step is done (lmtrain's loop also reads its loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """(lmtrain seconds, plain seconds) per timed step, the two sides alternating."""
    tokens = random_tokens(50_000, 50257, args.seed)
    ours: list[float] = []
    plain: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        save_random_gpt2(folder, False, args.seed, QUICK_SHAPE if args.quick else SHAPE)
        lmtrain = LmtrainSide(folder, args, tokens, Path(tmp))
        reference = PlainSide(folder, args, tokens)
        for i in range(args.warmup + args.steps):  # alternate who goes first
            if i % 2 == 0:
                pair = (lmtrain.run_step(), reference.run_step())
            else:
                theirs = reference.run_step()
                pair = (lmtrain.run_step(), theirs)
            if i >= args.warmup:
                ours.append(pair[0])
                plain.append(pair[1])
    return ours, plain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed step pairs [8; quick 5]")
    parser.add_argument("--warmup", type=int, default=2, help="untimed step pairs first [2]")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences [8; quick 4]")
    parser.add_argument("--block-size", type=int, default=None, help="tokens [128; quick 64]")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--limit", type=float, default=1.5,
                        help="the largest lmtrain / plain ratio that passes [1.5]")
    parser.add_argument("--eval-iters", type=int, default=0,
                        help="lmtrain evaluates this many batches per split after each step "
                             "(reproduces issue 28; the guard must then fail) [0]")
    args = parser.parse_args()
    args.steps = args.steps or (5 if args.quick else 8)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.block_size = args.block_size or (64 if args.quick else 128)
    args.precision, args.without_speedups = "bf16", False  # what LmtrainSide reads
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    ours, plain = measure(args)
    pairs = [a / b for a, b in zip(ours, plain, strict=True)]
    ratio = statistics.median(pairs)
    summary = (f"lmtrain {statistics.median(ours) * 1e3:.0f} ms/step, plain autocast "
               f"{statistics.median(plain) * 1e3:.0f} ms/step (medians of {len(pairs)}); "
               f"lmtrain / plain = {ratio:.2f} (median of step pairs; limit {args.limit})")
    if ratio > args.limit:
        print_environment()
        print(f"FAIL: lmtrain's bf16 LoRA step is {ratio:.1f}x the same step under plain "
              f"autocast (limit {args.limit}x): {summary}", file=sys.stderr)
        return 1
    print(f"ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
