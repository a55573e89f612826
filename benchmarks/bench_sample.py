"""Sampling speed: tokens/s for 256 new tokens, lmtrain's sampler vs ``model.generate`` of the
exported Hugging Face model, same weights, prompt and settings, one run each.

    python benchmarks/bench_sample.py            # GPT-2 small (124M) and a 6x384 from-scratch GPT
    python benchmarks/bench_sample.py --quick    # tiny models (smoke run)

Greedy decoding must give the same ids on both sides (checked). Sampling draws from different
generators, so only its speed compares. End of text does not stop either side.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

PROMPT = "QUESTION: What is the capital of France? ANSWER:"
TEMPERATURE, TOP_K = 0.8, 200


def models(quick: bool, seed: int, device: torch.device
           ) -> list[tuple[str, nn.Module, nn.Module, int]]:
    """(name, lmtrain model, exported HF model, block size) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtrain.config import TrainingConfig
    from lmtrain.data.tokenizers import GPT2Tokenizer
    from lmtrain.models import build_model
    from lmtrain.models.export import to_hf_model

    torch.manual_seed(seed)
    shape = GPT2Config(n_layer=2, n_embd=64, n_head=2) if quick else GPT2Config()
    gpt2 = GPT2LMHeadModel(shape).eval()  # lmtrain fine-tunes this class as is
    exported = to_hf_model(gpt2, TrainingConfig.from_flat(model_type="gpt2").model, GPT2Tokenizer())
    layers, width = (2, 64) if quick else (6, 384)
    cfg = TrainingConfig.from_flat(n_layer=layers, n_head=6 if not quick else 2, n_embd=width,
                         block_size=512, dropout=0.0, tokenization_method="gpt2")
    gpt = build_model(cfg.model, 50257).eval()
    gpt_hf = to_hf_model(gpt, cfg.model, GPT2Tokenizer()).eval()
    name = "tiny GPT-2 (2x64)" if quick else "GPT-2 small (124M)"
    return [(name, gpt2.to(device), exported.to(device), 1024),
            (f"from-scratch GPT {layers}x{width}", gpt.to(device), gpt_hf.to(device),
             cfg.model.block_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_lmtrain(model: nn.Module, ids: list[int], n: int, block: int, greedy: bool,
                 seed: int, device: torch.device) -> tuple[float, list[int]]:
    from lmtrain.config import GenerationSettings
    from lmtrain.generate import sample_tokens

    gen = torch.Generator().manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    sampling = GenerationSettings(max_new_tokens=n, temperature=TEMPERATURE,
                                  top_k=1 if greedy else TOP_K)
    out = list(sample_tokens(model, ids, sampling, block, device, gen))
    _sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def time_hf(model: nn.Module, ids: list[int], n: int, greedy: bool,
            seed: int, device: torch.device) -> tuple[float, list[int]]:
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": 1.0}
    inputs = torch.tensor([ids], device=device)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                         min_new_tokens=n, do_sample=not greedy, eos_token_id=None,
                         pad_token_id=0, use_cache=True, **sampling)
    _sync(device)
    return time.perf_counter() - t0, out[0, len(ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    from lmtrain.data.tokenizers import GPT2Tokenizer

    hf_logging.set_verbosity_error()
    ids = GPT2Tokenizer().encode(PROMPT)
    n = args.new_tokens
    device = torch.device(args.device)
    where = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else (
        torch.cuda.get_device_name(device))
    print(f"{n} new tokens, fp32, {where}, torch {torch.__version__}\n")
    print("| model | decoding | lmtrain tok/s | HF generate tok/s | ratio | same ids |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, ours, theirs, block in models(args.quick, args.seed, device):
        time_lmtrain(ours, ids, 8, block, False, args.seed, device)  # warm up both sides
        time_hf(theirs, ids, 8, False, args.seed, device)
        for greedy in (True, False):
            t_ours, ids_ours = time_lmtrain(ours, ids, n, block, greedy, args.seed, device)
            t_hf, ids_hf = time_hf(theirs, ids, n, greedy, args.seed, device)
            same = ("yes" if ids_ours == ids_hf else "NO") if greedy else "n/a"
            print(f"| {name} | {'greedy' if greedy else f'top-k {TOP_K}, T {TEMPERATURE}'} "
                  f"| {n / t_ours:.1f} | {n / t_hf:.1f} | {t_hf / t_ours:.2f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
