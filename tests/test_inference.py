"""A run folder's checkpoint for ``lmtrain serve`` / ``chat``: the best, the newest or the step
asked for, each file loaded (and verified) once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.cli import build_parser
from lmtrain.commands.serve import load_engine
from lmtrain.errors import UserError
from lmtrain.inference import find_checkpoint

pytestmark = pytest.mark.unit
STEP_4 = "step_0000004.pt"
STEP_6 = "step_0000006.pt"


def _folder(tiny_checkpoint: Path, tmp_path: Path, best_of_step_6: int | None) -> Path:
    """A run folder with the step 4 checkpoint (its own best) and a later step 6 checkpoint
    that names ``best_of_step_6`` as its best step (``None``: no evaluation yet)."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / STEP_4)
    later = load_checkpoint(tiny_checkpoint)
    later.update({fmt.STEP_KEY: 6, fmt.BEST_STEP_KEY: best_of_step_6})
    save_checkpoint(folder / STEP_6, later)
    return folder


def _counting_loads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every ``torch.load`` of a file, counted by file name."""
    loads: Counter[str] = Counter()
    real = torch.load

    def load(f, *args, **kwargs):
        loads[Path(f).name] += 1
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return loads


def test_find_checkpoint_picks_the_best_or_the_step_asked_for(tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    folder = _folder(tiny_checkpoint, tmp_path, best_of_step_6=4)
    assert find_checkpoint(folder)[0] == folder / STEP_4  # the best, not the newest
    assert find_checkpoint(folder, 6) == (folder / STEP_6, None)
    assert find_checkpoint(folder / STEP_6) == (folder / STEP_6, None)
    with pytest.raises(UserError, match="no checkpoint of step 3"):
        find_checkpoint(folder, 3)
    with pytest.raises(UserError, match="is a file"):
        find_checkpoint(folder / STEP_6, 6)
    with pytest.raises(UserError, match="holds no checkpoint"):
        find_checkpoint(tmp_path / "run" / ".." / "run" / "..")


@pytest.mark.parametrize("best, chosen", [(6, STEP_6), (4, STEP_4), (None, STEP_6),
                                          (2, STEP_6)])  # step 2's file is not kept
def test_a_run_folder_loads_each_checkpoint_once(tiny_checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 best: int | None, chosen: str) -> None:
    folder = _folder(tiny_checkpoint, tmp_path, best_of_step_6=best)
    loads = _counting_loads(monkeypatch)
    args = build_parser().parse_args(["chat", str(folder), "--device", "cpu"])
    loaded, _, _ = load_engine(args, max_batch=1)
    assert loaded.checkpoint.where == f"PATH={str(folder / chosen)!r}"
    assert loaded.checkpoint.step == int(chosen[5:12])
    assert set(loads.values()) == {1}  # the newest (which names the best) and the best: once
    assert loads[chosen] == 1


def test_a_damaged_newest_checkpoint_is_still_refused(tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    folder = _folder(tiny_checkpoint, tmp_path, best_of_step_6=4)
    data = bytearray((folder / STEP_6).read_bytes())
    (folder / STEP_6).write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(UserError, match=STEP_6):
        find_checkpoint(folder)
