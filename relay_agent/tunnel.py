"""The agent's connection to the server: handshake, frames, streams, heartbeat, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from relay_protocol import (
    PROTOCOL_VERSION,
    Connection,
    Data,
    Hello,
    Open,
    Ping,
    Pong,
    ProtocolError,
    RequestHead,
    Reset,
    Response,
    ResponseHead,
    Role,
    Welcome,
    Window,
)
from relay_protocol.frames import RESET_CANCEL, RESET_INTERNAL, RESET_TARGET_TIMEOUT
from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import HEARTBEAT_TIMEOUT, MAX_DATA_SIZE, MAX_FRAME_SIZE

from .backoff import backoff, should_retry
from .config import AgentConfig
from .errors import Refused
from .forward import ForwardFailed, client_session, forward

log = logging.getLogger("relay.agent")

#: Seconds to open the websocket and get WELCOME back before trying again.
HANDSHAKE_TIMEOUT = 15.0

AGENT_NAME = f"relay-agent/{importlib.metadata.version('relay')}"


class StreamGone(Exception):
    """The stream was reset by the server or the connection was lost."""


class AgentStream:
    """One forwarded request, seen from the agent: implements ``forward.Link``."""

    def __init__(self, tunnel: _Session, open_frame: Open) -> None:
        self._session = tunnel
        self.id = open_frame.stream_id
        self.head = open_frame.head
        self.has_body = not open_frame.end_stream
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.credit_changed = asyncio.Event()
        self.gone = False
        self.task: asyncio.Task[None] | None = None

    # fed by the session's read loop
    def feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.put_nowait(data)
        if end:
            self._chunks.put_nowait(None)

    def kill(self) -> None:
        self.gone = True
        self.credit_changed.set()
        if self.task is not None:
            self.task.cancel()

    # forward.Link
    async def body(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk
            # The target took the previous chunk: grant the server that much credit.
            await self._session.consumed(self.id, len(chunk))

    async def respond(self, head: ResponseHead, end: bool) -> None:
        await self._session.send(Response(self.id, head, end))

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        view = memoryview(chunk)
        while True:
            if self.gone:
                raise StreamGone()
            credit = self._session.credit(self.id)
            if credit <= 0 and view:
                self.credit_changed.clear()
                await self.credit_changed.wait()
                continue
            piece = bytes(view[: min(credit, MAX_DATA_SIZE)])
            view = view[len(piece) :]
            if piece or (end and not view):
                await self._session.send(Data(self.id, piece, end and not view))
            if not view:
                return

    async def reset(self, code: int, reason: str) -> None:
        if not self.gone and self._session.is_open(self.id):
            await self._session.send(Reset(self.id, code, reason))


class _Session:
    """One websocket connection to the server, from HELLO to close."""

    def __init__(self, ws: ClientConnection, tunnel: Tunnel) -> None:
        self.ws = ws
        self.tunnel = tunnel
        self.conn = Connection(Role.AGENT)
        self.streams: dict[int, AgentStream] = {}
        self._lock = asyncio.Lock()
        self.heartbeat = Heartbeat(time.monotonic())

    def credit(self, stream_id: int) -> int:
        return self.conn.credit(stream_id)

    def is_open(self, stream_id: int) -> bool:
        return self.conn.is_open(stream_id)

    async def send(self, frame: Hello | Response | Data | Reset | Ping | Pong) -> None:
        async with self._lock:
            stream_id = getattr(frame, "stream_id", 0)
            if stream_id and not self.conn.is_open(stream_id):
                raise StreamGone()
            data = self.conn.send(frame)
            try:
                await self.ws.send(data)
            except ConnectionClosed as exc:
                raise StreamGone() from exc

    async def consumed(self, stream_id: int, size: int) -> None:
        window = self.conn.consumed(stream_id, size)
        if window is not None:
            async with self._lock:
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.send(window)

    async def handshake(self) -> Welcome:
        config = self.tunnel.config
        tunnels = tuple({"name": n, **config.settings} for n in config.names)
        await self.send(Hello(PROTOCOL_VERSION, tunnels, AGENT_NAME, config.label))
        message = await self.ws.recv()
        if not isinstance(message, bytes):
            raise ProtocolError("server sent a text frame")
        frame = self.conn.receive(message)
        if not isinstance(frame, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
        if frame.version != PROTOCOL_VERSION:
            raise Refused(4005, f"server speaks protocol {frame.version}, this agent {PROTOCOL_VERSION}")
        return frame

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            async for message in self.ws:
                self.heartbeat.seen(time.monotonic())
                if not isinstance(message, bytes):
                    raise ProtocolError("server sent a text frame")
                frame = self.conn.receive(message)
                if frame is not None:
                    await self._dispatch(frame)
        finally:
            heartbeat.cancel()
            for stream in self.streams.values():
                stream.kill()

    async def _dispatch(self, frame: object) -> None:
        if isinstance(frame, Open):
            stream = AgentStream(self, frame)
            self.streams[stream.id] = stream
            stream.task = asyncio.create_task(self._serve(stream))
            return
        if isinstance(frame, Ping):
            with contextlib.suppress(StreamGone):
                await self.send(Pong(frame.payload))
            return
        stream_or_none = self.streams.get(getattr(frame, "stream_id", 0))
        if stream_or_none is None:
            return
        if isinstance(frame, Data):
            stream_or_none.feed(frame.data, frame.end_stream)
        elif isinstance(frame, Window):
            stream_or_none.credit_changed.set()
        elif isinstance(frame, Reset):
            stream_or_none.kill()

    async def _serve(self, stream: AgentStream) -> None:
        started = time.monotonic()
        status: int | str = "-"
        try:
            status = await forward(
                self.tunnel.client, self.tunnel.config, stream.head, stream.has_body, stream
            )
        except ForwardFailed as exc:
            status = 504 if exc.code == RESET_TARGET_TIMEOUT else 502  # what the client sees
            log.info("stream %d: %s", stream.id, exc)
            with contextlib.suppress(StreamGone):
                await stream.reset(exc.code, str(exc))
        except StreamGone:
            status = "reset"
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as exc:  # a bug: keep the connection and other streams alive
            log.exception("stream %d: internal error", stream.id)
            with contextlib.suppress(StreamGone):
                await stream.reset(RESET_INTERNAL, f"agent error: {type(exc).__name__}")
        finally:
            self.streams.pop(stream.id, None)
            if self.conn.is_open(stream.id):  # answered before the request body ended
                with contextlib.suppress(StreamGone):
                    await self.send(Reset(stream.id, RESET_CANCEL, "response complete"))
            self.tunnel.on_request(stream.head, status, time.monotonic() - started)

    async def _heartbeat(self) -> None:
        while True:
            beat = self.heartbeat.check(time.monotonic())
            if beat.dead:
                log.warning("no frame from the server for %ss: reconnecting", HEARTBEAT_TIMEOUT)
                self.ws.transport.abort()
                return
            if beat.ping:
                with contextlib.suppress(StreamGone):
                    await self.send(Ping(b""))
            await asyncio.sleep(beat.wait)


RequestLogger = Callable[[RequestHead, "int | str", float], None]
UrlPrinter = Callable[[Welcome], None]


class Tunnel:
    """Keeps the agent connected: connect, serve, and reconnect with backoff, until refused."""

    def __init__(self, config: AgentConfig, on_welcome: UrlPrinter, on_request: RequestLogger) -> None:
        self.config = config
        self.on_welcome = on_welcome
        self.on_request = on_request
        self.client: aiohttp.ClientSession

    async def run(self) -> None:
        """Serve until cancelled. Raises ``Refused`` when the server refuses this agent."""
        async with client_session() as self.client:
            delays = backoff()
            while True:
                served = await self._connect_once()
                if served:
                    delays = backoff()  # it worked for a while: start over from short delays
                delay = next(delays)
                log.info("reconnecting in %.1fs", delay)
                await asyncio.sleep(delay)

    async def _connect_once(self) -> bool:
        """One connection, start to end. True if the handshake succeeded."""
        headers = {"Authorization": f"Bearer {self.config.token}"}
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                ws = await connect(
                    self.config.agent_url,
                    additional_headers=headers,
                    max_size=MAX_FRAME_SIZE,
                    ping_interval=None,  # the protocol's own PING frames are the heartbeat
                    compression=None,
                    user_agent_header=AGENT_NAME,
                    open_timeout=None,
                )
        except InvalidStatus as exc:
            log.warning("server answered the upgrade with HTTP %s", exc.response.status_code)
            return False
        except (OSError, TimeoutError, InvalidHandshake, socket.gaierror) as exc:
            log.warning("cannot connect to %s: %s", self.config.server, exc or type(exc).__name__)
            return False
        session = _Session(ws, self)
        welcomed = False
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                welcome = await session.handshake()
            welcomed = True
            self.on_welcome(welcome)
            await session.run()
            code = ws.close_code
            reason = ws.close_reason
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            reason = exc.rcvd.reason if exc.rcvd else str(exc)
        except (ProtocolError, TimeoutError, OSError) as exc:
            log.warning("connection failed: %s", exc or type(exc).__name__)
            await ws.close(1002 if isinstance(exc, ProtocolError) else 1000)
            return welcomed
        finally:
            for stream in list(session.streams.values()):
                stream.kill()
        if not should_retry(code):
            raise Refused(code or 0, reason or "refused")
        log.warning("disconnected from the server (%s %s)", code, reason or "no reason given")
        return welcomed
