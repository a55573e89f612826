"""The README keeps up with the code: its first lines, every setting, every subcommand."""

from __future__ import annotations

import importlib.util

import pytest

from lmtrain.cli import COMMAND_MODULES
from lmtrain.config import FIELDS, env_name, flag_name
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_first_lines_give_the_two_commands():
    head = "\n".join(README.splitlines()[:8])
    assert "make run" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_in_the_settings_table():
    missing = [name for name in FIELDS
               if f"| `{env_name(name)}` | `{flag_name(name)}` |" not in README]
    assert not missing, f"README lacks {missing}: run python tools/env_table.py"


def test_the_settings_table_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("env_table", ROOT / "tools" / "env_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() in README, "the README's settings table is stale: run python " \
                                     "tools/env_table.py"


def test_every_subcommand_appears_in_the_examples():
    for command in ["train", *COMMAND_MODULES]:
        assert f"lmtrain {command}" in README, command
