"""Generation: KV cache = no cache, top-p, stop at end of text, token healing, streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmtrain.cli import main
from lmtrain.config import GenerationSettings
from lmtrain.data.tokenizers import GPT2_EOT, BPETokenizer, GPT2Tokenizer
from lmtrain.generate import Decoder, generate_text, greedy, pick_token, sample_tokens
from lmtrain.healing import heal_prompt, stream_text, token_bytes

CPU = torch.device("cpu")


def _greedy(model: nn.Module, context: list[int], n: int, block_size: int, cache: bool):
    return list(sample_tokens(model, context, greedy(n), block_size, CPU, use_cache=cache))


@pytest.fixture(scope="module")
def gpt2_table() -> list[bytes]:
    return token_bytes(GPT2Tokenizer())


@pytest.mark.unit
def test_default_prompt_no_longer_ends_on_the_lone_space(gpt2_table) -> None:
    tok = GPT2Tokenizer()
    ids = tok.encode("QUESTION: ")
    assert ids[-1] == 220
    healed = heal_prompt(ids, gpt2_table)
    assert healed.context == tok.encode("QUESTION:") and healed.context[-1] != 220
    assert healed.prefix == b" "
    assert tok.encode(" What")[0] in healed.allowed and 220 in healed.allowed
    assert all(gpt2_table[i].startswith(b" ") for i in healed.allowed)
    assert len(healed.allowed) > 10_000  # every space-led word


@pytest.mark.unit
def test_healing_leaves_complete_tokens_and_characters_alone(gpt2_table) -> None:
    from lmtrain.data.tokenizers import CharTokenizer

    char = CharTokenizer("ab ,")
    ids = char.encode("ab, ")
    assert heal_prompt(ids, token_bytes(char)).context == ids  # no token extends " "
    assert heal_prompt([220], gpt2_table).context == [220]  # a prompt of one token stays


@pytest.mark.unit
def test_sampling_feeds_the_healed_prompt_and_starts_with_the_removed_text(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    fed: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    tok = GPT2Tokenizer()
    settings = GenerationSettings(max_new_tokens=5, top_k=1, stop_at_eot=False)
    text = generate_text(model, tok, "QUESTION: ", settings, 64, CPU)
    assert fed[0] == tok.encode("QUESTION:")  # the prefill: no id 220 last
    assert all(len(ids) == 1 for ids in fed[1:])  # then one new token per step (cache)
    first = fed[1][0]
    assert tok.decode([first]).startswith(" ")
    expected = "QUESTION:" + tok.decode([t for ids in fed[1:] for t in ids])
    assert text.startswith(expected)  # the prompt's space is the first token's own


@pytest.mark.integration
@pytest.mark.parametrize("lora", [False, True])
def test_gpt2_greedy_is_the_same_with_and_without_the_cache(tiny_gpt2_dir, lora) -> None:
    from lmtrain.config import TrainingConfig
    from lmtrain.models import build_model

    cfg = TrainingConfig.from_flat(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                                   block_size=16,
                         tokenization_method="gpt2", use_lora=lora, dropout=0.0)
    model = build_model(cfg.model, 50257)
    assert Decoder(model, 16, CPU).kind == "hf"
    context = GPT2Tokenizer().encode("Hello there, how are")
    cached = _greedy(model, context, 30, 16, cache=True)  # crosses block_size: re-prefill
    assert cached == _greedy(model, context, 30, 16, cache=False)
    assert len(set(cached)) > 1


@pytest.mark.unit
@pytest.mark.parametrize("n_layer", [2, 0])  # the GPT and the bigram model
def test_gpt_greedy_is_the_same_with_and_without_the_cache(n_layer) -> None:
    from lmtrain.models.gpt import GPTConfig, build_from_scratch

    torch.manual_seed(0)
    model = build_from_scratch(GPTConfig(vocab_size=50, block_size=12, n_layer=n_layer,
                                         n_head=2, n_embd=32))
    for p in model.parameters():  # random weights big enough that greedy paths vary
        p.data.normal_(0, 0.5)
    assert Decoder(model, 12, CPU).kind == "gpt"
    cached = _greedy(model, [1, 2, 3], 30, 12, cache=True)
    assert cached == _greedy(model, [1, 2, 3], 30, 12, cache=False)
    assert len(set(cached)) > 1


class _Always(nn.Module):
    """A model that always puts most weight on one id."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        self.vocab, self.favourite = vocab, favourite

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[..., self.favourite] = 20.0
        return logits


@pytest.mark.unit
def test_sampling_stops_at_end_of_text_unless_told_not_to() -> None:
    tok, model = GPT2Tokenizer(), _Always(50257, GPT2_EOT)
    five, three = GenerationSettings(max_new_tokens=5), GenerationSettings(max_new_tokens=3,
                                                                          stop_at_eot=False)
    assert generate_text(model, tok, "", five, 16, CPU) == ""
    assert generate_text(model, tok, "", three, 16, CPU) == "<|endoftext|>" * 3
    # a healed prompt: the first token must extend " there", then end of text stops it
    healed = generate_text(model, tok, "Hi there", five, 16, CPU)
    assert healed.startswith("Hi there") and len(tok.encode(healed)) == 2


@pytest.mark.unit
def test_top_p_keeps_the_smallest_set_holding_the_mass() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)

    def drawn(top_p: float) -> set[int]:
        return {pick_token(logits, GenerationSettings(temperature=1.0, top_k=None, top_p=top_p),
                           gen) for _ in range(300)}

    assert drawn(0.6) == {0, 1}
    assert drawn(0.5) == {0}
    assert drawn(0.01) == {0}  # the most likely id always stays
    assert drawn(1.0) == {0, 1, 2, 3}


@pytest.mark.unit
def test_first_token_is_drawn_from_the_allowed_ids() -> None:
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    allowed = torch.tensor([2, 3])
    assert {pick_token(logits, GenerationSettings(), gen, allowed) for _ in range(100)} == {2, 3}
    assert pick_token(logits, greedy(1), gen, allowed) == 2


@pytest.mark.unit
@pytest.mark.parametrize("text", ["héllo wörld 🙂🙃 ok", "  spaces\n\n\tand tabs ", "日本語"])
def test_streamed_pieces_join_to_the_decoded_text(text, corpus_text) -> None:
    for tok in (GPT2Tokenizer(), BPETokenizer.train([corpus_text, text], 300)):
        ids = tok.encode(text)
        table = token_bytes(tok)
        pieces = list(stream_text(ids, table))
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)  # a split character waits for its end


@pytest.mark.unit
def test_sample_command_takes_top_p_and_no_stop(tiny_checkpoint, capsys) -> None:
    assert main(["sample", str(tiny_checkpoint), "--prompt", "KING", "--max-new-tokens", "12",
                 "--top-p", "0.9", "--no-stop-at-eot", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KING") and len(out) == len("KING") + 12 + 1  # characters + newline
    assert main(["sample", str(tiny_checkpoint), "--top-p", "1.5"]) == 2
    assert "--top-p='1.5' is invalid" in capsys.readouterr().err
