"""The settings tables of the docs, generated from the settings groups.

    python tools/env_table.py            # print the full table (docs/settings.md)
    python tools/env_table.py --contract # print the README's table of the original variables
    python tools/env_table.py --write    # rewrite both tables in place (run after adding a setting)

Each table sits in its file between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` lines;
``tests/test_docs.py`` fails when a table is not the one this script prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmtrain.config import FIELDS, GROUP_OF, env_name, flag_name

ROOT = Path(__file__).resolve().parents[1]

#: The environment variables of the original train / resume scripts, in their order: the
#: contract users already have, shown in the README.
CONTRACT: tuple[str, ...] = (
    "model_type", "use_lora", "training_data_source", "training_steps", "learning_rate",
    "batch_size", "block_size", "n_embd", "n_head", "n_layer", "dropout", "gpt2_model_name",
    "tokenization_method", "custom_vocab_size", "enable_checkpoints", "checkpoint_interval",
    "checkpoint_dir", "log_dir", "enable_output_to_file", "output_dir", "test_mode", "device",
    "checkpoint_path", "resume_steps",
)


def _default(name: str) -> str:
    default = "bundled corpus" if name == "training_data_source" else FIELDS[name].default
    return "—" if default is None else f"`{default}`"


def _meaning(name: str) -> str:
    # "|" would end the cell; "<run name>" would be read as an HTML tag
    return (FIELDS[name].description or "").replace("|", "\\|").replace("<", "\\<")


def table() -> str:
    """The full markdown table: one row per setting, group by group, the group named once."""
    lines = ["| group | env var | flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    previous = None
    for name in FIELDS:
        group = GROUP_OF[name]
        shown = f"**{group}**" if group != previous else ""
        previous = group
        lines.append(f"| {shown} | `{env_name(name)}` | `{flag_name(name)}` | {_default(name)} | "
                     f"{_meaning(name)} |")
    return "\n".join(lines)


def contract_table() -> str:
    """The README's table: the original variables, with their flag, default and meaning."""
    lines = ["| env var | flag | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{env_name(name)}` | `{flag_name(name)}` | {_default(name)} | {_meaning(name)} |"
              for name in CONTRACT]
    return "\n".join(lines)


#: (file, table name) -> the function that makes that table.
TABLES = {
    ("docs/settings.md", "settings-table"): table,
    ("README.md", "contract-table"): contract_table,
}


def replace_between(text: str, name: str, body: str) -> str:
    """``text`` with the lines between its BEGIN/END markers for ``name`` replaced by ``body``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"error: expected one {begin} and one {end} line")
    head, rest = text.split(begin + "\n", 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def write() -> None:
    for (path, name), make in TABLES.items():
        file = ROOT / path
        old = file.read_text(encoding="utf-8")
        new = replace_between(old, name, make())
        if new != old:
            file.write_text(new, encoding="utf-8")
            print(f"updated {path}")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    elif "--contract" in sys.argv[1:]:
        print(contract_table())
    else:
        print(table())
