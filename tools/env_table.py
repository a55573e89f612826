"""Print the README's settings table from the settings groups (run after adding a setting)."""

from lmtrain.config import FIELDS, GROUP_OF, env_name, flag_name


def table() -> str:
    """The markdown table: one row per setting, group by group, the group named once."""
    lines = ["| group | env var | flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    previous = None
    for name, info in FIELDS.items():
        group = GROUP_OF[name]
        default = "bundled corpus" if name == "training_data_source" else info.default
        default = "—" if default is None else f"`{default}`"
        meaning = (info.description or "").replace("|", "\\|")
        shown = f"**{group}**" if group != previous else ""
        previous = group
        lines.append(f"| {shown} | `{env_name(name)}` | `{flag_name(name)}` | {default} | "
                     f"{meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
