"""The docs name the code's constants and functions (``relay_server.config.DEFAULT_TIMEOUT``):
each name must resolve, so that the docs cannot drift from the code. The README's limits
table named five constants by modules they had left (found when a limit was added).

A name is dotted from a package (``relay_server.config.DEFAULT_TIMEOUT``), or continues
the name before it: ``.FRAME_BURST`` (beside ``relay_server.budget.MAX_FRAMES_PER_SECOND``)
or ``QueueConfig.body_budget`` resolve against that name's modules, the innermost first.
A trailing ``*`` stands for any name with that prefix.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Every document a user or a contributor reads.
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if attribute.endswith("*"):
                return any(n.startswith(attribute[:-1]) for n in dir(target))
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def _candidates(name: str, previous: str) -> list[str]:
    if name.startswith("relay_"):
        return [name]
    suffix = name if name.startswith(".") else f".{name}"
    prefixes = previous.split(".")
    return [".".join(prefixes[:k]) + suffix for k in range(len(prefixes) - 1, 0, -1)]


def _named_constants() -> list[str]:
    table = README.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|.*\|(.*)\|\s*$", table, re.M)
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row)]


def test_every_constant_the_limits_table_names_exists() -> None:
    names = _named_constants()
    assert len(names) > 50  # the table was found and read
    missing, previous = [], ""
    for name in names:
        found = next((c for c in _candidates(name, previous) if _resolves(c)), None)
        if found is None:
            missing.append(name)
        previous = found or name
    assert missing == []


def test_every_dotted_name_the_docs_give_exists() -> None:
    pattern = re.compile(r"`(relay_[a-z_]+(?:\.[A-Za-z_*][A-Za-z0-9_*]*)+)(?:\(\))?`")
    names = {(doc.name, m.group(1)) for doc in DOCS for m in pattern.finditer(doc.read_text())}
    assert len(names) > 50
    assert sorted(n for n in names if not _resolves(n[1])) == []
