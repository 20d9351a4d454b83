"""docs/architecture.md names only modules and folders that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
# A path of the tree as the doc writes it: `mesh/core/feed.py`, `lb/userspace/`, ...
PATH = re.compile(r"\b((?:mesh|gossip|dns|lb|tests)/[\w/]*(?:\.py|/))")


def test_every_path_the_architecture_doc_names_exists() -> None:
    named = set(PATH.findall(DOC.read_text()))
    assert len(named) > 40, "the doc should name the modules it draws"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == [], f"docs/architecture.md names what is not there: {missing}"
