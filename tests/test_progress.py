"""The progress record and the format that writes it: ``TrainProgress.state_dict()`` is plain
data that continues a run's generators, and ``checkpoint_format`` turns a run's snapshot and
progress into the saved dict (the same keys as ever) and gives the progress back."""

from __future__ import annotations

import ast
import io
import json
import math
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.config import TrainingConfig
from lmtrain.progress import Generators, TrainProgress

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src" / "lmtrain"


def _draws(progress: TrainProgress) -> tuple[list[int], list[float]]:
    """What the sampler and the global generator (dropout) give next."""
    return (torch.randint(100, (4,), generator=progress.sampler).tolist(),
            torch.rand(3).tolist())


def _advanced(seed: int = 5) -> TrainProgress:
    progress = TrainProgress(torch.Generator().manual_seed(seed), step=7, best_val_loss=1.25,
                             best_step=6, last_losses={"train": 1.5, "val": 1.25, "step": 6},
                             saved_steps=[6], tracker_run_ids={"wandb": "abc"})
    torch.randint(100, (9,), generator=progress.sampler)  # the sampler has moved on
    return progress


def test_the_state_is_plain_data_that_continues_the_run():
    torch.manual_seed(1)
    progress = _advanced()
    buffer = io.BytesIO()
    torch.save(progress.state_dict(), buffer)
    expected = _draws(progress)
    again = TrainProgress()
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert _draws(again) == expected
    assert (again.step, again.best_val_loss, again.best_step) == (7, 1.25, 6)
    assert (again.last_losses, again.saved_steps, again.tracker_run_ids) == (
        {"train": 1.5, "val": 1.25, "step": 6}, [6], {"wandb": "abc"})


def test_an_unmeasured_best_is_saved_as_none_and_read_back_as_infinity():
    fresh = TrainProgress()
    state = fresh.state_dict()
    assert math.inf not in state.values()  # saved as None
    again = TrainProgress(best_val_loss=0.5)
    again.load_state_dict(state)
    assert again.best_val_loss == math.inf


def test_the_best_is_taken_only_from_losses_measured_at_this_step():
    progress = TrainProgress(step=4, last_losses={"train": 2.0, "val": 1.0, "step": 3})
    assert progress.record_best() == (math.inf, None) and progress.best_step is None
    progress.last_losses["step"] = 4
    progress.record_best()
    assert (progress.best_val_loss, progress.best_step) == (1.0, 4)
    progress.step, progress.last_losses = 5, {"train": 2.0, "val": 3.0, "step": 5}
    assert progress.record_best() == (1.0, 4) and progress.best_step == 4  # not better


def _snapshot(use_lora: bool = False) -> fmt.RunSnapshot:
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    config = TrainingConfig.from_flat(block_size=8, n_layer=1, n_head=1, n_embd=8)
    return fmt.RunSnapshot(
        config=config, run_name="small", weights=layer.state_dict(),
        optimizer_state=optimizer.state_dict(),
        tokenizer_state={"kind": "character", "chars": "ab"}, vocab_size=2, last_lr=1e-3,
        n_positions=8)


def test_the_format_writes_the_keys_it_always_wrote_and_reads_the_progress_back():
    torch.manual_seed(2)
    progress = _advanced()
    payload = fmt.to_state_dict(_snapshot(), progress)
    one_process = set(fmt.KEYS) - {fmt.DIGEST_KEY, fmt.LORA_BASE_KEY, fmt.RANK_RNG_STATES_KEY}
    assert set(payload) == one_process
    assert json.loads(payload[fmt.TOKENIZER_KEY]) == {"kind": "character", "chars": "ab"}
    assert payload[fmt.HYPERPARAMETERS_KEY]["n_positions"] == 8
    run = fmt.SavedRun.validated(fmt.seal(payload), "CKPT")
    assert (run.step, run.best_val_loss, run.best_step, run.world_size) == (7, 1.25, 6, 1)
    expected = _draws(progress)
    again = TrainProgress()
    again.load_state_dict(run.progress_state())
    assert _draws(again) == expected
    assert (again.step, again.last_losses, again.tracker_run_ids) == (
        7, {"train": 1.5, "val": 1.25, "step": 6}, {"wandb": "abc"})
    assert again.saved_steps == []  # which steps a session saved is never in the file


def test_many_processes_save_each_ranks_generators():
    progress = _advanced()
    ranks = [Generators(torch.Generator().manual_seed(10 + r).get_state(),
                        torch.Generator().manual_seed(20 + r).get_state(), []) for r in range(2)]
    run = fmt.SavedRun.validated(fmt.seal(fmt.to_state_dict(_snapshot(), progress, ranks)),
                                 "CKPT")
    assert run.world_size == 2
    state = run.progress_state(rank=1)
    assert torch.equal(state["generators"]["sampler"], ranks[1].sampler)
    assert torch.equal(state["generators"]["cpu"], ranks[1].cpu)


def test_only_the_format_module_uses_the_key_constants():
    """Every other module reads through ``SavedRun`` and writes through ``to_state_dict``."""
    keys = {name for name in vars(fmt) if name.endswith("_KEY")}
    users = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "checkpoint_format.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [node.attr] if isinstance(node, ast.Attribute) else [])
            users += [f"{path.relative_to(SRC)}: {n}" for n in names if n in keys]
    assert not users, users
