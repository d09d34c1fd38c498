"""``relay-agent events list`` pages through the server's events: ``--all`` follows the
cursor to the oldest event, and without it the command for the next page is printed.

The server is a fake of ``GET /_relay/api/events`` that pages as the real one does
(tests/unit/test_api.py checks the real one): newest first, ``next`` the seq of a page's
last event when more remain.
"""

from __future__ import annotations

import json
import shlex
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from relay_agent import api_client
from relay_agent.cli import main

#: The oldest first, as they arrived; the fake server lists them newest first.
EVENTS = [
    {
        "id": f"evt_{seq:05}",
        "tunnel": "alice",
        "status": "delivered",
        "received_at": "2026-01-01T00:00:00.000Z",
        "method": "POST",
        "target": f"/hook/{seq}",
        "deliveries": [{"destination": "agent:*", "status": "delivered", "attempts": 1}],
    }
    for seq in range(1, 1011)
]


class FakeServer:
    def __init__(self) -> None:
        self.queries: list[dict[str, list[str]]] = []

    def call(
        self,
        server: str,
        token: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Any:
        assert (method, urlsplit(path).path) == ("GET", "events")
        query = parse_qs(urlsplit(path).query)
        self.queries.append(query)
        limit = int(query["limit"][0])
        before = int(query["before"][0]) if "before" in query else len(EVENTS) + 1
        older = [e for seq, e in enumerate(EVENTS, 1) if seq < before][::-1]
        page = older[:limit]
        following = page[-1]["id"].removeprefix("evt_").lstrip("0") if len(older) > limit else None
        return {"events": page, "next": following}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeServer:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # never the user's saved login
    fake = FakeServer()
    monkeypatch.setattr(api_client, "call", fake.call)
    return fake


def _run(*args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--server", "http://relay.test", "--token", "t"])
    assert result.exit_code == 0, result.output + result.stderr
    return result


def test_all_follows_the_cursor_down_to_the_oldest_event(server: FakeServer) -> None:
    result = _run("events", "list", "--all", "--limit", "1000", "--json")
    ids = [e["id"] for e in json.loads(result.stdout)]
    assert ids == [e["id"] for e in reversed(EVENTS)]
    assert ids[-10:] == [f"evt_{seq:05}" for seq in range(10, 0, -1)]  # the oldest ten
    assert len(server.queries) == 2
    assert result.stderr == ""  # nothing left to list


def test_all_in_the_table_lists_every_event_under_one_header(server: FakeServer) -> None:
    lines = _run("events", "list", "--all", "--limit", "400").stdout.splitlines()
    assert lines[0].startswith("ID ")
    assert [line.split()[0] for line in lines[1:]] == [e["id"] for e in reversed(EVENTS)]
    assert len(server.queries) == 3


def test_without_all_the_exact_command_for_the_next_page_is_printed(server: FakeServer) -> None:
    first = _run("events", "list", "--limit", "1000", "--name", "alice")
    assert len(first.stdout.splitlines()) == 1 + 1000
    hint = first.stderr.strip()
    assert hint.startswith("more: relay-agent events list ")
    argv = shlex.split(hint.removeprefix("more: "))
    assert "t" not in argv  # never the token
    second = CliRunner().invoke(main, [*argv[1:], "--token", "t"])
    assert second.exit_code == 0, second.output
    assert [line.split()[0] for line in second.stdout.splitlines()[1:]] == [
        f"evt_{seq:05}" for seq in range(10, 0, -1)
    ]
    assert second.stderr == ""
    assert server.queries[-1]["name"] == ["alice"]


def test_limit_over_a_page_is_refused(server: FakeServer) -> None:
    result = CliRunner().invoke(main, ["events", "list", "--limit", "1001", "--token", "t"])
    assert result.exit_code == 2
    assert "--limit" in result.stderr
    assert server.queries == []
