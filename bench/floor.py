"""The floor: the least a Python relay can do on the relay's own stack, measured beside it.

The small scenario runs it as a fifth path: what a throwaway relay on the relay's stack
costs per webhook on this machine, in the same run. The relay's figures over the floor's
say how much of the relay's cost is its own work, and how much any relay on this stack
pays::

    python -m bench.floor server PORT            # public HTTP; its agent connects to /_floor
    python -m bench.floor agent PORT TARGET_PORT # forwards every request to 127.0.0.1:TARGET_PORT

It is built the way a relay that wants speed on this stack would be, so that the floor is
a floor: aiohttp's web server for the public side and its websocket for the agent,
the ``websockets`` client on the agent, uvloop. Each side sends what one pass of its
event loop queued in one websocket message (frames of a 4-byte stream id, a 4-byte
length and the bytes), and a request and its response cross as HTTP/1.1 bytes: the
agent writes them to a pooled keep-alive connection to the app as they came and reads
the answer with llhttp (``httptools``), and the server parses it once to answer through
aiohttp. Left out, each of which the relay pays for: bodies are read whole (no
streaming, no flow control, no limits), no authentication or tenants, no store, no
inspector, no metrics or request ids, no header checks beyond dropping the hop-by-hop
ones, no timeouts, no reconnect. Not a product: a yardstick.

Before 2026-12-07 (later) the floor was a naive relay (aiohttp's client on the agent, a
task and a websocket message per request, the head as JSON) that cost three times this
one; docs/performance.md says what that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httptools
from aiohttp import web
from multidict import CIMultiDict

#: A frame's prefix: the stream id and the length of the bytes that follow.
PREFIX = struct.Struct("!II")
AGENT_PATH = "/_floor"
#: Headers a relay cannot pass on as they are (RFC 9110 section 7.6.1) or that the
#: HTTP library on the far side sets from the body it sends.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"content-length")
)
#: What the agent answers for a request whose connection to the app failed.
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"


def _frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        stream, length = PREFIX.unpack_from(data, offset)
        start = offset + PREFIX.size
        offset = start + length
        yield stream, data[start:offset]


class _Batch:
    """Frames queued during one loop pass, sent as one websocket message at its end."""

    def __init__(self, send: Callable[[bytes], Awaitable[object]]) -> None:
        self._send = send
        self._parts: list[bytes] = []

    def add(self, stream: int, data: bytes) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self._flush)
        self._parts += (PREFIX.pack(stream, len(data)), data)

    def _flush(self) -> None:
        data = b"".join(self._parts)
        self._parts.clear()
        task = asyncio.ensure_future(self._send(data))
        task.add_done_callback(_report)


def _report(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        print(f"floor: a send failed: {exc!r}", file=sys.stderr)


class _Response:
    """httptools callbacks collecting one response's headers and body."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


def server_app() -> web.Application:
    batch: list[_Batch] = []
    waiting: dict[int, asyncio.Future[bytes]] = {}
    ids = itertools.count(1)

    async def connect(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        batch[:] = [_Batch(ws.send_bytes)]
        async for message in ws:
            for stream, data in _frames(message.data):
                future = waiting.pop(stream, None)
                if future is not None and not future.done():
                    future.set_result(data)
        return ws

    async def public(request: web.Request) -> web.StreamResponse:
        if not batch:
            return web.Response(status=503, text="no agent\n")
        body = await request.read()
        head = [f"{request.method} {request.raw_path} HTTP/1.1\r\n".encode("latin-1")]
        head += [k + b": " + v + b"\r\n" for k, v in request.raw_headers if k.lower() not in HOP_BY_HOP]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        stream = next(ids)
        future = waiting[stream] = asyncio.get_running_loop().create_future()
        try:
            batch[0].add(stream, b"".join(head) + body)
            answer = await future
        finally:
            waiting.pop(stream, None)
        parsed = _Response()
        parser = httptools.HttpResponseParser(parsed)
        parser.feed_data(answer)
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in parsed.headers
            if k.lower() not in HOP_BY_HOP
        )
        return web.Response(status=parser.get_status_code(), headers=headers, body=b"".join(parsed.body))

    app = web.Application()
    app.router.add_get(AGENT_PATH, connect)
    app.router.add_route("*", "/{tail:.*}", public)
    return app


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the app, carrying one request at a time."""

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.parser = httptools.HttpResponseParser(self)
        self.read: list[bytes] = []
        self.stream: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.read.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        answer, stream = b"".join(self.read), self.stream
        self.read.clear()
        self.stream = None
        self.agent.idle.append(self)
        if stream is not None:
            self.agent.batch.add(stream, answer)

    def connection_lost(self, exc: Exception | None) -> None:
        with contextlib.suppress(ValueError):
            self.agent.idle.remove(self)
        if self.stream is not None:
            self.agent.batch.add(self.stream, BAD_GATEWAY)


class _Agent:
    def __init__(self, target_port: int, batch: _Batch) -> None:
        self.target_port = target_port
        self.batch = batch
        self.idle: list[_Upstream] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def forward(self, stream: int, request: bytes) -> None:
        if self.idle:
            upstream = self.idle.pop()
            upstream.stream = stream
            assert upstream.transport is not None
            upstream.transport.write(request)
            return
        task = asyncio.create_task(self._connect(stream, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_report)

    async def _connect(self, stream: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, upstream = await loop.create_connection(
                lambda: _Upstream(self), "127.0.0.1", self.target_port
            )
        except OSError:
            self.batch.add(stream, BAD_GATEWAY)
            return
        upstream.stream = stream
        transport.write(request)


async def run_agent(port: int, target_port: int) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}{AGENT_PATH}", max_size=None, compression=None) as ws:
        agent = _Agent(target_port, _Batch(ws.send))
        async for message in ws:
            assert isinstance(message, bytes)
            for stream, request in _frames(message):
                agent.forward(stream, request)


def _event_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str]) -> int:
    _event_loop()
    if len(argv) == 2 and argv[0] == "server":
        web.run_app(server_app(), host="127.0.0.1", port=int(argv[1]), print=None, access_log=None)
        return 0
    if len(argv) == 3 and argv[0] == "agent":
        asyncio.run(run_agent(int(argv[1]), int(argv[2])))
        return 0
    print("usage: python -m bench.floor server PORT | agent PORT TARGET_PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
