"""What a model, its optimizer and one batch need in memory, and the one line that refuses a
run the device cannot hold (instead of an allocator error, or a machine swapping to a halt):
estimated from the settings before anything is allocated (:func:`check_memory`, against the
device's memory), and for ``PARALLEL=fsdp`` from the built model's parameters
(:func:`check_shards_fit`, against the free memory, naming how many processes would fit). Both
count a weight's bytes with :func:`parameter_bytes`.

The estimate is deliberately low (fp32 weights, gradients and AdamW's two moments, spread over
the FSDP processes, each of which first builds the whole model; a LoRA base in bf16, fp32 under
FSDP; activations of one micro-batch at 8 values per width, layer and token, about half of what
a transformer block keeps for its backward pass, or one per layer with gradient checkpointing;
no attention matrices): a run it refuses could never fit, and one it lets through may still be
tight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from lmtrain.config import ModelSettings
from lmtrain.data.tokenizers import GPT2_VOCAB_SIZE
from lmtrain.errors import UserError
from lmtrain.models import count_parameters

FP32 = 4
BF16 = 2
#: Bytes per trained weight: the fp32 weight, its gradient and AdamW's two moments.
BYTES_TRAINED = 4 * FP32


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by purpose, for one process."""

    weights: int
    training_state: int  # gradients and optimizer moments of the trained weights
    activations: int  # one micro-batch's, forward and backward
    whole_model: int = 0  # FSDP: the whole model's weights, built before it is sharded

    @property
    def total(self) -> int:
        return max(self.weights + self.training_state + self.activations, self.whole_model)


def parameter_bytes(trained: int, frozen: int = 0, shards: int = 1,
                    frozen_bytes: int = FP32) -> tuple[int, int]:
    """``(weights, training_state)``: the bytes one process keeps for ``trained`` weights (fp32,
    with their gradients and AdamW's two moments) and ``frozen`` ones (a LoRA base, or every
    weight of a sampler; ``frozen_bytes`` each), spread over ``shards`` processes (FSDP)."""
    shards = max(shards, 1)
    return ((FP32 * trained + frozen_bytes * frozen) // shards,
            (BYTES_TRAINED - FP32) * trained // shards)


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
    the weights, gradients and optimizer state (``PARALLEL=fsdp``; each builds the whole model
    first)."""
    params = parameter_count(model, vocab_size)
    trained, frozen = (params, 0) if training else (0, params)
    if training and model.use_lora:  # adapters: a small part beside the frozen base
        trained, frozen = params // 100, params
    # a LoRA base may be kept in bf16 (train/frozen.py); FSDP keeps every weight in fp32
    frozen_bytes = BF16 if model.use_lora and shards <= 1 else FP32
    weights, state = parameter_bytes(trained, frozen, shards, frozen_bytes)
    tokens = batch_size * model.block_size
    layers = max(model.n_layer, 1)
    kept = layers + 8 if model.gradient_checkpointing else 8 * layers  # values per width
    whole = parameter_bytes(trained, frozen, 1, frozen_bytes)[0] if shards > 1 else 0
    return MemoryEstimate(weights=weights, training_state=state,
                          activations=FP32 * tokens * kept * model.n_embd if training else 0,
                          whole_model=whole)


def expected_vocab_size(model: ModelSettings, tokenization: str, custom_vocab_size: int) -> int:
    """The vocabulary a fresh run will have, before its data is read (characters: at least
    the 256 of one byte's worth; a learned BPE: at most ``CUSTOM_VOCAB_SIZE``)."""
    if model.model_type == "gpt2" or tokenization == "gpt2":
        return GPT2_VOCAB_SIZE
    return custom_vocab_size if tokenization == "custom_bpe" else 256


def device_memory(device_type: str, index: int | None = None) -> int | None:
    """The memory of the device (the machine's RAM for ``cpu``), or ``None`` if unknown."""
    if device_type == "cuda":
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
    whole_first = need.whole_model > need.weights + need.training_state + need.activations
    if not whole_first and need.activations > need.weights + need.training_state:
        setting = (f"{origin}BATCH_SIZE={batch_size} with BLOCK_SIZE={model.block_size}",
                   "lower BATCH_SIZE (raise GRAD_ACCUM_STEPS to keep the tokens per step)")
    elif model.n_layer == 0:
        setting = (f"the vocabulary of {vocab_size} tokens (N_LAYER=0, a bigram table)",
                   "use N_LAYER >= 1 or a smaller vocabulary")
    else:
        setting = (f"{origin}N_EMBD={model.n_embd}, N_LAYER={model.n_layer}",
                   "lower N_EMBD or N_LAYER")
    parts = f"weights {human(need.weights)}"
    if whole_first:
        parts = (f"the whole model's weights {human(need.whole_model)}, built by every process "
                 f"before FSDP shards them")
    elif training:
        parts += (f", gradients and optimizer {human(need.training_state)}, one batch "
                  f"{human(need.activations)}")
    raise UserError(f"{setting[0]}: the run needs about {human(need.total)} ({parts}), more "
                    f"than the {human(have)} of memory of this {device_type}; {setting[1]}")


def free_memory(device: torch.device) -> int | None:
    """Free bytes for one process on ``device``: the GPU's free memory, or the host's
    available memory shared by this machine's processes (``None`` if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        available = int(fields["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return available // max(local_procs, 1)


def check_shards_fit(model: nn.Module, world_size: int, device: torch.device,
                     available: int | None = None) -> None:
    """``PARALLEL=fsdp``: refuse, in one line, a world size whose shards of the built
    ``model`` (its trained weights with their gradients and AdamW state, its frozen weights,
    in fp32: :func:`parameter_bytes`) would not fit this device's free memory (``available``
    if given), naming how many processes would."""
    trained, total = count_parameters(model)
    need = sum(parameter_bytes(trained, total - trained, world_size))
    free = available if available is not None else free_memory(device)
    if free is None or need <= free:
        return
    gib = 2 ** 30
    fits = -(-sum(parameter_bytes(trained, total - trained)) // free)
    raise UserError(
        f"PARALLEL=fsdp with {world_size} process(es): each needs about {need / gib:.1f} GiB for "
        f"its shard of the weights, gradients and optimizer state, but {device} has "
        f"{free / gib:.1f} GiB free; launch at least {fits} processes (--nproc_per_node / "
        f"--nnodes), or fine-tune with USE_LORA=1")
