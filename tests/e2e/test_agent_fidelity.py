"""Issue 8 §5, the agent's side: header bytes pass unchanged both ways.

The local service here is a raw asyncio server that records the exact bytes of each
request head and answers with canned bytes, so neither direction goes through an
HTTP library that could tidy the bytes up before the test sees them.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from .framework import Relay, RelayServer, api, fetch, raw_exchange, until


def _answer(*headers: bytes, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"Content-Length: 2\r\n\r\nok"


GZIPPED = gzip.compress(b"coded for the transfer, not the content " * 20, mtime=0)
#: Response header lines the relay accepts on requests (16 KiB a line, 240 fields) pass.
BIG_LINE = b"X-Big: " + b"b" * 9000
MANY = tuple(b"X-Field-%d: %d" % (i, i) for i in range(200))
#: What no relay limit allows: the agent answers RESET, the server 502 local-bad-response.
ANSWERS = {
    b"/latin": _answer(b"X-Latin: caf\xe9", b"X-City: S\xc3\xa3o Paulo", b"X-Dup: 1", b"x-dup: 2"),
    b"/big-line": _answer(BIG_LINE),
    b"/big-line-16k": _answer(b"X-Big: " + b"c" * (16 * 1024 - 16)),
    b"/many-fields": _answer(*MANY),
    b"/too-long-line": _answer(b"X-Huge: " + b"h" * (20 * 1024)),
    b"/too-many-fields": _answer(*(b"X-F%d: v" % i for i in range(300))),
    b"/bad-status-line": b"garbage, not HTTP\r\n\r\n",
    b"/own-server": _answer(b"Server: my-app/1.0", b"Content-Type: text/plain"),
    # A transfer coding the relay would undo without saying so: the client would get
    # gzip bytes named as nothing (RFC 9112 6.1). Chunked, and delimited by the close.
    b"/te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(GZIPPED), GZIPPED),
    b"/te-gzip-close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n" + GZIPPED,
    # chunked twice (RFC 9112 6.1 forbids it): taken off once, the inner framing would
    # reach the client as the body; in two fields, or in one.
    b"/te-chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
    + b"f\r\n5\r\nhello\r\n0\r\n\r\n\r\n0\r\n\r\n",
    b"/te-chunked-two-fields": b"HTTP/1.1 200 OK\r\n"
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"f\r\n5\r\nhello\r\n0\r\n\r\n\r\n0\r\n\r\n",
    # A tab after it: llhttp does not take it for chunked, and reads to the close.
    b"/te-chunked-tab": b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\tchunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # Legal: no body for the coding to apply to (RFC 9112 6.1), and empty list elements.
    b"/te-304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n',
    b"/te-head": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"/te-empty-element": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    # But after chunked, llhttp no longer reads the body as chunked: to the close.
    b"/te-chunked-comma": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    # HTTP/1.0 with Transfer-Encoding: framing faulty (RFC 9112 6.1), so never reused.
    b"/te-http10": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"2\r\nok\r\n0\r\n\r\n",
}
#: The target's own headers on its 101, besides the handshake's.
UPGRADED = [b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"X-App: caf\xe9"]
#: Seconds for the relay to record an attempt (it records in the background).
DELIVERED = 20.0
BAD = [
    b"/too-long-line",
    b"/too-many-fields",
    b"/bad-status-line",
    b"/te-gzip-chunked",
    b"/te-gzip-close",
    b"/te-chunked-twice",
    b"/te-chunked-two-fields",
    b"/te-chunked-tab",
    b"/te-chunked-comma",
]
#: RFC 6455 1.3: the GUID the accept value hashes with the key.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class RawTarget:
    """A local service on a raw socket: records every request head's bytes, answers from ANSWERS."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0
        #: Connections accepted so far, and the number of the one each head came on.
        self.connections = 0
        self.connection_of: list[int] = []

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def seen(self, path: bytes) -> list[bytes]:
        return [h for h in self.heads if h.split(b" ", 2)[1] == path]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                self.connection_of.append(number)
                path = head.split(b" ", 2)[1]
                if (_header(head, b"upgrade") or b"").lower() == b"websocket" and path not in ANSWERS:
                    await self._websocket(head, reader, writer)
                    break
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")  # no trailers from the agent
                writer.write(ANSWERS.get(path, _answer()))
                await writer.drain()
                if path in BAD:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _websocket(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Accept the handshake, close at once (CLOSE 1000), read until the peer hangs up."""
        key = _header(head, b"sec-websocket-key") or b""
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n" + b"\r\n".join(UPGRADED) + b"\r\n\r\n"
            b"\x88\x02\x03\xe8"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            while await reader.read(4096):
                pass


@pytest.fixture(scope="module")
def raw_target() -> Iterator[RawTarget]:
    target = RawTarget()
    target.start()
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="module")
def stack(module_relay: Relay, raw_target: RawTarget) -> dict[str, Any]:
    server = module_relay.server("--retry-schedule", "1h", "--timeout", "10")
    token = server.token("alice")
    forward = f"127.0.0.1:{raw_target.port}"
    module_relay.agent(server, token, forward, "alice", extra=["--mode", "live"])
    module_relay.agent(server, token, forward, "alice-q", extra=["--mode", "queue"])
    return {"server": server, "token": token}


@pytest.fixture(autouse=True)
def fresh(raw_target: RawTarget) -> None:
    raw_target.heads.clear()


def _request(server: RelayServer, name: str, method: str, path: str, headers: list[bytes]) -> bytes:
    lines = [f"{method} /t/{name}{path} HTTP/1.1".encode(), f"Host: {server.apex}".encode(), *headers]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _header_lines(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")[1:-2]


@pytest.mark.parametrize(
    "sent",
    [
        [b"X-Dup: 1", b"x-dup: 2"],
        [b"x-dup: 1", b"X-Dup: 2", b"X-DUP: 3"],
        [b"X-Dup: 1", b"X-Other: between", b"x-dup: 2"],
        [b"Accept: text/html", b"accept: application/json"],
        [b"Cookie: a=1", b"cookie: b=2"],
    ],
)
async def test_repeated_request_headers_differing_in_case_all_arrive_in_order(
    stack: dict[str, Any], raw_target: RawTarget, sent: list[bytes]
) -> None:
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", "/dup", sent))
    assert reply.status == 200, reply
    [head] = raw_target.seen(b"/dup")
    names = {line.split(b":")[0].lower() for line in sent}
    arrived = [line for line in _header_lines(head) if line.split(b":")[0].lower() in names]
    assert arrived == sent, head


@pytest.mark.parametrize(
    "sent",
    [
        b"X-City: S\xc3\xa3o Paulo",  # UTF-8
        b"X-Latin: caf\xe9",  # latin-1: not UTF-8 at all
        b"X-Bytes: \x80\x9f\xa0\xff",  # obs-text, each byte alone
        b"X-Tab: a\tb",  # HTAB is allowed inside a value
    ],
)
async def test_non_ascii_request_header_bytes_reach_the_app_unchanged(
    stack: dict[str, Any], raw_target: RawTarget, sent: bytes
) -> None:
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "POST", "/bytes", [sent]))
    assert reply.status == 200, reply
    [head] = raw_target.seen(b"/bytes")
    assert sent in _header_lines(head), head


async def test_the_apps_response_header_bytes_reach_the_client_unchanged(stack: dict[str, Any]) -> None:
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", "/latin", []))
    assert reply.status == 200, reply
    # raw_exchange reads the head as latin-1: one character per byte on the wire.
    assert reply.getall("X-Latin") == ["caf\xe9"]
    assert reply.getall("X-City") == ["S\xc3\xa3o Paulo"]
    assert [(k, v) for k, v in reply.headers if k.lower() == "x-dup"] == [("X-Dup", "1"), ("x-dup", "2")]


@pytest.mark.parametrize("name", ["alice", "alice-q"])
async def test_a_response_gets_no_header_the_app_did_not_send_but_date(
    stack: dict[str, Any], name: str
) -> None:
    # Found by a review: aiohttp added "Server: Python/3.11 aiohttp/..." to every relayed
    # response (naming the relay's software and version). Date is the one a proxy must
    # add when the origin sent none (RFC 9110 6.6.1).
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, name, "POST", "/plain", []))
    assert reply.status == 200, reply
    assert sorted({k.lower() for k, _ in reply.headers}) == ["connection", "content-length", "date"], reply
    reply, _ = await raw_exchange(server.port, _request(server, name, "POST", "/own-server", []))
    assert reply.getall("Server") == ["my-app/1.0"], reply
    assert reply.getall("Content-Type") == ["text/plain"], reply


@pytest.mark.parametrize("path", [b"/big-line", b"/big-line-16k", b"/many-fields"])
async def test_response_heads_as_large_as_the_relay_accepts_on_requests_pass(
    stack: dict[str, Any], path: bytes
) -> None:
    server = stack["server"]
    # A raw client: aiohttp's own client would refuse these heads (8,190-byte lines).
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", path.decode(), []))
    assert (reply.status, reply.body) == (200, b"ok"), reply
    if path == b"/many-fields":
        assert [v for k, v in reply.headers if k.startswith("X-Field-")] == [str(i) for i in range(200)]
    else:
        [line] = [line for line in _header_lines(ANSWERS[path]) if line.startswith(b"X-Big")]
        assert reply.header("X-Big") == line.split(b": ", 1)[1].decode()


@pytest.mark.parametrize("path", BAD)
async def test_a_response_the_agent_cannot_parse_is_a_502_naming_it(
    stack: dict[str, Any], http: aiohttp.ClientSession, path: bytes
) -> None:
    server = stack["server"]
    reply = await fetch(http, "GET", server.url("/t/alice" + path.decode()), server.apex)
    assert reply.status == 502, reply
    assert reply.relay_error == "local-bad-response"
    assert b"cannot be relayed" in reply.body, reply.body


async def _event(http: aiohttp.ClientSession, stack: dict[str, Any], event_id: str) -> dict[str, Any]:
    reply = await api(http, stack["server"], stack["token"], "GET", f"events/{event_id}")
    assert reply.status == 200, reply.body
    return dict(reply.json())


async def test_queue_mode_a_big_response_head_is_a_delivery_not_a_failure(
    stack: dict[str, Any], http: aiohttp.ClientSession, raw_target: RawTarget
) -> None:
    server = stack["server"]
    request = _request(server, "alice-q", "POST", "/big-line", [b"Content-Length: 2"]) + b"{}"
    reply, _ = await raw_exchange(server.port, request)
    assert (reply.status, reply.body) == (200, b"ok"), reply  # the app's own answer

    async def delivered() -> dict[str, Any] | None:
        listed = await api(http, server, stack["token"], "GET", "events?name=alice-q")
        events = [e for e in listed.json()["events"] if e["target"] == "/big-line"]
        return events[0] if events and events[0]["status"] == "delivered" else None

    event = await until(delivered, DELIVERED, "the event to be delivered")
    [delivery] = event["deliveries"]
    assert (delivery["attempts"], delivery["last_status"]) == (1, 200)
    assert len(raw_target.seen(b"/big-line")) == 1  # never redelivered


@pytest.mark.parametrize("path", BAD)
async def test_queue_mode_a_response_the_agent_cannot_parse_is_recorded_with_that_reason(
    stack: dict[str, Any], http: aiohttp.ClientSession, path: bytes
) -> None:
    server = stack["server"]
    reply = await fetch(http, "POST", server.url("/t/alice-q" + path.decode()), server.apex, body=b"{}")
    assert reply.status == 202, reply
    event_id = reply.header("X-Relay-Event")
    assert event_id

    async def recorded() -> dict[str, Any] | None:
        event = await _event(http, stack, event_id)
        return event if event["deliveries"][0]["attempts"] >= 1 else None

    event = await until(recorded, DELIVERED, "the attempt to be recorded")
    [delivery] = event["deliveries"]
    assert event["status"] == "retrying"
    assert delivery["last_status"] is None
    assert "local-bad-response" in (delivery["last_error"] or ""), delivery


async def test_websocket_upgrade_headers_reach_the_app_unchanged(
    stack: dict[str, Any], raw_target: RawTarget
) -> None:
    server = stack["server"]
    # A raw public client: aiohttp's would merge the X-Dup lines and encode the bytes as UTF-8.
    key = base64.b64encode(b"relay-fidelity-k")
    sent = [b"X-Dup: 1", b"x-dup: 2", b"X-Latin: caf\xe9", b"X-City: S\xc3\xa3o Paulo"]
    handshake = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key]
    lines = [b"GET /t/alice/ws HTTP/1.1", f"Host: {server.apex}".encode(), *handshake]
    lines += [b"Sec-WebSocket-Version: 13", *sent]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            reply = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 101 "), reply
    assert _header(reply, b"sec-websocket-accept") == _accept(key), reply
    # The app's own 101 headers come back, in order (a review found them dropped), and
    # nothing the app did not send but Date (RFC 9110 6.6.1).
    assert [
        line for line in _header_lines(reply) if line.split(b":")[0].lower() in {b"set-cookie", b"x-app"}
    ] == UPGRADED
    assert _header(reply, b"server") is None, reply
    [head] = raw_target.seen(b"/ws")
    names = {b"x-dup", b"x-latin", b"x-city"}
    arrived = [line for line in _header_lines(head) if line.split(b":")[0].lower() in names]
    assert arrived == sent, head
    # aiohttp's own handshake headers are there, once each, with its own key.
    for name in (b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version"):
        assert [line.split(b":")[0].lower() for line in _header_lines(head)].count(name) == 1, head
    assert _header(head, b"sec-websocket-key") != key, head


@pytest.mark.parametrize("name", ["alice", "alice-q"])
@pytest.mark.parametrize(
    "fields",
    [
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: deflate, chunked"],
        [b"Transfer-Encoding: x-custom, chunked"],
        [b"Transfer-Encoding: identity, chunked"],  # identity left the registry (RFC 7230 8.4)
    ],
)
async def test_a_request_body_in_a_transfer_coding_other_than_chunked_is_refused_501(
    stack: dict[str, Any], http: aiohttp.ClientSession, raw_target: RawTarget, name: str, fields: list[bytes]
) -> None:
    """Undone on the way, the coding would reach the app applied but no longer named."""
    server = stack["server"]
    body = gzip.compress(b'{"event": "push"}', mtime=0)
    request = _request(server, name, "POST", "/te-in", fields) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply, _ = await raw_exchange(server.port, request)
    assert reply.status == 501, reply
    assert reply.relay_error == "unsupported-transfer-coding"
    assert b"only chunked" in reply.body
    listed = await api(http, server, stack["token"], "GET", f"events?name={name}")
    assert [e for e in listed.json()["events"] if e["target"] == "/te-in"] == []  # nothing stored
    # and nothing forwarded: a request the relay takes reaches the app before its answer
    reply, _ = await raw_exchange(
        server.port, _request(server, name, "POST", "/te-after", [b"Content-Length: 0"])
    )
    assert reply.status in (200, 202), reply
    assert raw_target.seen(b"/te-in") == []


async def test_an_apps_refusal_of_a_websocket_upgrade_in_another_transfer_coding_is_a_502(
    stack: dict[str, Any],
) -> None:
    """The answer to an upgrade that is not a 101 goes back as an answer: the same rule."""
    server = stack["server"]
    key = base64.b64encode(b"relay-fidelity-k")
    handshake = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key]
    request = _request(server, "alice", "GET", "/te-gzip-chunked", [*handshake, b"Sec-WebSocket-Version: 13"])
    reply, _ = await raw_exchange(server.port, request)
    assert reply.status == 502, reply
    assert reply.relay_error == "local-bad-response"
    assert GZIPPED not in reply.body


@pytest.mark.parametrize(("method", "path", "status"), [("HEAD", "/te-head", 200), ("GET", "/te-304", 304)])
async def test_an_answer_without_a_body_may_name_a_transfer_coding(
    stack: dict[str, Any], method: str, path: str, status: int
) -> None:
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", method, path, []))
    assert reply.status == status, reply
    assert reply.relay_error is None
    assert reply.header("Transfer-Encoding") is None  # hop-by-hop: never passed on as it came


async def test_empty_elements_of_transfer_encoding_are_ignored_both_ways(
    stack: dict[str, Any], raw_target: RawTarget
) -> None:
    """RFC 9110 5.6.1: ", chunked" is chunked."""
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", "/te-empty-element", []))
    assert (reply.status, reply.body) == (200, b"ok"), reply
    request = _request(server, "alice", "POST", "/te-empty-in", [b"Transfer-Encoding: , chunked"])
    reply, _ = await raw_exchange(server.port, request + b"5\r\nhello\r\n0\r\n\r\n")
    assert reply.status == 200, reply
    [head] = raw_target.seen(b"/te-empty-in")
    assert _header(head, b"transfer-encoding") == b"chunked", head  # the agent's own framing


@pytest.mark.parametrize("name", ["alice", "alice-q"])
async def test_transfer_encoding_in_an_http_1_0_request_is_refused_400_and_the_connection_closed(
    stack: dict[str, Any], raw_target: RawTarget, name: str
) -> None:
    """RFC 9112 6.1: its framing is faulty; what follows it is never read as a request."""
    server = stack["server"]
    request = (
        f"POST /t/{name}/te-10 HTTP/1.0\r\nHost: {server.apex}\r\nConnection: keep-alive\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        f"GET /t/{name}/te-10-second HTTP/1.1\r\nHost: {server.apex}\r\n\r\n"
    ).encode()
    reply, rest = await raw_exchange(server.port, request)
    assert reply.status == 400, reply
    assert reply.relay_error == "bad-request"
    assert b"HTTP/1.0 request" in reply.body
    assert rest == b""
    assert raw_target.seen(b"/te-10") == raw_target.seen(b"/te-10-second") == []


async def test_an_http_1_0_answer_with_transfer_encoding_closes_its_connection(
    stack: dict[str, Any], raw_target: RawTarget
) -> None:
    server = stack["server"]
    reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", "/te-http10", []))
    assert (reply.status, reply.body) == (200, b"ok"), reply
    used = raw_target.connection_of[-1]
    for path in ("/te-after-1", "/te-after-2", "/te-after-3"):
        reply, _ = await raw_exchange(server.port, _request(server, "alice", "GET", path, []))
        assert reply.status == 200, reply
    assert raw_target.connection_of[-3:].count(used) == 0  # never reused


@pytest.mark.parametrize("body", [[b"Content-Length: 5"], [b"Transfer-Encoding: chunked"]])
async def test_a_websocket_upgrade_request_with_a_body_is_refused_400(
    stack: dict[str, Any], raw_target: RawTarget, body: list[bytes]
) -> None:
    """RFC 9110 7.8: the switch comes after the request. Its body once reached the
    websocket stream as messages of the client's making (an attacker's review)."""
    server = stack["server"]
    key = base64.b64encode(b"relay-fidelity-k")
    handshake = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key]
    request = _request(server, "alice", "GET", "/ws-body", [*handshake, b"Sec-WebSocket-Version: 13", *body])
    payload = b"\x01\x00\x00\x00\x05hello"  # a message frame of the relay's own stream format
    if body[0].startswith(b"Transfer-Encoding"):
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    else:
        payload = payload[:5]
    reply, _ = await raw_exchange(server.port, request + payload)
    assert reply.status == 400, reply
    assert reply.relay_error == "bad-request"
    assert raw_target.seen(b"/ws-body") == []


async def _expecting(port: int, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` (with Expect: 100-continue), read the first answer's head; send
    ``body`` only if that was 100 Continue, then read the rest. Returns both (the rest
    empty when the body was not asked for)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            first = await reader.readuntil(b"\r\n\r\n")
            if not first.startswith(b"HTTP/1.1 100 "):
                return first, b""  # the body was never sent: the server closes when it gives up on it
            writer.write(body)
            await writer.drain()
            return first, await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("name", ["alice", "alice-q"])
async def test_expect_100_continue_is_answered_once_the_relay_takes_the_body(
    stack: dict[str, Any], raw_target: RawTarget, name: str
) -> None:
    server = stack["server"]
    body = b'{"action": "opened"}'
    head = _request(
        server, name, "POST", "/expected", [b"Expect: 100-continue", b"Content-Length: %d" % len(body)]
    )
    first, rest = await _expecting(server.port, head, body)
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    assert rest.startswith(b"HTTP/1.1 200 "), rest
    [seen] = raw_target.seen(b"/expected")
    assert _header(seen, b"expect") is None  # consumed by the relay: its own 100 answered it


@pytest.mark.parametrize(
    ("name", "fields", "status", "error"),
    [
        ("nobody", [b"Content-Length: 5"], 404, b"unknown-tunnel"),
        ("alice", [b"Transfer-Encoding: gzip, chunked"], 501, b"unsupported-transfer-coding"),
        ("alice-q", [b"Transfer-Encoding: gzip, chunked"], 501, b"unsupported-transfer-coding"),
    ],
)
async def test_a_request_refused_before_its_body_gets_no_100_continue(
    stack: dict[str, Any], name: str, fields: list[bytes], status: int, error: bytes
) -> None:
    """aiohttp answered 100 before the relay looked: the client uploaded a body that was
    thrown away (an attacker's review)."""
    server = stack["server"]
    first, _ = await _expecting(
        server.port, _request(server, name, "POST", "/x", [b"Expect: 100-continue", *fields]), b""
    )
    assert first.startswith(b"HTTP/1.1 %d " % status), first
    assert _header(first, b"x-relay-error") == error


async def _streams_open(server: RelayServer) -> int:
    reply, _ = await raw_exchange(
        server.port, f"GET /metrics HTTP/1.1\r\nHost: {server.apex}\r\nConnection: close\r\n\r\n".encode()
    )
    [line] = [line for line in reply.body.decode().splitlines() if line.startswith("relay_streams_open ")]
    return int(float(line.split()[1]))


async def test_a_client_gone_before_its_100_continue_leaves_no_stream_open(stack: dict[str, Any]) -> None:
    """A review left 1,000 streams open this way (the agent's limit: 429 for everyone),
    each a request to the app waiting for a body: the 100 failed to write, and the stream
    was never finished."""
    server = stack["server"]
    head = _request(server, "alice", "POST", "/gone", [b"Expect: 100-continue", b"Content-Length: 100"])
    for _ in range(30):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        writer.close()
    opened = 0

    async def none_left() -> bool:
        nonlocal opened
        opened = await _streams_open(server)
        return opened == 0

    await until(none_left, DELIVERED, f"every stream to be finished ({opened} open)")


@pytest.mark.parametrize(
    ("path", "fields", "status"),
    [
        ("/t/nobody/x", [b"Content-Length: 20"], 404),  # refused by the ingress
        ("/_relay/api/tunnels/alice", [b"Content-Length: 20", b"Authorization: Bearer nope"], 401),
        ("/healthz", [b"Content-Length: 20"], 200),  # a page that reads no body
    ],
)
async def test_an_answer_given_without_100_continue_closes_the_connection(
    stack: dict[str, Any], path: str, fields: list[bytes], status: int
) -> None:
    """RFC 9110 10.1.1: else a keep-alive client must upload the body all the same, and
    its next request on the connection would be read as that body. (aiohttp still reads
    what of the body comes for its lingering time, 10 s, before it closes.)"""
    server = stack["server"]
    head = b"\r\n".join(
        [f"POST {path} HTTP/1.1".encode(), f"Host: {server.apex}".encode(), b"Expect: 100-continue", *fields]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            first = await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 %d " % status), first
            # The client need not send it: the server closes once it gave up on it.
            assert (_header(first, b"connection") or b"").lower() == b"close", first
    finally:
        writer.close()


async def test_the_api_asks_for_the_body_once_the_token_is_checked(stack: dict[str, Any]) -> None:
    server = stack["server"]
    body = b'{"max_concurrency": 8}'
    head = b"\r\n".join(
        [
            b"PATCH /_relay/api/tunnels/alice HTTP/1.1",
            f"Host: {server.apex}".encode(),
            f"Authorization: Bearer {stack['token']}".encode(),
            b"Content-Type: application/json",
            b"Expect: 100-continue",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
    )
    first, rest = await _expecting(server.port, head + b"\r\n\r\n", body)
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    assert rest.startswith(b"HTTP/1.1 200 "), rest
