"""Print the README's settings table from TrainingConfig (run after adding a setting)."""

from lmtrain.config import FIELDS, env_name, flag_name


def main() -> None:
    print("| env var | flag | default | meaning |")
    print("| --- | --- | --- | --- |")
    for name, info in FIELDS.items():
        default = "bundled corpus" if name == "training_data_source" else info.default
        default = "—" if default is None else f"`{default}`"
        meaning = (info.description or "").replace("|", "\\|")
        print(f"| `{env_name(name)}` | `{flag_name(name)}` | {default} | {meaning} |")


if __name__ == "__main__":
    main()
