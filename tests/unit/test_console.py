"""The agent's console: exact plain lines off a terminal, a status block on one."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import pytest
from rich.console import Console as RichConsole

import relay_agent.console as console_module
from relay_agent.config import AgentConfig
from relay_agent.console import LiveConsole, PlainConsole, console_for, request_line
from relay_agent.target import Target
from relay_protocol import RequestHead, Welcome

CONFIG = AgentConfig(
    server="http://relay.test", token="secret", target=Target("http", "localhost", 8080), names=("alice",)
)
WELCOME = Welcome(
    1, "s1", ({"name": "alice", "urls": ["http://alice.relay.test", "http://relay.test/t/alice"]},)
)


def test_off_a_terminal_the_lines_are_the_plain_ones(capsys: pytest.CaptureFixture[str]) -> None:
    console = console_for(io.StringIO(), CONFIG, "http://127.0.0.1:4040")
    assert isinstance(console, PlainConsole)
    console.welcome(WELCOME)
    console.request(RequestHead("POST", b"/hook", ()), 200, 0.0123, "")
    console.request(RequestHead("GET", b"/x", ()), 502, 1.5, "connection refused on 127.0.0.1:8080")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "Forwarding http://alice.relay.test -> http://localhost:8080",
        "Forwarding http://relay.test/t/alice -> http://localhost:8080",
        "Inspect    http://127.0.0.1:4040",
    ]
    assert re.fullmatch(r"\d\d:\d\d:\d\d POST    /hook 200 12ms", lines[3])
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d GET     /x 502 1500ms connection refused on 127\.0\.0\.1:8080", lines[4]
    )


def test_a_reconnect_with_the_same_urls_prints_nothing_new(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    console = PlainConsole(CONFIG, None)
    console.welcome(WELCOME)
    console.welcome(WELCOME)
    out = capsys.readouterr().out
    assert out.count("Forwarding") == 2 and "Inspect" not in out
    assert "reconnected" in caplog.text


async def test_off_a_terminal_a_burst_of_request_lines_is_one_write(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    monkeypatch.setattr(console_module.click, "echo", writes.append)
    console = PlainConsole(CONFIG, None)
    for i in range(50):
        console.request(RequestHead("POST", b"/hook/%d" % i, ()), 200, 0.001, "")
    assert writes == []  # kept for PLAIN_FLUSH seconds
    async with asyncio.timeout(10):
        while not writes:
            await asyncio.sleep(0.01)
    assert len(writes) == 1 and len(writes[0].splitlines()) == 50
    console.request(RequestHead("POST", b"/last", ()), 200, 0.001, "")
    await console.stop()  # nothing kept is lost when the agent stops
    assert writes[1].endswith("/last 200 1ms")


def test_request_line_of_a_stream_that_ended_without_status() -> None:
    line = request_line(RequestHead("GET", b"/caf\xc3\xa9/\xff", ()), "reset", 0.2, "")
    assert line.endswith("GET     /café/\ufffd reset 200ms")


def _drawn(console: LiveConsole) -> str:
    out = RichConsole(file=io.StringIO(), width=120, color_system=None)
    out.print(console.render())
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


async def test_the_status_block_says_online_the_urls_counters_and_latency() -> None:
    console = LiveConsole(CONFIG, "http://127.0.0.1:4040", io.StringIO())
    assert "connecting to http://relay.test" in _drawn(console)
    console.welcome(WELCOME)
    for ms in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100):
        console.request(RequestHead("POST", b"/hook", ()), 200, ms / 1000, "")
    console.request(RequestHead("POST", b"/down", ()), 502, 0.001, "connection refused")
    console.waiting = 3
    text = _drawn(console)
    assert re.search(r"Session Status\s+online", text)
    assert re.search(r"Forwarding\s+http://alice\.relay\.test -> http://localhost:8080", text)
    assert re.search(r"Inspect\s+http://127\.0\.0\.1:4040", text)
    assert re.search(r"Requests\s+11 total, 1 failed", text)
    assert re.search(r"Latency\s+p50 50ms, p90 90ms", text)
    assert re.search(r"Events waiting\s+3 on the server", text)
    assert "POST    /down 502 1ms connection refused" in text
    assert "secret" not in text


async def test_the_status_block_says_why_it_reconnects_and_when() -> None:
    console = LiveConsole(CONFIG, None, io.StringIO())
    console.welcome(WELCOME)
    console.offline("cannot connect to http://relay.test: connection refused", 7.2)
    text = _drawn(console)
    assert re.search(
        r"reconnecting \(cannot connect to http://relay\.test: connection refused\); next try in [78]s", text
    )
    assert "Inspect" not in text


async def test_warnings_become_lines_of_the_block() -> None:
    console = LiveConsole(CONFIG, None, io.StringIO())
    logging.getLogger("relay.agent").addHandler(handler := console._log_handler)
    try:
        logging.getLogger("relay.agent").warning("disconnected from the server (1006 no reason given)")
    finally:
        logging.getLogger("relay.agent").removeHandler(handler)
    assert "WARNING relay.agent: disconnected from the server (1006 no reason given)" in _drawn(console)
