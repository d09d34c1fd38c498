"""Delivered when your app is back (issue 7, §5, agent side): the agent watches an
unreachable local service and tells the server (TARGET_UP) as soon as it accepts
connections again."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import aiohttp
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from relay_protocol import (
    PROTOCOL_VERSION,
    Hello,
    Open,
    Ping,
    Pong,
    RequestHead,
    Reset,
    TargetUp,
    Welcome,
    decode,
    encode,
)
from relay_protocol.frames import RESET_TARGET_UNREACHABLE

from .framework import RELAY_AGENT, Relay, free_port, until


@contextlib.contextmanager
def service_on(port: int) -> Iterator[None]:
    """A tiny local service bound to exactly ``port`` (the framework's binds port 0),
    on its own thread and loop; answers every request with "back"."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def back(_: web.Request) -> web.Response:
        return web.Response(text="back")

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", back)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_the_server_hears_target_up_when_the_app_comes_back(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server("--log-level", "debug")
    token = server.token("alice")
    port = free_port()  # nothing listens here yet
    agent = relay.agent(server, token, f"127.0.0.1:{port}", extra=["--log-level", "info"])
    assert server.process is not None
    url, host = server.url("/t/alice/x"), {"Host": server.apex}

    async with http.get(url, headers=host) as reply:
        assert (reply.status, reply.headers.get("X-Relay-Error")) == (502, "local-unreachable")
    await agent.process.line(r"unreachable: probing it every 1s", stream="stderr")
    assert not [line for line in server.process.stderr_lines if "target up" in line]

    with service_on(port):
        await server.process.line(r"session \w+: target up$", stream="stderr")
        await agent.process.line(r"told the server the local service is back", stream="stderr")
        async with http.get(url, headers=host) as reply:
            assert reply.status == 200
            assert await reply.text() == "back"
        # Probing stopped once the service was back: exactly one TARGET_UP.
        assert len([line for line in server.process.stderr_lines if "target up" in line]) == 1

    # Down again: a new failure starts a new probe, and a new TARGET_UP follows its return.
    async with http.get(url, headers=host) as reply:
        assert (reply.status, reply.headers.get("X-Relay-Error")) == (502, "local-unreachable")
    with service_on(port):
        await server.process.line(r"session \w+: target up$", stream="stderr", count=2)


@contextlib.asynccontextmanager
async def old_server() -> AsyncIterator[tuple[int, list[object], list[ServerConnection]]]:
    """A fake server from before TARGET_UP: its WELCOME lists no features. It opens one
    GET stream and records every frame the agent sends."""
    received: list[object] = []
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        received.append(decode(await ws.recv()))  # type: ignore[arg-type]
        await ws.send(encode(Welcome(PROTOCOL_VERSION, "old", ({"name": "alice"},))))
        await ws.send(encode(Open(1, RequestHead("GET", b"/", ()), end_stream=True)))
        async for message in ws:
            received.append(decode(message))  # type: ignore[arg-type]

    async with serve(handler, "127.0.0.1", 0, ping_interval=None) as ws_server:
        port = int(next(iter(ws_server.sockets)).getsockname()[1])
        yield port, received, connections


async def test_no_target_up_for_a_server_without_the_feature(relay: Relay) -> None:
    token = relay.server(start=False).token("alice")
    port = free_port()
    async with old_server() as (server_port, received, connections):
        agent = relay.spawn(
            [
                str(RELAY_AGENT),
                "connect",
                "--server",
                f"http://127.0.0.1:{server_port}",
                "--token",
                token,
                "--forward",
                f"127.0.0.1:{port}",
                "--log-level",
                "info",
            ],
            "relay-agent (old server)",
        )
        await until(
            lambda: any(isinstance(f, Reset) and f.code == RESET_TARGET_UNREACHABLE for f in received),
            20,
            "the agent's RESET for the unreachable target",
        )
        assert isinstance(received[0], Hello)
        with service_on(port):
            await agent.line(r"accepts connections again", stream="stderr")
            # A PING sent now is answered after anything the agent queued when it saw the
            # service back (one writer, in order): once its PONG is here, so would TARGET_UP be.
            await connections[0].send(encode(Ping(b"sync")))
            await until(lambda: Pong(b"sync") in received, 20, "the PONG")
        assert not [f for f in received if isinstance(f, TargetUp)]
        assert agent.running()
