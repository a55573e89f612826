"""The checkpoint format has one owner: ``lmtrain.checkpoint_format`` holds the key names, the
validation, the digest and the read-only :class:`SavedRun` view; no other module of ``src``
spells a checkpoint key, and the format depends on nothing above ``config``."""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint_format import SavedRun
from lmtrain.config import TrainingConfig
from lmtrain.errors import UserError

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src" / "lmtrain"
FORMAT_MODULE = SRC / "checkpoint_format.py"
#: Key names that are also ordinary words elsewhere (settings, metrics fields, report keys):
#: they stay allowed outside the format module. Every other key is the format's alone.
SHARED_WORDS = {fmt.STEP_KEY, fmt.TOKENIZER_KEY, fmt.RUN_NAME_KEY, fmt.MODEL_TYPE_KEY,
                fmt.VOCAB_SIZE_KEY, fmt.BLOCK_SIZE_KEY, fmt.BATCH_SIZE_KEY}
#: What the format module may import from lmtrain (nothing above the settings layer; the
#: progress record it saves is a base module).
ALLOWED_INTERNAL = {"lmtrain", "lmtrain.config", "lmtrain.errors", "lmtrain.durable",
                    "lmtrain.progress"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != FORMAT_MODULE)


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_module_but_the_format_spells_a_checkpoint_key():
    owned = set(fmt.KEYS) - SHARED_WORDS
    assert owned >= {"model_state_dict", "hyperparameters", "lora_base", "content_sha256"}
    found = [f"{path.relative_to(SRC)}:{line}: {value!r}" for path in _modules()
             for line, value in _string_constants(ast.parse(path.read_text(encoding="utf-8")))
             if value in owned]
    assert not found, "checkpoint keys spelled outside checkpoint_format.py (use its " \
                      "constants or SavedRun): " + ", ".join(found)


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # top level, inside functions and under TYPE_CHECKING alike
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names += [node.module or ""]
    return names


def test_the_format_module_imports_nothing_above_config():
    imports = _imports(ast.parse(FORMAT_MODULE.read_text(encoding="utf-8")))
    internal = {name for name in imports if name.split(".")[0] == "lmtrain"}
    assert internal <= ALLOWED_INTERNAL, internal - ALLOWED_INTERNAL
    external = {name.split(".")[0] for name in imports} - {"lmtrain"}
    assert external <= set(sys.stdlib_module_names) | {"torch", "pydantic"}, external


def test_the_format_knows_every_tokenizer_kind_and_its_text():
    from lmtrain.data import tokenizers

    kinds = {cls.kind for cls in vars(tokenizers).values()
             if isinstance(cls, type) and isinstance(getattr(cls, "kind", None), str)}
    assert kinds == set(fmt.TOKENIZER_TEXT_FIELDS)
    state = tokenizers.CharTokenizer("ab").state()
    assert fmt.tokenizer_problem(json.dumps(state)) is None
    assert fmt.TOKENIZER_TEXT_FIELDS["character"] in state


# --- the format itself, on a small hand-made checkpoint ----------------------------------------

def _payload(**changes: Any) -> dict[str, Any]:
    """A small valid checkpoint (a 2x2 linear layer, a two-character vocabulary)."""
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    hyperparameters = TrainingConfig.from_flat(block_size=8, n_layer=1, n_head=1,
                                               n_embd=8).flat()
    payload = {
        fmt.FORMAT_VERSION_KEY: fmt.FORMAT_VERSION, fmt.LMTRAIN_VERSION_KEY: "test",
        fmt.STEP_KEY: 3, fmt.MODEL_TYPE_KEY: "from_scratch", fmt.RUN_NAME_KEY: "small",
        fmt.MODEL_STATE_KEY: layer.state_dict(), fmt.OPTIMIZER_STATE_KEY: optimizer.state_dict(),
        fmt.HYPERPARAMETERS_KEY: hyperparameters, fmt.VOCAB_SIZE_KEY: 2,
        fmt.BLOCK_SIZE_KEY: 8, fmt.BATCH_SIZE_KEY: 4,
        fmt.TOKENIZER_KEY: json.dumps({"kind": "character", "chars": "ab"}),
        fmt.RNG_STATE_KEY: torch.get_rng_state(),
        fmt.SAMPLER_STATE_KEY: torch.Generator().manual_seed(1).get_state(),
        fmt.BEST_VAL_LOSS_KEY: 1.5, fmt.BEST_STEP_KEY: 2,
        fmt.LAST_LOSSES_KEY: {"train": 1.25, "val": 1.5, "step": 3},
        fmt.TRACKER_RUN_IDS_KEY: {"wandb": "abc"},
    }
    payload.update(changes)
    return fmt.seal(payload)


