"""What a model, its optimizer and one batch need in memory, estimated from the settings before
anything is allocated, and refused in one line naming the setting and the estimate when the
device cannot hold it (instead of an allocator error, or a machine swapping to a halt).

The estimate is deliberately low (fp32 weights, gradients and AdamW's two moments; a LoRA base
in bf16; activations of one micro-batch at 8 values per width, layer and token, about half of
what a transformer block keeps for its backward pass, or one per layer with gradient
checkpointing; no attention matrices): a run it refuses could never fit, and one it lets
through may still be tight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmtrain.config import ModelSettings
from lmtrain.errors import UserError

FP32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by purpose."""

    weights: int
    training_state: int  # gradients and optimizer moments of the trained weights
    activations: int  # one micro-batch's, forward and backward

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations


def parameter_count(model: ModelSettings, vocab_size: int) -> int:
    """About how many weights the model has (the GPT and GPT-2 layouts; the bigram model)."""
    width, layers = model.n_embd, model.n_layer
    if layers == 0:  # the bigram model: one vocab x vocab table
        return vocab_size * vocab_size
    return layers * 12 * width * width + (vocab_size + model.block_size) * width


def estimate(model: ModelSettings, vocab_size: int, batch_size: int = 0,
             training: bool = True, shards: int = 1) -> MemoryEstimate:
    """The memory a run (``training``) or a sampler of this model needs; ``batch_size``
    sequences of ``BLOCK_SIZE`` tokens per micro-batch; ``shards``: the processes that share
    the gradients and optimizer state (``PARALLEL=fsdp``; the whole model is built first)."""
    params = parameter_count(model, vocab_size)
    trained = 0
    if training:
        trained = params if not model.use_lora else params // 100  # adapters: a small part
    tokens = batch_size * model.block_size
    layers = max(model.n_layer, 1)
    kept = layers + 8 if model.gradient_checkpointing else 8 * layers  # values per width
    weight_bytes = 2 if model.use_lora else FP32  # a LoRA base may be kept in bf16
    return MemoryEstimate(weights=weight_bytes * params,
                          training_state=3 * FP32 * trained // max(shards, 1),
                          activations=FP32 * tokens * kept * model.n_embd if training else 0)


def expected_vocab_size(model: ModelSettings, tokenization: str, custom_vocab_size: int) -> int:
    """The vocabulary a fresh run will have, before its data is read (characters: at least
    the 256 of one byte's worth; a learned BPE: at most ``CUSTOM_VOCAB_SIZE``)."""
    if model.model_type == "gpt2" or tokenization == "gpt2":
        return 50257
    return custom_vocab_size if tokenization == "custom_bpe" else 256


def device_memory(device_type: str, index: int | None = None) -> int | None:
    """The memory of the device (the machine's RAM for ``cpu``), or ``None`` if unknown."""
    if device_type == "cuda":
        import torch

        try:
            return int(torch.cuda.get_device_properties(index or 0).total_memory)
        except (RuntimeError, AssertionError, AttributeError):
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: int) -> str:
    """``n`` bytes as ``12.3 GB`` (powers of 1000)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} PB"


def check_memory(model: ModelSettings, vocab_size: int, device_type: str, batch_size: int = 0,
                 training: bool = True, origin: str = "", index: int | None = None,
                 shards: int = 1) -> None:
    """A one-line :class:`UserError` when the estimate exceeds the device's memory, naming the
    setting that dominates it. ``origin`` says where the settings came from (``"the
    checkpoint's "``)."""
    need = estimate(model, vocab_size, batch_size, training, shards)
    have = device_memory(device_type, index)
    if have is None or need.total <= have:
        return
    if need.activations > need.weights + need.training_state:
        setting = (f"{origin}BATCH_SIZE={batch_size} with BLOCK_SIZE={model.block_size}",
                   "lower BATCH_SIZE (raise GRAD_ACCUM_STEPS to keep the tokens per step)")
    elif model.n_layer == 0:
        setting = (f"the vocabulary of {vocab_size} tokens (N_LAYER=0, a bigram table)",
                   "use N_LAYER >= 1 or a smaller vocabulary")
    else:
        setting = (f"{origin}N_EMBD={model.n_embd}, N_LAYER={model.n_layer}",
                   "lower N_EMBD or N_LAYER")
    parts = f"weights {human(need.weights)}"
    if training:
        parts += (f", gradients and optimizer {human(need.training_state)}, one batch "
                  f"{human(need.activations)}")
    raise UserError(f"{setting[0]}: the run needs about {human(need.total)} ({parts}), more "
                    f"than the {human(have)} of memory of this {device_type}; {setting[1]}")
