"""The server side of one connected agent: a websocket carrying many streams.

``AgentSession`` owns the websocket and the ``relay_protocol.Connection``; it
reads frames in one loop, hands each stream's response to the ``Stream`` the
ingress is waiting on, and sends frames for the ingress under flow control.

Sending: every frame goes into an ``Outbox`` that one writer task empties, each
websocket send bounded by ``SEND_TIMEOUT``. Control frames (PING, PONG, WINDOW,
RESET) are queued without waiting; OPEN and DATA wait while the outbox holds
``SEND_HIGH_WATER`` bytes or more. So nothing but the writer ever waits on the
socket, and an agent that stops reading is aborted ``SEND_TIMEOUT`` after the
oldest frame it has not taken was queued (by the writer, or by the heartbeat
if the agent keeps talking).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable

from aiohttp import WSMsgType, web

from relay_protocol import (
    Connection,
    Data,
    Hello,
    LocalProtocolError,
    Open,
    Ping,
    Pong,
    ProtocolError,
    RelayError,
    RequestHead,
    Reset,
    Response,
    ResponseHead,
    Role,
    TargetUp,
    Welcome,
    Window,
)
from relay_protocol.frames import RESET_CANCEL
from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import HEARTBEAT_TIMEOUT, MAX_DATA_SIZE, SEND_HIGH_WATER, SEND_TIMEOUT

log = logging.getLogger("relay.server")

# Websocket close codes (docs/protocol.md). 4xxx ones tell the agent not to retry.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_VERSION = 4005
CLOSE_HEARTBEAT = 4008


class StreamFailed(RelayError):
    """The stream ended without a normal end: reset by the agent, or the agent went away."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code  # the agent's RESET code; None if the connection was lost


