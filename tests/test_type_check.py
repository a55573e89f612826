"""The type checker is part of the lint: it refuses a whole config where a group is typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


MISUSE = """
from lmtrain.config import TrainingConfig
from lmtrain.models import build_model

build_model(TrainingConfig.from_flat(), 10)
"""


def test_the_type_checker_refuses_a_whole_config_where_a_group_is_typed(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "misuse.py").write_text(MISUSE, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "misuse.py")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 1, out.stdout
    assert 'has incompatible type "TrainingConfig"; expected "ModelSettings"' in out.stdout