def test_the_view_reads_a_validated_checkpoint_and_cannot_change_it():
    run = SavedRun.validated(_payload(), "CKPT='small.pt'")
    assert (run.step, run.vocab_size, run.block_size, run.batch_size) == (3, 2, 8, 4)
    assert (run.run_name, run.model_type, run.tokenizer_kind) == ("small", "from_scratch",
                                                                   "character")
    assert run.config.model.block_size == 8 and run.hyperparameters["n_layer"] == 1
    assert "checkpoint_dir" not in run.run_settings  # where an invocation works: never saved
    assert (run.best_val_loss, run.best_step, run.world_size) == (1.5, 2, 1)
    assert run.last_losses == {"train": 1.25, "val": 1.5, "step": 3}
    assert run.tracker_run_ids == {"wandb": "abc"} and run.lora_base is None
    assert run.digest == fmt.content_digest(dict(run.payload))
    assert run.rank_rng_state(0) is None and run.cuda_rng_states == []
    with pytest.raises(FrozenInstanceError):
        run.where = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        run.payload[fmt.STEP_KEY] = 9  # type: ignore[index]
    with pytest.raises(TypeError):
        run.hyperparameters["n_layer"] = 9  # type: ignore[index]
    assert str(run.damaged("x is wrong")) == (
        "CKPT='small.pt' is damaged: x is wrong; pick an earlier checkpoint")


def test_the_digest_is_sealed_and_checked():
    payload = _payload()
    fmt.validate(payload, "CKPT")
    payload[fmt.BEST_STEP_KEY] = 0  # changed after it was sealed
    with pytest.raises(UserError, match="corrupt: its contents do not match their sha256"):
        fmt.validate(payload, "CKPT")
    old = {k: v for k, v in payload.items() if k != fmt.DIGEST_KEY}
    fmt.validate({**old, fmt.FORMAT_VERSION_KEY: 1}, "CKPT")  # format 1 has no digest


def test_the_digest_is_the_one_every_saved_checkpoint_carries():
    """Byte-compatible with every release since format 2: a fixed payload, a fixed digest."""
    payload = {fmt.FORMAT_VERSION_KEY: 2,
               "w": {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                     "e": torch.empty(0)},
               "l": [1, "a", None, True, 2.5], "t": (torch.tensor([1, 2], dtype=torch.uint8),),
               fmt.DIGEST_KEY: "ignored"}
    assert fmt.content_digest(payload) == (
        "d817de57b0371eeb7b0a02f5b2293325e7cd3c214ce86ed7d92c8f0fe4ff0b95")


@pytest.mark.parametrize(("changes", "problem"), [
    ({fmt.STEP_KEY: -1}, "step is -1, below 0"),
    ({fmt.BLOCK_SIZE_KEY: 16}, "block_size 16 differs from its hyperparameters' 8"),
    ({fmt.TOKENIZER_KEY: '{"kind": "morse"}'}, "tokenizer kind 'morse' is unknown"),
    ({fmt.TOKENIZER_KEY: '{"kind": "custom_bpe"}'}, "custom_bpe tokenizer lacks its 'json'"),
    ({fmt.WORLD_SIZE_KEY: 2, fmt.RANK_RNG_STATES_KEY: [
        {fmt.RANK_CPU: torch.get_rng_state(), fmt.RANK_CUDA: torch.empty(0)}]},
     "rank_rng_states is not one generator state per process"),
    ({fmt.SAMPLER_STATE_KEY: [torch.get_rng_state()] * 3},
     "sampler_state is not a generator state (one per process)"),
    ({fmt.LAST_LOSSES_KEY: {"val": "low"}}, "last_losses is not a map of names to numbers"),
    ({fmt.HYPERPARAMETERS_KEY: {"use_lora": True}}, "lora_base (the adapter's base model)"),
    ({fmt.MODEL_STATE_KEY: "weights"}, "model_state_dict has the wrong type"),
])
def test_each_problem_is_named(changes, problem):
    payload = _payload()
    for key, value in changes.items():
        payload[key] = ({**payload[key], **value} if key == fmt.HYPERPARAMETERS_KEY else value)
    with pytest.raises(UserError, match="is damaged: ") as info:
        fmt.validate(fmt.seal(payload), "CKPT")
    assert problem in str(info.value)


def test_what_is_not_a_checkpoint_or_too_new_is_told_so():
    with pytest.raises(UserError, match="holds a list, not a dict"):
        fmt.validate([], "CKPT")
    with pytest.raises(UserError, match="it lacks hyperparameters"):
        fmt.validate({k: v for k, v in _payload().items() if k != fmt.HYPERPARAMETERS_KEY},
                     "CKPT")
    with pytest.raises(UserError, match=r"format version 3, newer .* upgrade"):
        fmt.validate(_payload(**{fmt.FORMAT_VERSION_KEY: fmt.FORMAT_VERSION + 1}), "CKPT")
