"""Local services for the streaming tests: websockets, event streams, big and slow bodies.

``StreamingTarget`` runs an aiohttp app on its own thread and loop (like
``framework.TargetService``) and keeps counters the tests read from their own
thread: bytes sent, bytes received, events sent, requests cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: One 64 KiB block of every byte value: big bodies are this, repeated.
BLOCK = bytes(range(256)) * 256
MIB = 1024 * 1024


def big_body(mib: int) -> bytes:
    return BLOCK * (mib * 16)


@dataclass
class StreamingTarget:
    """Endpoints::

    /ws            websocket echo: text -> "echo:" + text, binary -> reversed; "close CODE" closes
                   with CODE and reason "bye"; "push N" sends N numbered texts at once; offers
                   subprotocols chat and v2; records the close code the client sent
    /sse           N events (?n=5) every ?every=0.3 s, as text/event-stream
    /down          ?mib=64 MiB streamed (Content-Length set); counts bytes written
    /up            reads the body (paused while ``hold_uploads`` is set); answers length + sha256;
                   counts the bytes read off the socket (``bytes_fed``, read-ahead included)
    /hang          never answers; records when it starts and when it is cancelled
    /small         a tiny 200
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_fed: int = 0
    events_sent: int = 0
    hanging: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    close_codes: list[int] = field(default_factory=list)
    #: Where it listens: any free port of 127.0.0.1 unless given (``::1``, a fixed port).
    host: str = "127.0.0.1"
    port: int = 0
    #: Serves HTTPS with this context when given.
    tls: ssl.SSLContext | None = None
    #: Who asked for each request (``host``, ``x-forwarded-for``), in order.
    hosts: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.hold_uploads = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(
            client_max_size=0, handler_args={"auto_decompress": False}, middlewares=[self._note_host]
        )
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/sse", self._sse)
        app.router.add_get("/down", self._down)
        app.router.add_post("/up", self._up)
        app.router.add_get("/hang", self._hang)
        app.router.add_get("/small", self._small)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        self.hold_uploads.clear()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def forward(self) -> str:
        return f"127.0.0.1:{self.port}"

    @web.middleware
    async def _note_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hosts.append(request.headers.get("Host", ""))
        return await handler(request)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat", "v2"))
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                self.close_codes.append(msg.data)  # the code the client sent
                break
            if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            if msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close "):
                    await ws.close(code=int(msg.data.split()[1]), message=b"bye")
                    break
                if msg.data.startswith("push "):
                    for i in range(int(msg.data.split()[1])):
                        await ws.send_str(f"pushed {i}")
                    continue
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "5"))
        every = float(request.query.get("every", "0.3"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i in range(count):
            if i:
                await asyncio.sleep(every)
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
            self.events_sent = i + 1
        await response.write_eof()
        return response

    async def _down(self, request: web.Request) -> web.StreamResponse:
        mib = int(request.query.get("mib", "64"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = mib * MIB
        await response.prepare(request)
        for _ in range(mib * 16):
            await response.write(BLOCK)
            self.bytes_sent += len(BLOCK)
        await response.write_eof()
        return response

    async def _up(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        while True:
            while self.hold_uploads.is_set():
                self.bytes_fed = request.content.total_bytes
                await asyncio.sleep(0.02)
            chunk = await request.content.readany()
            if not chunk:
                break
            digest.update(chunk)
            length += len(chunk)
            self.bytes_received += len(chunk)
        return web.json_response({"length": length, "sha256": digest.hexdigest()})

    async def _hang(self, request: web.Request) -> web.Response:
        self.hanging.append(request.path_qs)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(request.path_qs)
            raise
        return web.Response(text="never")

    async def _small(self, request: web.Request) -> web.Response:
        return web.Response(text="small")
