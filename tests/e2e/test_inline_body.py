"""A small request and its answer cross in one frame each way (the "inline-body"
feature, docs/protocol.md), and only between peers that both listed it: an agent or a
server from before it gets the body in DATA frames, as it always did."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from relay_protocol import (
    PROTOCOL_VERSION,
    Data,
    Hello,
    Open,
    RequestHead,
    Response,
    ResponseHead,
    Welcome,
    decode,
    encode,
)
from relay_protocol.frames import FEATURE_INLINE_BODY, Frame

from .framework import Relay, raw_exchange, until

WEBHOOK = b'{"action":"opened","number":7}'


async def test_an_agent_without_the_feature_gets_the_body_in_data(relay: Relay) -> None:
    server = relay.server()
    token = server.token("alice")
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setblocking(False)
    async with connect(
        f"ws://{server.apex}/_relay/agent",
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        compression=None,
    ) as ws:
        # An agent from before the feature: its HELLO lists none.
        await ws.send(encode(Hello(PROTOCOL_VERSION, ({"name": "alice", "mode": "live"},), "old-agent")))
        welcome = decode(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(welcome, Welcome) and FEATURE_INLINE_BODY in welcome.features
        async with aiohttp.ClientSession() as client:

            async def post() -> tuple[int, bytes]:
                url, host = server.url("/t/alice/hook"), {"Host": server.apex}
                async with client.post(url, data=WEBHOOK, headers=host) as response:
                    return response.status, await response.read()

            pending = asyncio.create_task(post())
            frames: list[Frame] = []
            while not any(isinstance(f, Data) and f.end_stream for f in frames):
                frames.append(decode(await ws.recv()))  # type: ignore[arg-type]
            opened = next(f for f in frames if isinstance(f, Open))
            assert opened.body == b"" and not opened.end_stream
            assert b"".join(f.data for f in frames if isinstance(f, Data)) == WEBHOOK
            await ws.send(encode(Response(opened.stream_id, ResponseHead(200, ()))))
            await ws.send(encode(Data(opened.stream_id, b"thanks", end_stream=True)))
            assert await pending == (200, b"thanks")


@contextlib.asynccontextmanager
async def old_server(body: bytes) -> AsyncIterator[tuple[int, list[Frame]]]:
    """A fake server from before the feature: its WELCOME lists none. It opens one POST
    stream with ``body`` in a DATA frame and records every frame the agent sends."""
    received: list[Frame] = []

    async def handler(ws: ServerConnection) -> None:
        received.append(decode(await ws.recv()))  # type: ignore[arg-type]
        await ws.send(encode(Welcome(PROTOCOL_VERSION, "old", ({"name": "alice"},))))
        head = RequestHead("POST", b"/bin", ((b"Content-Length", b"%d" % len(body)),))
        await ws.send(encode(Open(1, head)))
        await ws.send(encode(Data(1, body, end_stream=True)))
        async for message in ws:
            received.append(decode(message))  # type: ignore[arg-type]

    async with serve(handler, "127.0.0.1", 0, ping_interval=None) as ws_server:
        port = int(next(iter(ws_server.sockets)).getsockname()[1])
        yield port, received


async def test_the_agent_answers_a_server_without_the_feature_in_data(relay: Relay) -> None:
    server = relay.server(start=False)
    target = relay.target()
    async with old_server(WEBHOOK) as (port, received):
        agent = relay.agent(
            server, server.token("alice"), target.forward, ready=False, server_url=f"http://127.0.0.1:{port}"
        )
        await until(
            lambda: any(isinstance(f, Data) and f.end_stream for f in received), 20, "the answer's last DATA"
        )
        hello = received[0]
        assert isinstance(hello, Hello) and FEATURE_INLINE_BODY in hello.features
        responses = [f for f in received if isinstance(f, Response)]
        assert len(responses) == 1 and responses[0].body == b"" and not responses[0].end_stream
        assert responses[0].head.status == 200
        assert b"".join(f.data for f in received if isinstance(f, Data)) == WEBHOOK  # /bin echoes it
        assert target.seen("/bin")[0].body == WEBHOOK
        assert agent.process.running()


async def test_an_empty_chunked_body_reaches_the_app_framed_as_it_was_sent(relay: Relay) -> None:
    # An OPEN carries no empty body (BODY needs bytes): an empty chunked upload goes as
    # OPEN and an empty DATA, and the app gets a chunked request with no bytes, as sent
    # (folded into OPEN with END_STREAM it got a POST with no framing at all: a review).
    tunnel = relay.tunnel(agent_extra=("--mode", "live"))
    request = (
        f"POST /t/alice/bin HTTP/1.1\r\nHost: {tunnel.server.apex}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n0\r\n\r\n"
    )
    reply, _ = await raw_exchange(tunnel.server.port, request.encode())
    assert reply.status == 200 and reply.body == b""
    seen = tunnel.target.seen("/bin")[0]
    assert seen.header("Transfer-Encoding") == "chunked" and seen.body == b""
