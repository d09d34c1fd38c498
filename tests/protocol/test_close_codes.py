"""The websocket close codes are wire format: pinned here so they cannot drift.

Agents in the field decide from these numbers whether to reconnect; a renumbered
code would make an old agent retry a revoked token for ever, or give up on a
restart.
"""

from __future__ import annotations

import re
from pathlib import Path

from relay_protocol import frames

PINNED = {
    "CLOSE_NORMAL": 1000,
    "CLOSE_GOING_AWAY": 1001,
    "CLOSE_PROTOCOL_ERROR": 1002,
    "CLOSE_UNSUPPORTED": 1003,
    "CLOSE_TOO_BIG": 1009,
    "CLOSE_UNAUTHORIZED": 4001,
    "CLOSE_FORBIDDEN": 4003,
    "CLOSE_VERSION": 4005,
    "CLOSE_HEARTBEAT": 4008,
    "CLOSE_TOO_MANY_AGENTS": 4029,
}


def test_close_codes_are_pinned() -> None:
    defined = {name: getattr(frames, name) for name in dir(frames) if name.startswith("CLOSE_")}
    assert defined == PINNED


def test_only_refusals_are_final() -> None:
    assert frozenset({4001, 4003, 4005}) == frames.FINAL_CLOSE_CODES


def test_the_agent_retries_by_the_same_constants() -> None:
    from relay_agent.backoff import should_retry

    for code in PINNED.values():
        assert should_retry(code) is (code not in frames.FINAL_CLOSE_CODES)
    assert should_retry(None)  # no close frame at all: a network failure


def test_docs_list_the_same_codes() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    table = doc.split("## Errors and websocket close codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d{4}) \|.*\| \**(yes|no)\** *\|$", table, re.M)
    listed = {int(code): retry for code, retry in rows}
    assert set(listed) == set(PINNED.values())
    assert {code for code, retry in listed.items() if retry == "no"} == frames.FINAL_CLOSE_CODES
