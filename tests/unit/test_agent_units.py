"""relay_agent's pure parts: the target, the reconnect policy, the config and the login file."""

from __future__ import annotations

import asyncio
import itertools
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from yarl import URL

from relay_agent.backoff import BACKOFF_BASE, BACKOFF_CAP, backoff, should_retry
from relay_agent.client import LocalClient
from relay_agent.config import AgentConfig, load_login, login_file, save_login
from relay_agent.errors import AgentConfigError
from relay_agent.forward import MAX_RESPONSE_HEADER_LINE, ForwardFailed, client_session, forward
from relay_agent.target import Target, parse_target
from relay_agent.tunnel import AgentStream
from relay_protocol import RequestHead, ResponseHead
from relay_protocol.frames import RESET_BAD_RESPONSE, Open

# -- parse_target --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target", "base_url"),
    [
        ("8080", Target("http", "localhost", 8080), "http://localhost:8080"),
        (" 8080 ", Target("http", "localhost", 8080), "http://localhost:8080"),
        ("localhost:8080", Target("http", "localhost", 8080), "http://localhost:8080"),
        ("http://127.0.0.1:9000", Target("http", "127.0.0.1", 9000), "http://127.0.0.1:9000"),
        ("http://127.0.0.1:9000/", Target("http", "127.0.0.1", 9000), "http://127.0.0.1:9000"),
        ("https://x", Target("https", "x", 443), "https://x"),
        ("https://x:8443", Target("https", "x", 8443), "https://x:8443"),
        ("http://x", Target("http", "x", 80), "http://x"),
        ("[::1]:8080", Target("http", "::1", 8080), "http://[::1]:8080"),
        ("https://[::1]", Target("https", "::1", 443), "https://[::1]"),
        ("web.internal:80", Target("http", "web.internal", 80), "http://web.internal"),
    ],
)
def test_parse_target(text: str, target: Target, base_url: str) -> None:
    parsed = parse_target(text)
    assert parsed == target
    assert parsed.base_url == base_url


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",  # port 0
        "65536",
        "localhost:0",
        "localhost:99999",
        "localhost:http",
        "ftp://localhost:21",
        "ws://localhost:8080",
        "http://",
        "http://:8080",
        "http://localhost:8080/api",  # a path prefix
        "http://localhost:8080?x=1",
        "[::1",
    ],
)
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(AgentConfigError, match="--forward"):
        parse_target(text)


# -- Target.url_for ------------------------------------------------------------

LOCAL = Target("http", "localhost", 8080)


@pytest.mark.parametrize(
    "raw",
    [
        b"/",
        b"/hook?x=1",
        b"/a%2Fb/%2e%2e/c?q=%20&r=a+b",  # encodings are kept, not normalised
        b"/a/../b",
        b"/caf\xc3\xa9",
        b"/\xff\xfe",  # not UTF-8: still the same bytes
        b"/x?next=http://evil.test/",
    ],
)
def test_url_for_keeps_the_target_bytes(raw: bytes) -> None:
    url = LOCAL.url_for(raw)
    assert url.startswith("http://localhost:8080/")
    assert url[len("http://localhost:8080") :].encode("utf-8", "surrogateescape") == raw


@pytest.mark.parametrize(
    "raw",
    [b"//evil.test/x", b"/@evil.test", b"//user@evil.test:1/", b"/%2F%2Fevil.test", b"/..//evil.test"],
)
def test_url_for_never_changes_the_host(raw: bytes) -> None:
    url = URL(LOCAL.url_for(raw), encoded=True)  # as forward() builds it
    assert (url.scheme, url.host, url.port) == ("http", "localhost", 8080)
    assert url.raw_path_qs == raw.decode()


@pytest.mark.parametrize("raw", [b"http://evil.test/", b"evil.test/x", b"*", b""])
def test_url_for_refuses_a_target_that_is_not_a_path(raw: bytes) -> None:
    with pytest.raises(AgentConfigError, match="not a path"):
        LOCAL.url_for(raw)


def test_url_for_brackets_an_ipv6_host() -> None:
    assert Target("http", "::1", 8080).url_for(b"/x") == "http://[::1]:8080/x"
    assert Target("https", "::1", 443).url_for(b"/x") == "https://[::1]/x"


@pytest.mark.parametrize(
    ("target", "authority"),
    [
        (Target("http", "localhost", 80), "localhost"),
        (Target("http", "localhost", 443), "localhost:443"),
        (Target("https", "localhost", 443), "localhost"),
        (Target("https", "localhost", 80), "localhost:80"),
        (Target("http", "::1", 8080), "[::1]:8080"),
    ],
)
def test_authority_omits_only_the_default_port(target: Target, authority: str) -> None:
    assert target.authority == authority


