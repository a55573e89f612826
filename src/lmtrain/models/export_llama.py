"""The from-scratch ``ARCH=llama`` GPT as a Hugging Face ``LlamaForCausalLM`` (with QK-norm:
``Qwen3ForCausalLM``, Llama plus RMSNorm on each head's queries and keys), same weights.

Our fused layers split along their output rows: ``c_attn`` into q, k, v projections and
``c_fc`` into the gate and up projections; rotary positions use Hugging Face's half-split
layout already, so no weight is permuted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lmtrain.models.gpt import GPT, NORM_EPS, ROPE_THETA

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama's names."""
    cfg = model.config
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.c_attn.weight"].split(cfg.n_embd, dim=0)
        gate, up = sd[ours + "mlp.c_fc.weight"].chunk(2, dim=0)
        out.update({
            theirs + "input_layernorm.weight": sd[ours + "ln_1.weight"],
            theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": sd[ours + "attn.c_proj.weight"],
            theirs + "post_attention_layernorm.weight": sd[ours + "ln_2.weight"],
            theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": sd[ours + "mlp.c_proj.weight"],
        })
        if cfg.qk_norm:
            out[theirs + "self_attn.q_norm.weight"] = sd[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = sd[ours + "attn.k_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def llama_to_hf(model: GPT, eot_id: int | None) -> PreTrainedModel:
    """A ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with QK-norm) holding ``model``'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg = model.config
    config_cls: Any
    model_cls: Any
    config_cls, model_cls = ((Qwen3Config, Qwen3ForCausalLM) if cfg.qk_norm
                             else (LlamaConfig, LlamaForCausalLM))
    hf_config = config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.block_size, rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False, attention_dropout=cfg.dropout, tie_word_embeddings=False,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None)
    hf_model = model_cls(hf_config)
    hf_model.load_state_dict(llama_state_dict(model), strict=True)
    return hf_model.eval()
