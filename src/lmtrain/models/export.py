"""Turn a trained model into a Hugging Face folder: ``GPT2LMHeadModel`` weights (LoRA merged
in) plus tokenizer files, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``; or a
GPT-2 LoRA model into a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, folder)`` loads. The
caller rebuilds the model from its checkpoint (``lmtrain.inference``); this module only
converts and writes.

The from-scratch GPT maps one to one onto GPT-2: same module names, pre-LayerNorm blocks,
tanh GELU, tied embeddings, learned positions (``n_positions = BLOCK_SIZE``); only the
``nn.Linear`` weights are transposed into GPT-2's ``Conv1D`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lmtrain.config import ModelSettings
from lmtrain.data.tokenizers import EOT_TEXT, Tokenizer, gpt2_file
from lmtrain.errors import UserError
from lmtrain.models.gpt import GPT
from lmtrain.models.gpt2 import quiet_transformers

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedModel

CHARACTER_ERROR = (
    "TOKENIZATION_METHOD=character: a character vocabulary has no Hugging Face tokenizer; "
    "export checkpoints trained with TOKENIZATION_METHOD=gpt2 or custom_bpe")
#: Tokenizer kinds that have a Hugging Face counterpart.
HF_TOKENIZER_KINDS = ("gpt2", "gpt2_files", "custom_bpe")
#: Layers stored as ``nn.Linear`` (out, in) in our GPT and as ``Conv1D`` (in, out) in GPT-2.
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


ADAPTER_NEEDS_LORA = (
    "--adapter: the checkpoint is a full fine-tune (USE_LORA=0) and has no adapter; export it "
    "as a whole model (OUT_DIR) instead")
ADAPTER_NEEDS_GPT2 = (
    "--adapter: the checkpoint adapts a from-scratch GPT, whose base exists only inside "
    "lmtrain; export it with the adapter merged (OUT_DIR) instead")


def merged_model(model: nn.Module, config: ModelSettings) -> nn.Module:
    """``model`` in eval mode with any LoRA adapter merged into its base weights (in place:
    the adapter is gone afterwards)."""
    if config.use_lora:
        model = model.merge_and_unload()
    return model.eval()


def gpt_to_hf(model: GPT, config: ModelSettings, tokenizer: Tokenizer) -> GPT2LMHeadModel:
    """The from-scratch GPT as a ``GPT2LMHeadModel`` with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    eot = tokenizer.eot_id
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot)
    hf_model = GPT2LMHeadModel(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        conv = name.endswith(".weight") and name.removesuffix(".weight").endswith(CONV1D_LAYERS)
        state[name] = tensor.t().contiguous() if conv else tensor
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()


def to_hf_model(model: nn.Module, config: ModelSettings, tokenizer: Tokenizer
                ) -> PreTrainedModel:
    """A ``GPT2LMHeadModel`` (``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` for the llama
    architecture) ready for ``save_pretrained`` (KV cache on for generation)."""
    from transformers import GPT2LMHeadModel

    hf_model: PreTrainedModel
    if isinstance(model, GPT2LMHeadModel):
        hf_model = model
    elif isinstance(model, GPT) and model.config.arch == "llama":
        from lmtrain.models.export_llama import llama_to_hf

        hf_model = llama_to_hf(model, tokenizer.eot_id)
    elif isinstance(model, GPT):
        hf_model = gpt_to_hf(model, config, tokenizer)
    else:
        raise UserError(f"N_LAYER={config.n_layer}: the bigram model has no Hugging Face "
                        f"counterpart; export a checkpoint of a GPT with N_LAYER >= 1")
    hf_model.config.use_cache = True
    return hf_model


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Tokenizer files that ``AutoTokenizer.from_pretrained(out_dir)`` loads."""
    from transformers import (  # type: ignore[attr-defined]  # a lazy export
        GPT2TokenizerFast,
        PreTrainedTokenizerFast,
    )

    if tokenizer.kind == "gpt2":  # the genuine GPT-2 files under their Hugging Face names
        (out_dir / "vocab.json").write_bytes(gpt2_file("encoder.json"))
        (out_dir / "merges.txt").write_bytes(gpt2_file("vocab.bpe"))
        hf_tok = GPT2TokenizerFast.from_pretrained(out_dir, model_max_length=max_length)
    elif tokenizer.kind in HF_TOKENIZER_KINDS:
        eos = {"eos_token": EOT_TEXT} if tokenizer.eot_id is not None else {}
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok,  # type: ignore[attr-defined]
                                         model_max_length=max_length, **eos)
    else:
        raise UserError(CHARACTER_ERROR)
    hf_tok.save_pretrained(out_dir)


def export_model(model: nn.Module, config: ModelSettings, tokenizer: Tokenizer,
                 out_dir: str | Path) -> dict[str, Any]:
    """Write the Hugging Face folder of a trained model (any LoRA adapter merged in, in place);
    returns a short description."""
    if tokenizer.kind not in HF_TOKENIZER_KINDS:  # before anything is written
        raise UserError(CHARACTER_ERROR)
    with quiet_transformers():
        hf_model = to_hf_model(merged_model(model, config), config, tokenizer)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(out)
        save_tokenizer(tokenizer, out, hf_model.config.max_position_embeddings)
    return {"model_type": config.model_type, "lora_merged": config.use_lora,
            "tokenizer": tokenizer.kind, "out_dir": str(out),
            "n_positions": hf_model.config.max_position_embeddings}  # GPT-2: n_positions


def export_adapter(model: nn.Module, config: ModelSettings, tokenizer: Tokenizer,
                   saved_base: Mapping[str, str] | None, out_dir: str | Path) -> dict[str, Any]:
    """Write a GPT-2 LoRA model's adapter in PEFT's layout (plus the tokenizer files).

    The adapter config names the base as the checkpoint resolved it (``saved_base``: absolute
    folder, or hub id and revision). Export the adapter before any merge of the same model
    (:func:`export_model` merges it in place).
    """
    if not config.use_lora or not saved_base:
        raise UserError(ADAPTER_NEEDS_LORA)
    if config.model_type != "gpt2":
        raise UserError(ADAPTER_NEEDS_GPT2)
    with quiet_transformers():
        peft_config = model.peft_config["default"]
        peft_config.base_model_name_or_path = saved_base.get("resolved") or saved_base["name"]
        peft_config.revision = saved_base.get("revision") or None
        peft_config.inference_mode = True
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        n_positions = int(model.config.n_positions)  # type: ignore[arg-type]
        save_tokenizer(tokenizer, out, n_positions)
    return {"base": peft_config.base_model_name_or_path, "tokenizer": tokenizer.kind,
            "out_dir": str(out), "n_positions": n_positions}