# -- backoff and should_retry --------------------------------------------------


def _delays(rand: float, n: int) -> list[float]:
    return list(itertools.islice(backoff(rand=lambda: rand), n))


def test_backoff_is_exponential_then_capped_at_its_ceiling() -> None:
    # rand() == 1: each delay is its full ceiling.
    assert _delays(1.0, 10) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_backoff_with_no_jitter_is_half_the_ceiling() -> None:
    assert _delays(0.0, 8) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_backoff_jitter_stays_within_half_and_full_ceiling(rand: float) -> None:
    for attempt, delay in enumerate(_delays(rand, 12)):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
        assert delay == pytest.approx(ceiling / 2 + rand * ceiling / 2)


def test_backoff_never_exceeds_the_cap() -> None:
    assert max(_delays(1.0, 100)) == BACKOFF_CAP == 30.0


def test_backoff_takes_base_and_cap() -> None:
    assert list(itertools.islice(backoff(base=1, cap=5, rand=lambda: 1.0), 5)) == [1, 2, 4, 5, 5]


def test_backoff_calls_rand_once_per_delay() -> None:
    values = iter([0.0, 1.0, 0.5])
    assert list(itertools.islice(backoff(rand=lambda: next(values)), 3)) == [0.25, 1.0, 1.5]


@pytest.mark.parametrize(
    ("code", "retry"),
    [
        (4001, False),  # token refused
        (4003, False),  # name refused
        (4005, False),  # protocol version
        (1000, True),
        (1001, True),  # server going away
        (1006, True),  # connection lost
        (1011, True),
        (4008, True),  # heartbeat timeout
        (None, True),  # no close frame at all
    ],
)
def test_should_retry(code: int | None, retry: bool) -> None:
    assert should_retry(code) is retry


# -- AgentConfig.agent_url -------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("http://relay.test", "ws://relay.test/_relay/agent"),
        ("http://relay.test/", "ws://relay.test/_relay/agent"),
        ("http://localhost:8000", "ws://localhost:8000/_relay/agent"),
        ("https://relay.example.com", "wss://relay.example.com/_relay/agent"),
        ("https://relay.example.com:8443/", "wss://relay.example.com:8443/_relay/agent"),
    ],
)
def test_agent_url(server: str, url: str) -> None:
    assert AgentConfig(server=server, token="t", target=LOCAL).agent_url == url


@pytest.mark.parametrize("server", ["relay.test", "ws://relay.test", "ftp://relay.test", ""])
def test_agent_url_refuses_other_schemes(server: str) -> None:
    with pytest.raises(AgentConfigError, match="must start with http:// or https://"):
        AgentConfig(server=server, token="t", target=LOCAL).agent_url  # noqa: B018


# -- login file ------------------------------------------------------------------


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    return tmp_path


def test_login_file_is_under_xdg_config_home(config_home: Path) -> None:
    assert login_file() == config_home / "relay" / "agent.json"


def test_save_then_load_login(config_home: Path) -> None:
    path = save_login("https://relay.test", "tok.en.value")
    assert path == config_home / "relay" / "agent.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"server": "https://relay.test", "token": "tok.en.value"}
    assert load_login() == {"server": "https://relay.test", "token": "tok.en.value"}


