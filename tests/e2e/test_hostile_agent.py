"""A hostile agent cannot answer for another tenant (issue 8, §1 and §5).

Alice's agent holds a valid token but runs hostile code: a fake agent written with the
``websockets`` client and relay_protocol's frames, answering each OPEN as scripted. It
tries to frame a second response inside its own (a body after 204, 304, HEAD or a 101
to a plain GET; a body shorter or longer than its Content-Length; conflicting lengths),
so that a keep-alive client's next request, ``GET /t/bob/account``, would read alice's
forged bytes as bob's answer. The relay frames every response itself: the client gets
bob's real answer, or a closed connection, never the forgery.

bob is a second tenant with a real agent and target, shared by the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay_protocol import (
    PROTOCOL_VERSION,
    Data,
    Hello,
    Open,
    Ping,
    Pong,
    RequestHead,
    Response,
    ResponseHead,
    Welcome,
    decode,
    encode,
)
from relay_protocol.frames import FEATURE_INLINE_BODY

from .framework import Relay, RelayServer, Tunnel, raw_exchange

FORGED_BODY = b"forged answer for bob"
#: What alice's agent tries to slip into the client's connection as the next response.
FORGED = (
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Forged: yes\r\nX-Target: bob\r\n\r\n" % len(FORGED_BODY)
    + FORGED_BODY
)
#: Seconds a client waits for any one answer: far above what each takes, so a relay
#: that leaves the client hanging fails the test instead of hanging it.
CLIENT_TIMEOUT = 20.0

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass
class Answer:
    """How the hostile agent answers one path: a head, then DATA chunks, then END."""

    status: int
    headers: Headers = ()
    chunks: tuple[bytes, ...] = ()


#: path (after /t/alice) -> what alice's agent answers.
SCRIPT: dict[str, Answer] = {
    "/204-body": Answer(204, (), (FORGED,)),
    "/304-body": Answer(304, ((b"ETag", b'"x"'),), (FORGED,)),
    "/head-body": Answer(200, ((b"Content-Length", b"%d" % len(FORGED)),), (FORGED,)),
    "/101-to-get": Answer(101, ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")), (FORGED,)),
    "/100-final": Answer(100, (), (FORGED,)),
    "/103-final": Answer(103, ((b"Link", b"</x>; rel=preload"),), (FORGED,)),
    "/short-body": Answer(200, ((b"Content-Length", b"100"),), (b"ok",)),
    "/long-body": Answer(200, ((b"Content-Length", b"2"),), (b"ok", FORGED)),
    "/long-in-one": Answer(200, ((b"Content-Length", b"2"),), (b"ok" + FORGED,)),
    "/two-lengths": Answer(
        200, ((b"Content-Length", b"2"), (b"Content-Length", b"%d" % (2 + len(FORGED)))), (b"ok" + FORGED,)
    ),
    "/length-list": Answer(200, ((b"Content-Length", b"2, %d" % (2 + len(FORGED))),), (b"ok" + FORGED,)),
    "/length-and-chunked": Answer(
        200, ((b"Content-Length", b"2"), (b"Transfer-Encoding", b"chunked")), (b"ok" + FORGED,)
    ),
    "/bad-length": Answer(200, ((b"Content-Length", b"+2"),), (b"ok" + FORGED,)),
    # Not forgeries: what a legitimate answer looks like, and the header rules of §5.
    "/fine": Answer(200, ((b"Content-Length", b"4"),), (b"fi", b"ne")),
    "/fine-repeated-length": Answer(200, ((b"Content-Length", b"4"), (b"Content-Length", b"4")), (b"fine",)),
    "/unsized": Answer(200, (), (b"un", b"sized")),
    "/unsized-whole": Answer(200, (), (b"unsized",)),
    "/relay-error": Answer(
        200, ((b"X-Relay-Error", b"tunnel-offline"), (b"Content-Length", b"4")), (b"fine",)
    ),
    "/latin": Answer(
        200, ((b"X-Latin", b"caf\xe9"), (b"X-Utf8", b"S\xc3\xa3o"), (b"Content-Length", b"2")), (b"ok",)
    ),
    "/control-char": Answer(200, ((b"X-Bad", b"a\x01b"), (b"Content-Length", b"2")), (b"ok",)),
}

#: Each forgery, and the method the client sends for it.
FORGERIES = [
    ("GET", "/204-body"),
    ("GET", "/304-body"),
    ("HEAD", "/head-body"),
    ("GET", "/101-to-get"),
    ("GET", "/100-final"),
    ("GET", "/103-final"),
    ("GET", "/short-body"),
    ("GET", "/long-body"),
    ("GET", "/long-in-one"),
    ("GET", "/two-lengths"),
    ("GET", "/length-list"),
    ("GET", "/length-and-chunked"),
    ("GET", "/bad-length"),
]


@dataclass
class HostileAgent:
    """A fake agent for ``alice``: answers every OPEN from ``SCRIPT``, records the heads."""

    ws: ClientConnection
    opened: list[RequestHead] = field(default_factory=list)
    #: Send the first chunk inside the RESPONSE (the "inline-body" feature, BODY flag).
    inline: bool = False

    async def serve(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                assert isinstance(message, bytes)
                frame = decode(message)
                if isinstance(frame, Ping):
                    await self.ws.send(encode(Pong(frame.payload)))
                elif isinstance(frame, Open):
                    self.opened.append(frame.head)
                    await self.answer(frame)

    async def answer(self, frame: Open) -> None:
        path = frame.head.target.split(b"?", 1)[0].decode()
        answer = SCRIPT.get(path, Answer(200, ((b"Content-Length", b"5"),), (b"alice",)))
        sid = frame.stream_id
        last = len(answer.chunks) - 1
        head = ResponseHead(answer.status, answer.headers)
        if self.inline and answer.chunks:
            await self.ws.send(encode(Response(sid, head, last == 0, answer.chunks[0])))
            for i, chunk in enumerate(answer.chunks[1:], 1):
                await self.ws.send(encode(Data(sid, chunk, i == last)))
            return
        await self.ws.send(encode(Response(sid, head, last < 0)))
        for i, chunk in enumerate(answer.chunks):
            await self.ws.send(encode(Data(sid, chunk, i == last)))


@contextlib.asynccontextmanager
async def hostile_agent(
    server: RelayServer, token: str, name: str = "alice", inline: bool = False
) -> AsyncIterator[HostileAgent]:
    """Connect as ``name``'s agent (HELLO, WELCOME), answer OPENs until the block ends;
    with ``inline``, list the "inline-body" feature and answer with bodies in RESPONSE."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    ws = await connect(
        f"ws://{server.apex}/_relay/agent",  # the apex as Host; the socket is already connected
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        compression=None,
        max_size=None,
    )
    features = (FEATURE_INLINE_BODY,) if inline else ()
    await ws.send(encode(Hello(PROTOCOL_VERSION, ({"name": name},), "hostile-agent", features=features)))
    welcome = decode(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(welcome, Welcome), welcome
    agent = HostileAgent(ws, inline=inline)
    task = asyncio.create_task(agent.serve())
    try:
        yield agent
    finally:
        await ws.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(scope="module")
def bob(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="bob")


@pytest.fixture(params=["data", "inline-body"])
async def alice(bob: Tunnel, request: pytest.FixtureRequest) -> AsyncIterator[HostileAgent]:
    """Alice's hostile agent, sending bodies in DATA frames, or (as a current agent does)
    the first chunk inside its RESPONSE."""
    async with hostile_agent(bob.server, bob.server.token("alice"), inline=request.param != "data") as agent:
        yield agent


@dataclass
class Outcome:
    """One answer on a keep-alive connection, or the error the client got instead."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: BaseException | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def _one(conn: http.client.HTTPConnection, method: str, target: str, host: str) -> Outcome:
    try:
        conn.request(method, target, headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        return Outcome(response.status, response.getheaders(), body)
    except (http.client.HTTPException, OSError) as exc:
        return Outcome(error=exc)


def keep_alive_pair(server: RelayServer, method: str, path: str) -> tuple[Outcome, Outcome]:
    """``METHOD /t/alice/PATH`` then ``GET /t/bob/account`` on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
    try:
        first = _one(conn, method, f"/t/alice{path}", server.apex)
        second = _one(conn, "GET", "/t/bob/account", server.apex)
        return first, second
    finally:
        conn.close()


async def until_closed(server: RelayServer, request: str) -> bytes:
    """Send ``request`` on a fresh connection; every byte that comes back until the relay
    closes it (a relay that keeps it open fails the test after ``CLIENT_TIMEOUT``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request.encode())
        received = b""
        async with asyncio.timeout(CLIENT_TIMEOUT):
            while chunk := await reader.read():
                received += chunk
        return received
    finally:
        writer.close()


def assert_bobs_own_or_closed(second: Outcome) -> None:
    """The one acceptable fates of the bob request: bob's real answer, or a closed connection."""
    assert not isinstance(second.error, TimeoutError), "the client was left hanging"
    if second.error is None:
        assert second.header("X-Forged") is None, second
        assert FORGED_BODY not in second.body, second
        assert second.status == 200, second
        assert second.header("X-Target") == "bob"
        assert json.loads(second.body)["path"] == "/account"


@pytest.mark.parametrize(("method", "path"), FORGERIES, ids=[p.strip("/") for _, p in FORGERIES])
async def test_a_forged_response_never_reaches_another_tenants_request(
    bob: Tunnel, alice: HostileAgent, method: str, path: str
) -> None:
    for _ in range(3):  # it was 3 of 3: once is not luck
        first, second = await asyncio.to_thread(keep_alive_pair, bob.server, method, path)
        assert not isinstance(first.error, TimeoutError), f"the client was left hanging: {first}"
        assert FORGED_BODY not in first.body
        assert first.header("X-Forged") is None
        assert_bobs_own_or_closed(second)
    assert alice.opened, "the hostile agent never got the request"


@pytest.mark.parametrize(
    "path",
    [
        "/101-to-get",
        "/100-final",
        "/103-final",
        "/two-lengths",
        "/length-list",
        "/length-and-chunked",
        "/bad-length",
    ],
)
async def test_an_unframeable_head_is_a_502(bob: Tunnel, alice: HostileAgent, path: str) -> None:
    first, _ = await asyncio.to_thread(keep_alive_pair, bob.server, "GET", path)
    assert first.status == 502, first
    assert first.header("X-Relay-Error") == "local-bad-response"


@pytest.mark.parametrize(("path", "status"), [("/204-body", 204), ("/304-body", 304)])
async def test_no_body_is_written_after_204_and_304(
    bob: Tunnel, alice: HostileAgent, path: str, status: int
) -> None:
    request = f"GET /t/alice{path} HTTP/1.1\r\nHost: {bob.server.apex}\r\nConnection: close\r\n\r\n"
    reply, rest = await raw_exchange(bob.server.port, request.encode())
    assert reply.status == status
    assert rest == b"", f"bytes after a {status} head: {rest!r}"


async def test_no_body_is_written_after_a_head_answer(bob: Tunnel, alice: HostileAgent) -> None:
    request = f"HEAD /t/alice/head-body HTTP/1.1\r\nHost: {bob.server.apex}\r\nConnection: close\r\n\r\n"
    reply, rest = await raw_exchange(bob.server.port, request.encode())
    assert reply.status == 200
    assert reply.header("Content-Length") == str(len(FORGED))  # HEAD keeps the length GET would have
    assert rest == b"", f"bytes after a HEAD answer: {rest!r}"


@pytest.mark.parametrize("path", ["/short-body", "/long-body", "/long-in-one"])
async def test_a_body_that_does_not_match_its_length_closes_the_connection(
    bob: Tunnel, alice: HostileAgent, path: str
) -> None:
    # Without "Connection: close": a relay that keeps the connection open hangs raw_exchange.
    request = f"GET /t/alice{path} HTTP/1.1\r\nHost: {bob.server.apex}\r\n\r\n"
    received = await until_closed(bob.server, request)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), received
    assert FORGED_BODY not in body
    assert body == b"ok"  # what the agent sent, up to the length it declared


