"""The from-scratch GPT in both architectures: shapes, causality and the KV cache."""

from __future__ import annotations

import pytest
import torch

from lmtrain.models.gpt import GPT, BigramLM, GPTConfig

pytestmark = pytest.mark.unit

ARCHES = [("gpt2", False), ("llama", False), ("llama", True)]


def tiny(arch: str = "gpt2", qk_norm: bool = False, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{"vocab_size": 37, "block_size": 16, "n_layer": 2, "n_head": 2,
                       "n_embd": 16, "arch": arch, "qk_norm": qk_norm, **kw})
    return GPT(cfg).eval()


@pytest.mark.parametrize(("arch", "qk_norm"), ARCHES)
def test_forward_shapes_and_causality(arch, qk_norm):
    model = tiny(arch, qk_norm)
    idx = torch.randint(0, 37, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 37)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 37
    assert torch.allclose(model(changed)[:, :6], logits[:, :6], atol=1e-6)  # no peeking ahead
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_llama_has_no_biases_no_positions_and_an_untied_head():
    model = tiny("llama")
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith(".bias")]
    assert not [n for n in names if "wpe" in n]
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert not [n for n in names if "q_norm" in n]
    assert [n for n, _ in tiny("llama", True).named_parameters() if "q_norm" in n]
    gpt2 = tiny("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


@pytest.mark.parametrize(("arch", "qk_norm"), ARCHES)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 1, 2], [12]])
def test_cached_incremental_logits_equal_the_full_forward(arch, qk_norm, chunks):
    model = tiny(arch, qk_norm)
    idx = torch.randint(0, 37, (2, 12))
    full = model(idx)
    cache = model.make_kv_cache(2, 16)
    pieces, start = [], 0
    for n in chunks:
        logits, _ = model(idx[:, start:start + n], kv_cache=cache)
        pieces.append(logits)
        start += n
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reset_and_bounds():
    model = tiny("llama")
    idx = torch.randint(0, 37, (1, 8))
    cache = model.make_kv_cache(1, 8)
    first, _ = model(idx, kv_cache=cache)
    with pytest.raises(ValueError, match="do not fit"):
        model(idx[:, :1], kv_cache=cache)
    cache.reset()
    again, _ = model(idx, kv_cache=cache)
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="block_size"):
        model.make_kv_cache(1, 17)


def test_plain_forward_under_autocast_with_cache():
    model = tiny("llama", True)
    idx = torch.randint(0, 37, (1, 6))
    cache = model.make_kv_cache(1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :4], kv_cache=cache)
        logits, _ = model(idx[:, 4:], kv_cache=cache)
    assert logits.shape == (1, 2, 37) and cache.length == 6


def test_bigram_counts_tokens_in_its_cache():
    model = BigramLM(GPTConfig(vocab_size=11, block_size=8, n_layer=0, n_head=1, n_embd=4))
    idx = torch.randint(0, 11, (1, 5))
    cache = model.make_kv_cache(1, 8)
    logits, _ = model(idx[:, -1:], kv_cache=cache)
    torch.testing.assert_close(logits, model(idx)[:, -1:])
    assert cache.length == 1