def test_save_login_overwrites_and_tightens_an_existing_file(config_home: Path) -> None:
    path = config_home / "relay" / "agent.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"server": "http://old.test", "token": "old", "extra": "x" * 100}))
    path.chmod(0o644)
    save_login("http://new.test", "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_login() == {"server": "http://new.test", "token": "new"}


def test_load_login_without_a_file(config_home: Path) -> None:
    assert load_login() == {}


def test_load_login_keeps_only_strings(config_home: Path) -> None:
    path = config_home / "relay" / "agent.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"server": "http://relay.test", "token": 5, "x": None}))
    assert load_login() == {"server": "http://relay.test"}
    path.write_text("[1, 2]")
    assert load_login() == {}


def test_load_login_refuses_a_corrupt_file(config_home: Path) -> None:
    path = config_home / "relay" / "agent.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(AgentConfigError, match="run relay-agent login again"):
        load_login()


# -- forward: the response head the agent sends back -----------------------------


class _Link:
    """A forward.Link that keeps what the forwarder sends."""

    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.body = b""

    async def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        self.heads.append(head)
        self.body += body

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        self.body += chunk

    async def reset(self, code: int, reason: str) -> None:
        raise AssertionError("not reset here")

    async def body(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        yield b""


async def _forward_to_raw_app(answer: bytes, head: RequestHead) -> tuple[bytes, _Link | ForwardFailed]:
    """Forward ``head`` to a raw-socket app answering ``answer``: the request head
    bytes the app read, and the link (or the ForwardFailed raised)."""
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = AgentConfig(server="http://relay.test", token="t", target=Target("http", "127.0.0.1", port))
    link = _Link()
    try:
        local = LocalClient(config.target, False)
        try:
            async with client_session(config) as session:
                await forward(local, session, config, head, False, link)
        finally:
            await local.close()
    except ForwardFailed as exc:
        return seen[0], exc
    finally:
        server.close()
    return seen[0], link


async def test_forward_keeps_response_header_bytes() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Dup: 1\r\nx-dup: 2\r\nContent-Length: 2\r\n\r\nok"
    _, link = await _forward_to_raw_app(answer, RequestHead("GET", b"/", ((b"Host", b"public"),)))
    assert isinstance(link, _Link)
    [head] = link.heads
    assert head.headers[:3] == ((b"X-Latin", b"caf\xe9"), (b"X-Dup", b"1"), (b"x-dup", b"2"))
    assert link.body == b"ok"


async def test_forward_sends_the_request_headers_as_they_came() -> None:
    headers = ((b"X-Dup", b"1"), (b"Host", b"public"), (b"x-dup", b"2"), (b"X-Latin", b"caf\xe9"))
    answer = b"HTTP/1.1 204 No Content\r\n\r\n"
    seen, _ = await _forward_to_raw_app(answer, RequestHead("GET", b"/p?q=1", headers))
    lines = seen.split(b"\r\n")
    assert lines[0] == b"GET /p?q=1 HTTP/1.1"
    port = lines[2].rsplit(b":", 1)[1]
    # Host rewritten in its place; nothing added, nothing merged, no byte re-encoded.
    assert lines[1:5] == [b"X-Dup: 1", b"Host: 127.0.0.1:" + port, b"x-dup: 2", b"X-Latin: caf\xe9"]
    assert not any(line.lower().startswith((b"user-agent", b"accept")) for line in lines)


async def test_forward_resets_on_a_response_it_cannot_parse() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (MAX_RESPONSE_HEADER_LINE + 1) + b"\r\n\r\n"
    _, failed = await _forward_to_raw_app(answer, RequestHead("GET", b"/", ()))
    assert isinstance(failed, ForwardFailed)
    assert failed.code == RESET_BAD_RESPONSE
    assert str(failed).startswith("the agent cannot parse the response")


class _CreditLog:
    """A stand-in for the agent's session: what ``AgentStream`` grants the server."""

    def __init__(self) -> None:
        self.granted: list[int] = []

    async def consumed(self, stream_id: int, size: int) -> None:
        self.granted.append(size)


@pytest.mark.parametrize("first", [b"", b"ab"])
async def test_a_request_body_is_granted_back_chunk_by_chunk_once_the_target_takes_the_next(
    first: bytes,
) -> None:
    # The body's iterator replaced an async generator (mypyc compiles none): each chunk's
    # credit goes back only when the target asks for the one after it, the last at the end.
    credit = _CreditLog()
    head = RequestHead("POST", b"/hook", ((b"Host", b"app"),))
    stream = AgentStream(credit, Open(1, head, end_stream=False, body=first))  # type: ignore[arg-type]
    body = aiter(stream.body())
    chunks = [first] if first else []
    for data in (b"cde", b"fghi"):
        stream.feed(data, end=False)
        chunks.append(data)
    taken = [await anext(body) for _ in chunks]
    assert taken == chunks
    assert credit.granted == [len(c) for c in chunks[:-1]]  # the last one not asked past yet
    stream.feed(b"", end=True)
    with pytest.raises(StopAsyncIteration):
        await anext(body)
    assert credit.granted == [len(c) for c in chunks]
    with pytest.raises(StopAsyncIteration):
        await anext(body)  # and nothing granted twice
    assert credit.granted == [len(c) for c in chunks]


async def test_a_request_body_waits_for_its_next_chunk_and_a_cancelled_wait_grants_nothing_twice() -> None:
    credit = _CreditLog()
    stream = AgentStream(credit, Open(1, RequestHead("POST", b"/", ()), end_stream=False))  # type: ignore[arg-type]
    body = aiter(stream.body())
    stream.feed(b"one", end=False)
    assert await anext(body) == b"one"
    waiting = asyncio.ensure_future(anext(body))
    await asyncio.sleep(0)
    assert credit.granted == [3] and not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    stream.feed(b"two", end=True)
    assert await anext(body) == b"two"
    assert credit.granted == [3]  # "one" once, though asked past twice