@pytest.mark.parametrize("path", ["/fine", "/fine-repeated-length", "/unsized"])
async def test_a_well_framed_answer_keeps_the_connection(bob: Tunnel, alice: HostileAgent, path: str) -> None:
    first, second = await asyncio.to_thread(keep_alive_pair, bob.server, "GET", path)
    assert first.status == 200, first
    assert first.body in (b"fine", b"unsized")
    assert second.error is None, second
    assert_bobs_own_or_closed(second)


@pytest.mark.parametrize("path", ["/unsized", "/unsized-whole"])
async def test_a_body_without_a_length_ends_with_an_http10_clients_connection(
    bob: Tunnel, alice: HostileAgent, path: str
) -> None:
    # HTTP/1.0 has no chunked: a body without a length ends with the connection, even if
    # the client asked to keep it (aiohttp kept it open: a review found the client waiting
    # for the end, and a pipelined answer running on from the body).
    request = f"GET /t/alice{path} HTTP/1.0\r\nHost: {bob.server.apex}\r\nConnection: keep-alive\r\n\r\n"
    received = await until_closed(bob.server, request)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), received
    assert b"keep-alive" not in head.lower() and b"content-length" not in head.lower()
    assert body == b"unsized"


async def test_an_x_relay_error_from_the_agent_is_removed(bob: Tunnel, alice: HostileAgent) -> None:
    first, _ = await asyncio.to_thread(keep_alive_pair, bob.server, "GET", "/relay-error")
    assert first.status == 200
    assert first.header("X-Relay-Error") is None, first
    assert first.body == b"fine"