class Stream:
    """One request/response exchange with the agent, seen from the ingress."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self._chunks: asyncio.Queue[bytes | StreamFailed | None] = asyncio.Queue()
        self.credit_changed = asyncio.Event()
        self.failure: StreamFailed | None = None
        # False once the stream is winding down on its own (a websocket close was
        # relayed): the agent then finishes it, even if the public client is gone.
        self.reset_on_finish = True

    async def read(self) -> bytes:
        """The next chunk of the response body; b"" at its end. Raises ``StreamFailed``."""
        item = await self._chunks.get()
        if item is None:
            return b""
        if isinstance(item, StreamFailed):
            raise item
        return item

    def feed(self, data: bytes, end: bool) -> None:
        """Called by the session with body bytes from the agent."""
        if data:
            self._chunks.put_nowait(data)
        if end:
            self._chunks.put_nowait(None)

    def fail(self, failure: StreamFailed) -> None:
        """End the stream abnormally: every waiter (head, body, credit) gets ``failure``."""
        if self.failure is None:
            self.failure = failure
            if not self.head.done():
                self.head.set_exception(failure)
                self.head.exception()  # retrieved here: nobody may be awaiting it any more
            self._chunks.put_nowait(failure)
            self.credit_changed.set()


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
        """Wait until a frame that may wait (OPEN, DATA) can be queued, or the outbox closed."""
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


class AgentSession:
    """A connected, authenticated agent serving one or more tunnel names."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        user: str,
        names: list[str],
        label: str = "",
        *,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.ws = ws
        self.user = user
        self.names = names
        self.label = label
        self.id = os.urandom(6).hex()
        self.closed = False
        #: Called when the agent says its local service is reachable again (TARGET_UP).
        self.on_target_up: Callable[[], None] = lambda: None
        self._transport = transport  # aborted when the agent stops reading
        self._conn = Connection(Role.SERVER)
        self._streams: dict[int, Stream] = {}
        self._outbox = Outbox()
        self._loop = asyncio.get_running_loop()
        self._heartbeat_state = Heartbeat(self._loop.time())

    def __repr__(self) -> str:
        return f"<AgentSession {self.id} user={self.user} names={self.names}>"

    # -- handshake (used by the agent endpoint) --------------------------------

    def receive_handshake(self, message: bytes) -> Hello:
        """Decode the agent's first frame; raises ``ProtocolError`` unless it is HELLO."""
        frame = self._conn.receive(message)
        if not isinstance(frame, Hello):
            raise ProtocolError(f"expected HELLO, got {type(frame).__name__}")
        return frame

    async def welcome(self, frame: Welcome) -> None:
        """Send WELCOME (before ``run``: nothing else is sending yet), within ``SEND_TIMEOUT``."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self.ws.send_bytes(self._conn.send(frame))
        except TimeoutError:
            self._abort("the agent does not read: WELCOME not taken")

    # -- used by the ingress -----------------------------------------------------

    async def open(self, head: RequestHead, end_stream: bool) -> Stream:
        """Open a stream carrying ``head``. Raises ``StreamFailed`` if the agent is gone.

        Waits while the outbox is full (an agent reading slowly, or not at
        all): the caller bounds that wait with its own timeout.
        """
        await self._outbox.room()
        if self.closed:
            raise StreamFailed("agent disconnected")
        stream = Stream(self._conn.next_stream_id())
        try:
            data = self._conn.send(Open(stream.id, head, end_stream))
        except LocalProtocolError as exc:  # TooManyStreams
            raise StreamFailed(str(exc)) from exc
        self._streams[stream.id] = stream
        self._put(data)
        return stream

    async def send_body(self, stream: Stream, chunk: bytes, end: bool = False) -> None:
        """Send request body bytes, waiting for credit. Raises ``StreamFailed``."""
        view = memoryview(chunk)
        while True:
            if stream.failure:
                raise stream.failure
            credit = self._conn.credit(stream.id)
            if credit <= 0 and view:
                stream.credit_changed.clear()
                await stream.credit_changed.wait()
                continue
            piece = bytes(view[: min(credit, MAX_DATA_SIZE)])
            view = view[len(piece) :]
            last = end and not view
            if piece or last:
                await self._outbox.room()
                if stream.failure:
                    raise stream.failure
                self._send(Data(stream.id, piece, last))
            if not view:
                return

    async def consumed(self, stream: Stream, size: int) -> None:
        """The ingress wrote ``size`` response bytes to the public client: grant credit."""
        window = self._conn.consumed(stream.id, size)
        if window is not None and not self.closed:
            self._put(window)

    async def finish(self, stream: Stream) -> None:
        """Forget ``stream``; reset it first if it did not end normally (client gone, timeout).

        Never waits: the RESET is queued for the writer.
        """
        self._streams.pop(stream.id, None)
        if stream.reset_on_finish and self._conn.is_open(stream.id) and not self.closed:
            with contextlib.suppress(RelayError):
                self._send(Reset(stream.id, RESET_CANCEL, "public client went away"))

    # -- frames ----------------------------------------------------------------

    def _send(self, frame: Data | Reset | Ping | Pong) -> None:
        """Queue ``frame`` for the writer. Raises ``StreamFailed`` if the agent is gone."""
        if self.closed:
            raise StreamFailed("agent disconnected")
        self._put(self._conn.send(frame))

    def _put(self, data: bytes) -> None:
        self._outbox.put(data, self._loop.time())

    async def _write(self) -> None:
        """The one task that sends on the websocket, one frame at a time, each within SEND_TIMEOUT."""
        try:
            while not self.closed:
                data = await self._outbox.next()
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send_bytes(data)
                self._outbox.sent()
        except TimeoutError:
            self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the agent does not read")
        except (ConnectionError, RuntimeError) as exc:  # closed under us
            log.debug("session %s: send failed: %s", self.id, exc)
            self._mark_closed("agent disconnected")
        except Exception:
            log.exception("session %s: writer failed", self.id)
            self._abort("internal error in the writer")

    async def run(self) -> None:
        """Read frames until the websocket closes; fail every open stream then."""
        writer = asyncio.create_task(self._write())
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            async for msg in self.ws:
                self._heartbeat_state.seen(self._loop.time())
                if msg.type is not WSMsgType.BINARY:
                    await self.close(CLOSE_UNSUPPORTED, "only binary frames are accepted")
                    break
                try:
                    frame = self._conn.receive(msg.data)
                except ProtocolError as exc:
                    log.warning("session %s: protocol error: %s", self.id, exc)
                    await self.close(CLOSE_PROTOCOL_ERROR, f"protocol error: {exc}")
                    break
                if frame is not None:
                    self._dispatch(frame)
        finally:
            heartbeat.cancel()
            writer.cancel()
            self._mark_closed("agent disconnected")

    def _dispatch(self, frame: object) -> None:
        if isinstance(frame, Ping):
            # One PONG in the outbox at a time: an agent that pings faster than it
            # reads must not grow this side's memory.
            if not self._outbox.pending(Pong.TYPE):
                with contextlib.suppress(RelayError):
                    self._send(Pong(frame.payload))
            return
        if isinstance(frame, TargetUp):
            log.debug("session %s: target up", self.id)
            try:
                self.on_target_up()
            except Exception:
                log.exception("session %s: target-up callback failed", self.id)
            return
        stream_id = getattr(frame, "stream_id", 0)
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # the ingress already gave up on it
        if isinstance(frame, Response):
            if not stream.head.done():
                stream.head.set_result(frame.head)
            stream.feed(b"", frame.end_stream)
        elif isinstance(frame, Data):
            stream.feed(frame.data, frame.end_stream)
        elif isinstance(frame, Window):
            stream.credit_changed.set()
        elif isinstance(frame, Reset):
            stream.fail(StreamFailed(frame.reason or "reset by agent", frame.code))

    async def _heartbeat(self) -> None:
        while True:
            beat = self._heartbeat_state.check(self._loop.time(), self._outbox.oldest())
            if beat.stuck:
                self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the agent does not read")
                return
            if beat.dead:
                log.warning("session %s: no frame for %ss, dropping it", self.id, HEARTBEAT_TIMEOUT)
                await self.close(CLOSE_HEARTBEAT, "heartbeat timeout")
                return
            if beat.ping:
                with contextlib.suppress(RelayError):
                    self._send(Ping(b""))
            await asyncio.sleep(beat.wait)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.close()
            for stream in list(self._streams.values()):
                stream.fail(StreamFailed(reason))

    def _abort(self, reason: str) -> None:
        """Drop a connection whose agent does not read: no close handshake could complete."""
        if not self.closed:
            log.warning("session %s: %s; aborting the connection", self.id, reason)
        self._mark_closed(reason)
        if self._transport is not None:
            self._transport.abort()

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket with ``code``; streams still open fail at once."""
        self._mark_closed(reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), 5)
