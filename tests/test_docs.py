"""Configuration snippets in the docs are real: each one loads as a policyd.cfg."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policyd.config import KEYS, settings_from_text

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SETTING = re.compile(r"^#?\s*([a-z_]+)\s*=")


def config_snippets() -> list[tuple[str, str]]:
    """Fenced blocks made only of `key = value` lines (and comments) with policyd keys."""
    snippets = []
    for document in DOCUMENTS:
        for number, block in enumerate(FENCE.findall(document.read_text())):
            lines = [line for line in block.splitlines() if line.strip() and not line.startswith("# ")]
            keys = [SETTING.match(line) for line in lines]
            if lines and all(keys) and all(match.group(1) in KEYS for match in keys if match):
                snippets.append((f"{document.name}#{number}", block))
    return snippets


SNIPPETS = config_snippets()


def test_the_docs_have_config_snippets() -> None:
    assert len(SNIPPETS) >= 4, [name for name, _ in SNIPPETS]


@pytest.mark.parametrize(("name", "snippet"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_snippet_loads(name: str, snippet: str) -> None:
    settings = settings_from_text(snippet, name)
    assert settings.path == name


def test_example_config_matches_the_documented_defaults() -> None:
    text = (ROOT / "examples" / "policyd.cfg").read_text()
    settings = settings_from_text(text, "examples/policyd.cfg")
    assert (settings.bind, settings.port, settings.rules.quota) == ("127.0.0.1", 9093, 1500)
    assert settings.database == "sqlite://var/policyd.sqlite"


def test_every_key_has_a_row_in_configuration_md() -> None:
    rows = [
        line
        for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    first_cells = [row.split("|")[1] for row in rows]
    assert [key for key in KEYS if not any(f"`{key}`" in cell for cell in first_cells)] == []


def test_the_migration_checklist_is_linked_and_its_config_is_tested() -> None:
    assert "docs/migrating-from-go-policyd.md" in (ROOT / "README.md").read_text()
    assert any(name.startswith("migrating-from-go-policyd.md#") for name, _ in SNIPPETS)
