"""The agent's connection to the server: handshake, frames, streams, heartbeat, reconnect.

Sending: every frame goes into an ``Outbox`` that one writer task empties, each
websocket send bounded by ``SEND_TIMEOUT``. Control frames (PING, PONG, WINDOW,
RESET, TARGET_UP) are queued without waiting; RESPONSE and DATA wait while the
outbox holds ``SEND_HIGH_WATER`` bytes or more. A server that stops reading is
aborted ``SEND_TIMEOUT`` after the oldest frame it has not taken was queued,
even if it keeps sending, and the agent reconnects as after any network failure.
"""

from __future__ import annotations

import asyncio
import collections
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
    TargetUp,
    Welcome,
    Window,
)
from relay_protocol.frames import (
    FEATURE_TARGET_UP,
    RESET_CANCEL,
    RESET_INTERNAL,
    RESET_TARGET_TIMEOUT,
    RESET_TARGET_UNREACHABLE,
)
from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import (
    HEARTBEAT_TIMEOUT,
    MAX_DATA_SIZE,
    MAX_FRAME_SIZE,
    SEND_HIGH_WATER,
    SEND_TIMEOUT,
)

from .backoff import backoff, should_retry
from .config import AgentConfig
from .errors import Refused
from .forward import ForwardFailed, client_session, forward
from .probe import TargetProbe

log = logging.getLogger("relay.agent")

#: Seconds to open the websocket and get WELCOME back before trying again.
HANDSHAKE_TIMEOUT = 15.0

AGENT_NAME = f"relay-agent/{importlib.metadata.version('relay')}"


class StreamGone(Exception):
    """The stream was reset by the server or the connection was lost."""