async def test_response_header_bytes_reach_the_client_unchanged(bob: Tunnel, alice: HostileAgent) -> None:
    request = f"GET /t/alice/latin HTTP/1.1\r\nHost: {bob.server.apex}\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.server.port)
    try:
        writer.write(request.encode())
        async with asyncio.timeout(CLIENT_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert b"\r\nX-Latin: caf\xe9\r\n" in head, head
    assert b"\r\nX-Utf8: S\xc3\xa3o\r\n" in head, head


async def test_a_response_header_with_control_characters_is_a_502(bob: Tunnel, alice: HostileAgent) -> None:
    first, _ = await asyncio.to_thread(keep_alive_pair, bob.server, "GET", "/control-char")
    assert first.status == 502
    assert first.header("X-Relay-Error") == "local-bad-response"


async def test_request_header_bytes_reach_the_agent_unchanged(bob: Tunnel, alice: HostileAgent) -> None:
    request = (
        f"GET /t/alice/bytes HTTP/1.1\r\nHost: {bob.server.apex}\r\nConnection: close\r\n".encode()
        + b"X-City: S\xc3\xa3o Paulo\r\nX-Latin: caf\xe9\r\nX-Tab: a\tb\r\n\r\n"
    )
    reply, _ = await raw_exchange(bob.server.port, request)
    assert reply.status == 200
    [head] = [h for h in alice.opened if h.target == b"/bytes"]
    headers = dict(head.headers)
    assert headers[b"X-City"] == b"S\xc3\xa3o Paulo"
    assert headers[b"X-Latin"] == b"caf\xe9"
    assert headers[b"X-Tab"] == b"a\tb"


async def test_the_agent_cannot_reach_bob_after_all_that(bob: Tunnel, alice: HostileAgent) -> None:
    """After every forgery above, bob's tunnel and alice's own answers are as they were."""
    for method, path in FORGERIES:
        await asyncio.to_thread(keep_alive_pair, bob.server, method, path)
    first, second = await asyncio.to_thread(keep_alive_pair, bob.server, "GET", "/anything")
    assert first.status == 200 and first.body == b"alice"
    assert second.error is None
    assert_bobs_own_or_closed(second)


# -- malformed and oversized frames: the agent's own connection ends, nobody else's ----------

#: What a hostile agent sends after its handshake, and the close code the server must answer
#: with (docs/protocol.md): a frame over MAX_FRAME_SIZE (1009, message too big), bytes that
#: are no frame (1002), a frame on a stream never opened (1002), a text message (1003).
BAD_FRAMES = {
    "oversized": (b"\x05\x00\x00\x00\x00\x01" + b"x" * (2 * 1024 * 1024), (1009, 1002)),
    "unknown type": (b"\x7f\x00\x00\x00\x00\x00junk", (1002,)),
    "short": (b"\x05\x00", (1002,)),
    "data on a stream never opened": (b"\x05\x00\x00\x00\x03\xe7hello", (1002,)),
    "batch inside a batch": (bytes.fromhex("0b00000000000000000006 0b0000000000"), (1002,)),
    "batch running past its end": (bytes.fromhex("0b00000000000000000009 0800000000"), (1002,)),
    "text": ("a text message", (1003,)),
}


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
async def test_a_malformed_frame_ends_only_that_agents_connection(bob: Tunnel, kind: str) -> None:
    frame, codes = BAD_FRAMES[kind]
    async with hostile_agent(bob.server, bob.server.token("alice")) as agent:
        # The server may close before a 2 MiB frame is all written (it refuses it from its
        # length): the send is then cut, and the close code below is the verdict.
        with contextlib.suppress(ConnectionClosed):
            await agent.ws.send(frame)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.ws.wait_closed(), 30)
        assert agent.ws.close_code in codes, (kind, agent.ws.close_code, agent.ws.close_reason)
    # The server stays up and bob's tunnel is untouched.
    reply, _ = await raw_exchange(
        bob.server.port,
        f"GET /t/bob/after HTTP/1.1\r\nHost: {bob.server.apex}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert reply.status == 200
