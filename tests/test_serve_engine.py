"""The serving engine: requests that join and leave one batch get what they would get alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtrain.config import GenerationSettings, TrainingConfig
from lmtrain.data.tokenizers import CharTokenizer
from lmtrain.generate import generate_text, greedy
from lmtrain.serve.engine import Engine, Event
from tests.conftest import save_tiny_gpt2

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")
CHARS = "abcdefghijklmnopqrstuvwxyz ?.:QUESTIONANSWER\n"
PROMPTS = ["QUESTION: abc ANSWER:", "QUESTION: what is it? ANSWER:", "a", "QUESTION: x ANSWER:",
           "zz top", "QUESTION: the longest question of them all here ANSWER:", "b c d"]


def _random_gpt(block_size: int = 64, lora: bool = False):
    from lmtrain.models import build_model

    torch.manual_seed(0)
    cfg = TrainingConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, use_lora=lora)
    model = build_model(cfg.model, CharTokenizer(CHARS).vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval(), CharTokenizer(CHARS)


def _settings(i: int) -> GenerationSettings:
    """Greedy, sampled and nucleus requests of different lengths."""
    return [greedy(6 + i), GenerationSettings(max_new_tokens=9, temperature=1.2, top_k=None),
            GenerationSettings(max_new_tokens=5 + i, top_p=0.7)][i % 3]


def _answers(engine: Engine, prompts, every: int, stops=()) -> list[tuple[str, str | None]]:
    """Each prompt's text and finish, one joining every ``every`` engine steps (0: all first)."""
    events: dict[int, list[Event]] = {i: [] for i in range(len(prompts))}
    pending, step = list(range(len(prompts))), 0
    while pending or engine.busy:
        if pending and (every == 0 or step % every == 0):
            for i in pending if every == 0 else pending[:1]:
                engine.submit(engine.job(prompts[i], _settings(i), events[i].append, seed=i,
                                         stops=stops))
            pending = [] if every == 0 else pending[1:]
        engine.step()
        step += 1
    return [("".join(e.text for e in events[i]), events[i][-1].finish) for i in events]


def _alone(engine: Engine, prompts, stops=()) -> list[tuple[str, str | None]]:
    out = []
    for i, prompt in enumerate(prompts):
        got: list[Event] = []
        engine.submit(engine.job(prompt, _settings(i), got.append, seed=i, stops=stops))
        while engine.busy:
            engine.step()
        out.append(("".join(e.text for e in got), got[-1].finish))
    return out


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("every", [0, 1, 3])
def test_joining_and_leaving_the_batch_changes_no_answer(lora: bool, every: int) -> None:
    model, tok = _random_gpt(lora=lora)
    engine = Engine(model, tok, 64, CPU, max_batch=5)  # more prompts than rows: some wait
    alone = _alone(engine, PROMPTS)
    assert _answers(engine, PROMPTS, every) == alone
    assert len({text for text, _ in alone}) > 3
    assert not engine.batched and engine.batch is not None and engine.batch.rows == 0


def test_gpt2_and_its_lora_batch_as_they_decode_alone(tmp_path: Path) -> None:
    from lmtrain.models import build_model
    from lmtrain.models.gpt2 import gpt2_tokenizer

    folder = save_tiny_gpt2(tmp_path / "gpt2", n_embd=32)
    for lora in (False, True):
        cfg = TrainingConfig(model_type="gpt2", gpt2_model_name=str(folder), use_lora=lora,
                             tokenization_method="gpt2", block_size=48, n_layer=2, n_head=2,
                             n_embd=32)
        tok = gpt2_tokenizer(cfg.model, cfg.data)
        model = build_model(cfg.model, tok.vocab_size).eval()
        engine = Engine(model, tok, 48, CPU, max_batch=4)
        prompts = [*PROMPTS, "QUESTION: " + "abcdefgh " * 8 + "ANSWER:"]  # the last: > 48 ids
        alone = _alone(engine, prompts)
        assert _answers(engine, prompts, 2) == alone
        assert len(engine.alone) == 0 and len({text for text, _ in alone}) > 3


def test_a_prompt_longer_than_the_window_decodes_as_lmtrain_sample_does() -> None:
    model, tok = _random_gpt(block_size=16)
    engine = Engine(model, tok, 16, CPU)
    long_prompt = "QUESTION: a very long question indeed ANSWER:"
    for i in range(3):
        settings = _settings(i)
        got: list[Event] = []
        engine.submit(engine.job(long_prompt, settings, got.append, seed=7))
        while engine.busy:
            engine.step()
        expected = generate_text(model, tok, long_prompt, settings, 16, CPU, seed=7)
        assert long_prompt + "".join(e.text for e in got) == expected


def test_stop_strings_end_the_answer_and_are_not_sent() -> None:
    model, tok = _random_gpt()
    engine = Engine(model, tok, 64, CPU)
    free = _alone(engine, PROMPTS)
    stop = next(text[2:4] for text, _ in free if len(text) > 5)
    stopped = _answers(engine, PROMPTS, 1, stops=(stop,))
    for (whole, _), (cut, finish) in zip(free, stopped, strict=True):
        if stop in whole:
            assert (cut, finish) == (whole[:whole.index(stop)], "stop")
        else:
            assert cut == whole


def test_a_cancelled_request_leaves_and_the_others_go_on() -> None:
    model, tok = _random_gpt()
    engine = Engine(model, tok, 64, CPU)
    alone = _alone(engine, PROMPTS[:3])
    events: list[list[Event]] = [[], [], []]
    jobs = [engine.job(p, _settings(i), events[i].append, seed=i)
            for i, p in enumerate(PROMPTS[:3])]
    for job in jobs:
        engine.submit(job)
    engine.step()
    jobs[1].cancel()
    while engine.busy:
        engine.step()
    assert events[1][-1].finish == "cancelled"
    for i in (0, 2):
        assert ("".join(e.text for e in events[i]), events[i][-1].finish) == alone[i]


def test_a_character_outside_the_vocabulary_is_a_user_error() -> None:
    from lmtrain.errors import UserError

    model, tok = _random_gpt()
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        Engine(model, tok, 64, CPU).job("QUESTION: é", greedy(3), lambda e: None)
