"""The docs keep up with the code: the README's first lines, every setting, every subcommand,
and no link in README.md or docs/ that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmtrain.cli import COMMAND_MODULES
from lmtrain.config import FIELDS, env_name, flag_name
from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.unit

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
SETTINGS = (DOCS / "settings.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

#: Pages linked before they exist, written alongside this change; once a page exists its
#: links are checked like any other. Remove an entry when its page lands.
AWAITED: set[Path] = set()


def _env_table():
    return load_script("tools/env_table.py")


def test_first_lines_give_the_two_commands():
    head = "\n".join(README.splitlines()[:8])
    assert "make run" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_every_setting_is_in_the_settings_table():
    missing = [name for name in FIELDS
               if f"| `{env_name(name)}` | `{flag_name(name)}` |" not in SETTINGS]
    assert not missing, f"docs/settings.md lacks {missing}: run python tools/env_table.py --write"


@pytest.mark.parametrize(("path", "name"), list(_env_table().TABLES))
def test_the_settings_tables_are_the_generated_ones(path, name):
    module = _env_table()
    text = (ROOT / path).read_text(encoding="utf-8")
    assert module.replace_between(text, name, module.TABLES[path, name]()) == text, \
        f"the settings table in {path} is stale: run python tools/env_table.py --write"


def test_the_readme_shows_the_original_variables_and_links_every_setting():
    module = _env_table()
    assert set(module.CONTRACT) <= set(FIELDS), "CONTRACT names a setting that is gone"
    for name in module.CONTRACT:
        assert f"| `{env_name(name)}` | `{flag_name(name)}` |" in README, name
    assert "](docs/settings.md)" in README


def test_every_subcommand_appears_in_the_examples():
    for command in ["train", *COMMAND_MODULES]:
        assert f"lmtrain {command}" in README, command


def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md")} | {p.name for p in AWAITED}
    missing = [name for name in sorted(pages - {"README.md"}) if f"]({name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"
    assert "](docs/README.md)" in README


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(text))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", re.sub(r"^```.*?^```", "", text,
                                                                flags=re.M | re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _leads_nowhere(page: Path, link: str) -> bool:
    target, _, anchor = link.partition("#")
    path = (page.parent / target).resolve() if target else page
    if path in AWAITED and not path.exists():
        return False
    if not path.exists():
        return True
    return bool(anchor) and path.suffix == ".md" and \
        anchor not in _anchors(path.read_text(encoding="utf-8"))


def _dangling(page: Path) -> list[str]:
    """The page's relative links whose file, or whose heading in a markdown file, is missing."""
    return [link for link in _links(page.read_text(encoding="utf-8"))
            if not re.match(r"[a-z][a-z0-9+.-]*:", link)  # https:, mailto: ...
            and _leads_nowhere(page, link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    assert not _dangling(page), f"{page.relative_to(ROOT)} links nowhere: {_dangling(page)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_in_the_docs_exists(page):
    """A path in backticks that starts at a top-level folder (`tests/test_cuda.py`) exists."""
    folders = "|".join(re.escape(p.name) for p in ROOT.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
    named = re.findall(rf"`((?:{folders})/[\w./-]+\.\w+)`", page.read_text(encoding="utf-8"))
    assert not [p for p in named if not (ROOT / p).exists()]


def test_the_link_checker_finds_a_dangling_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n[ok](#two-words) [ok](a.md#title)"
                                   " `[no](x.md)`\n```\n[no](y.md)\n```\n"
                                   "[bad](b.md) [bad](a.md#nowhere) [web](https://x.org)\n")
    assert _dangling(tmp_path / "a.md") == ["b.md", "a.md#nowhere"]


def test_nothing_refers_to_a_missing_design_file():
    assert not [p.name for p in PAGES if "DESIGN.md" in p.read_text(encoding="utf-8")]