class Outbox:
    """Frames waiting for the writer task of one connection, oldest first.

    ``put`` never waits; ``room`` waits until the queued bytes are below
    ``SEND_HIGH_WATER`` (or the outbox is closed), so memory stays bounded by
    the high-water mark plus the control frames, each of which is small or (a
    PONG) at most one at a time.
    """

    def __init__(self) -> None:
        self._frames: collections.deque[tuple[bytes, float]] = collections.deque()
        self._bytes = 0
        self._types: collections.Counter[int] = collections.Counter()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False

    def put(self, data: bytes, now: float) -> None:
        self._frames.append((data, now))
        self._bytes += len(data)
        self._types[data[0]] += 1
        self._ready.set()
        if self._bytes >= SEND_HIGH_WATER:
            self._room.clear()

    def oldest(self) -> float | None:
        """When the oldest frame not yet taken by the peer was queued; None if none waits."""
        return self._frames[0][1] if self._frames else None

    def pending(self, frame_type: int) -> int:
        """Frames of ``frame_type`` queued and not yet sent."""
        return self._types[frame_type]

    async def room(self) -> None:
        """Wait until a frame that may wait (RESPONSE, DATA) can be queued, or the outbox closed."""
        while self._bytes >= SEND_HIGH_WATER and not self.closed:
            await self._room.wait()

    async def next(self) -> bytes:
        """The oldest frame; it stays queued (and counts as waiting) until ``sent``."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames[0][0]

    def sent(self) -> None:
        data, _ = self._frames.popleft()
        self._bytes -= len(data)
        self._types[data[0]] -= 1
        if self._bytes < SEND_HIGH_WATER:
            self._room.set()

    def close(self) -> None:
        """Wake every frame waiting for room: the connection is gone."""
        self.closed = True
        self._room.set()


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
        self.outbox = Outbox()
        self.closed = False
        self.features: tuple[str, ...] = ()  # what the server listed in WELCOME
        self.heartbeat = Heartbeat(time.monotonic())

    def credit(self, stream_id: int) -> int:
        return self.conn.credit(stream_id)

    def is_open(self, stream_id: int) -> bool:
        return self.conn.is_open(stream_id)

    async def send(self, frame: Response | Data | Reset | Ping | Pong | TargetUp) -> None:
        """Queue ``frame`` for the writer; RESPONSE and DATA first wait for room in the
        outbox. Raises ``StreamGone`` if its stream or the connection is gone."""
        if isinstance(frame, (Response, Data)):
            await self.outbox.room()
        self.post(frame)

    def post(self, frame: Response | Data | Reset | Ping | Pong | TargetUp) -> None:
        """Queue ``frame`` now, without waiting. Raises ``StreamGone`` as ``send``."""
        if self.closed:
            raise StreamGone()
        stream_id = getattr(frame, "stream_id", 0)
        if stream_id and not self.conn.is_open(stream_id):
            raise StreamGone()
        self._put(self.conn.send(frame))

    def _put(self, data: bytes) -> None:
        self.outbox.put(data, time.monotonic())

    async def consumed(self, stream_id: int, size: int) -> None:
        window = self.conn.consumed(stream_id, size)
        if window is not None and not self.closed:
            self._put(window)

    async def handshake(self) -> Welcome:
        config = self.tunnel.config
        tunnels = tuple({"name": n, **config.settings} for n in config.names)
        # Sent before the writer starts; the caller bounds the whole handshake in time.
        await self.ws.send(self.conn.send(Hello(PROTOCOL_VERSION, tunnels, AGENT_NAME, config.label)))
        message = await self.ws.recv()
        if not isinstance(message, bytes):
            raise ProtocolError("server sent a text frame")
        frame = self.conn.receive(message)
        if not isinstance(frame, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
        if frame.version != PROTOCOL_VERSION:
            raise Refused(4005, f"server speaks protocol {frame.version}, this agent {PROTOCOL_VERSION}")
        self.features = frame.features
        return frame

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
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
            writer.cancel()
            self._mark_closed()

    async def _write(self) -> None:
        """The one task that sends on the websocket, one frame at a time, each within SEND_TIMEOUT."""
        try:
            while not self.closed:
                data = await self.outbox.next()
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send(data)
                self.outbox.sent()
        except TimeoutError:
            self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the server does not read")
        except ConnectionClosed:
            self._mark_closed()  # the read loop sees it too and reports it
        except Exception:
            log.exception("writer failed")
            self._abort("internal error in the writer")

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.close()
            for stream in list(self.streams.values()):
                stream.kill()

    def _abort(self, reason: str) -> None:
        """Drop a connection whose server does not read (or says nothing): no close
        handshake could complete. The read loop ends and the agent reconnects."""
        if not self.closed:
            log.warning("%s: reconnecting", reason)
        self._mark_closed()
        self.ws.transport.abort()

    async def _dispatch(self, frame: object) -> None:
        if isinstance(frame, Open):
            stream = AgentStream(self, frame)
            self.streams[stream.id] = stream
            stream.task = asyncio.create_task(self._serve(stream))
            return
        if isinstance(frame, Ping):
            # One PONG in the outbox at a time: a server that pings faster than it
            # reads must not grow this side's memory.
            if not self.outbox.pending(Pong.TYPE):
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
            if exc.code == RESET_TARGET_UNREACHABLE:
                self.tunnel.target_unreachable()
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
            beat = self.heartbeat.check(time.monotonic(), self.outbox.oldest())
            if beat.stuck:
                self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the server does not read")
                return
            if beat.dead:
                self._abort(f"no frame from the server for {HEARTBEAT_TIMEOUT:g}s")
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
        self._probe = TargetProbe(config.target.host, config.target.port, self._target_up)
        self._session: _Session | None = None  # the welcomed connection, if any
        self._target_up_due = False  # the probe saw the target back; TARGET_UP not sent yet

    async def run(self) -> None:
        """Serve until cancelled. Raises ``Refused`` when the server refuses this agent."""
        try:
            async with client_session() as self.client:
                delays = backoff()
                while True:
                    served = await self._connect_once()
                    if served:
                        delays = backoff()  # it worked for a while: start over from short delays
                    delay = next(delays)
                    log.info("reconnecting in %.1fs", delay)
                    await asyncio.sleep(delay)
        finally:
            await self._probe.stop()

    def target_unreachable(self) -> None:
        """Forwarding found the target unreachable: watch it until it is back."""
        self._target_up_due = False  # an earlier "back" is stale now
        self._probe.start()

    def _target_up(self) -> None:
        self._target_up_due = True
        self._send_target_up()

    def _send_target_up(self) -> None:
        """Tell the server the target is back, on this connection or the next one."""
        session = self._session
        if not self._target_up_due or session is None or session.closed:
            return
        self._target_up_due = False
        if FEATURE_TARGET_UP not in session.features:
            return  # an older server: it retries on its own schedule
        session.post(TargetUp())
        log.info("told the server the local service is back")

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
            self._session = session
            self._send_target_up()
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
            self._session = None
            for stream in list(session.streams.values()):
                stream.kill()
        if not should_retry(code):
            raise Refused(code or 0, reason or "refused")
        log.warning("disconnected from the server (%s %s)", code, reason or "no reason given")
        return welcomed
