"""Peers that stop reading: nothing hangs past its timeout (issue 7, §4).

A peer that keeps its socket open and keeps sending frames, but never reads, used to
stall everything: the other side blocked in a websocket send holding its send lock,
its heartbeat waited for that lock, and public requests hung. Here a hostile agent
(and, for the agent, a hostile server) does exactly that, with a tiny receive buffer
so the sends on the other side really block.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from relay_protocol import PROTOCOL_VERSION, Hello, Open, Ping, RequestHead, Welcome, decode, encode
from relay_protocol.frames import encode_batch

from .framework import RELAY_AGENT, Relay, RelayServer, Reply, TargetService, fetch, until

#: A receive buffer the kernel rounds up to a few KiB: the peer's window stays closed.
TINY_BUFFER = 4096
#: Seconds every public request may take at most, whatever happens: the client's own
#: timeout. A fixed request answers within --timeout (5 s); a hung one never would.
CLIENT_TIMEOUT = 60
#: Seconds to wait for a dead connection to be noticed: SEND_TIMEOUT (30 s) plus margin.
NOTICED = 75.0
#: Body of each public POST: over a stream's credit (256 KiB), so the server sends all
#: the credit it has, yet small enough for the kernel to take it whole from the client.
BODY = b"b" * (300 * 1024)
#: Concurrent POSTs: their credit (16 x 256 KiB) is far more than the socket buffers hold.
POSTS = 16
GETS = 4
#: PING payload of the hostile agent: near MAX_CONTROL_SIZE, so each PONG the server owes
#: it is big enough to block a send on its own once the socket buffers are full.
PING_PAYLOAD = b"p" * (60 * 1024)


async def hostile_agent(server: RelayServer, token: str, name: str = "alice") -> ClientConnection:
    """An agent that says HELLO, reads WELCOME, then never reads again (see ``keep_pinging``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    ws = await connect(
        f"ws://{server.apex}/_relay/agent",
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=1,  # one frame buffered, then the library stops reading the socket
        ping_interval=None,
        compression=None,
    )
    await ws.send(encode(Hello(PROTOCOL_VERSION, ({"name": name},), "hostile-agent")))
    welcome = decode(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(welcome, Welcome)
    return ws


async def keep_pinging(ws: ClientConnection) -> None:
    """A PING every second, so the server never sees silence; never a read."""
    with contextlib.suppress(Exception):
        while True:
            await ws.send(encode(Ping(PING_PAYLOAD)))
            await asyncio.sleep(1)


def aiohttp_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
        auto_decompress=False,
    )


@pytest.mark.slow(36)
async def test_an_agent_that_stops_reading_gets_504s_then_is_dropped(relay: Relay) -> None:
    server = relay.server("--timeout", "5")
    token = server.token("alice")
    ws = await hostile_agent(server, token)
    pinger = asyncio.create_task(keep_pinging(ws))
    try:
        result = relay.agent_cli(server, token, "tunnel", "set", "alice", "--mode", "live")
        assert result.returncode == 0, result.stderr
        url, host = server.url("/t/alice/hook"), server.apex
        async with aiohttp_client() as http:

            def wave() -> list[Awaitable[Reply]]:
                requests = [fetch(http, "POST", url, host, body=BODY) for _ in range(POSTS)]
                return requests + [fetch(http, "GET", url, host) for _ in range(GETS)]

            # Each raises (and fails the test) if it is still unanswered after CLIENT_TIMEOUT.
            # The first wave fills every buffer between the server and the agent: the agent
            # is stuck long before the server gives up on it, and every request gets the 504
            # of --timeout, none waits for the connection to die.
            first: list[Reply] = await asyncio.gather(*wave())
            assert [(r.status, r.relay_error) for r in first] == [(504, "local-timeout")] * (POSTS + GETS)
            # The second comes while the server owes the agent PONGs it cannot send: still
            # answered within --timeout (or 503 if the session was dropped meanwhile).
            second: list[Reply] = await asyncio.gather(*wave())
            assert {(r.status, r.relay_error) for r in second} <= {
                (504, "local-timeout"),
                (503, "tunnel-offline"),
            }

            # The server drops the session even though the agent keeps sending PINGs: the
            # tunnel turns offline (each poll before that is another 504 within --timeout).
            async def offline() -> Reply | None:
                reply = await fetch(http, "GET", url, host)
                assert (reply.status, reply.relay_error) in {(504, "local-timeout"), (503, "tunnel-offline")}
                return reply if reply.status == 503 else None

            await until(offline, NOTICED, "the server to drop the session of the stuck agent")
            assert server.process is not None
            await server.process.line(
                r"session \w+: a frame waited 30s to be sent: the agent does not read; aborting",
                stream="stderr",
            )

            # A well-behaved agent for alice serves at once.
            target = relay.target("alice")
            relay.agent(server, token, target.forward)
            reply = await fetch(http, "GET", url, host)
            assert reply.status == 200
            assert reply.json()["path"] == "/hook"
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        ws.transport.abort()


# -- the mirror case: a server that stops reading ------------------------------------------


class BigTarget(TargetService):
    """Answers every request with 1 MiB: more than a stream's credit, so the agent
    sends all the credit the (hostile) server gave it."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"r" * (1024 * 1024), content_type="application/octet-stream")


@contextlib.asynccontextmanager
async def hostile_server(opens: int) -> AsyncIterator[tuple[int, list[str]]]:
    """A fake relay server on 127.0.0.1: WELCOME, ``opens`` OPEN frames, then a PING every
    second and never a read. Yields its port and the HELLOs' agent names, one per connection."""
    hellos: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        hello = decode(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(hello, Hello)
        hellos.append(hello.agent)
        await ws.send(encode(Welcome(PROTOCOL_VERSION, f"fake-{len(hellos)}", ({"name": "alice"},))))
        for stream_id in range(1, opens + 1):
            head = RequestHead("GET", b"/big", ((b"Host", b"alice.fake"),))
            await ws.send(encode(Open(stream_id, head, end_stream=True)))
        with contextlib.suppress(Exception):
            while True:  # never silent, never reading
                await ws.send(encode(Ping(b"fake")))
                await asyncio.sleep(1)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_BUFFER)  # inherited by accepted sockets
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    async with serve(handler, sock=sock, max_queue=1, ping_interval=None, compression=None):
        yield port, hellos


@pytest.mark.slow(45)
async def test_an_agent_drops_a_server_that_stops_reading_and_reconnects(relay: Relay) -> None:
    token = relay.server(start=False).token("alice")
    target = relay.target("big", kind=BigTarget)
    async with hostile_server(opens=24) as (port, hellos):
        agent = relay.spawn(
            [
                str(RELAY_AGENT),
                "connect",
                "--server",
                f"http://127.0.0.1:{port}",
                "--token",
                token,
                "--forward",
                target.forward,
                "--log-level",
                "info",
            ],
            "relay-agent (hostile server)",
        )
        await until(lambda: hellos, 20, "the agent's first connection")
        # It forwards the OPENs, its sends block, and SEND_TIMEOUT later it gives up on
        # the connection although the server kept sending PINGs, and connects again, as
        # after any network failure...
        await until(lambda: len(hellos) >= 2, NOTICED, "the agent's second connection")
        assert agent.running()
        # ... saying why.
        await agent.line(
            r"a frame waited 30s to be sent: the server does not read: reconnecting", stream="stderr"
        )


# -- a peer that sends too much: frames that carry nothing, as fast as it can ----------------

#: PINGs per BATCH message of the flooding agent, and its messages: 120,000 frames, six
#: seconds of the server's budget (MAX_FRAMES_PER_SECOND), sent as fast as the kernel takes
#: them (about 1.5 MB).
FLOOD_BATCH = 6000
FLOOD_MESSAGES = 20


@pytest.mark.slow(10)
async def test_an_agent_flooding_frames_is_read_more_slowly_and_slows_no_one_else(relay: Relay) -> None:
    # Found by a review: BATCH messages of 6,000 PINGs (400,000 frames a second) from one
    # token holder took the server's core, and another tenant's requests went from 3 ms to
    # a second. The flooder is now read at its budget: it slows down itself, is not cut off,
    # and the other tenant is answered throughout (every request, counted, not timed).
    server = relay.server()
    bob = relay.tunnel(server=server, user="bob", agent_extra=("--mode", "live"))
    ws = await connect(
        f"ws://{server.apex}/_relay/agent",
        host="127.0.0.1",
        port=server.port,
        additional_headers={"Authorization": f"Bearer {server.token('alice')}"},
        ping_interval=None,
        compression=None,
    )
    hello = Hello(PROTOCOL_VERSION, ({"name": "alice"},), "flooding-agent", features=("batch",))
    await ws.send(encode(hello))
    assert isinstance(decode(await ws.recv()), Welcome)  # type: ignore[arg-type]

    async def drain() -> None:  # it reads what it is sent (PONGs): only its sending is hostile
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    reader = asyncio.create_task(drain())
    flood = encode_batch([encode(Ping(b""))] * FLOOD_BATCH)
    try:
        for _ in range(FLOOD_MESSAGES):
            await ws.send(flood)
        url, headers = bob.url("path", "/during-the-flood")
        async with aiohttp_client() as http:
            replies = [await fetch(http, "GET", url, headers["Host"]) for _ in range(20)]
        assert [r.status for r in replies] == [200] * 20
        assert server.process is not None
        await server.process.line(
            r"session \w+ of alice: over 20000 frames a second; reading it more slowly", stream="stderr"
        )
        assert "of bob: over" not in server.process.stderr
        assert ws.close_code is None  # slowed down, not cut off
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        ws.transport.abort()
