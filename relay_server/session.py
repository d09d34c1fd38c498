"""The server side of one connected agent: a websocket carrying many streams.

``AgentSession`` owns the websocket and the ``relay_protocol.Connection``; it
reads frames in one loop, hands each stream's response to the ``Stream`` the
ingress is waiting on, and sends frames for the ingress under flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

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
    Welcome,
    Window,
)
from relay_protocol.frames import RESET_CANCEL
from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import HEARTBEAT_TIMEOUT, MAX_DATA_SIZE

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


class AgentSession:
    """A connected, authenticated agent serving one or more tunnel names."""

    def __init__(self, ws: web.WebSocketResponse, user: str, names: list[str], label: str = "") -> None:
        self.ws = ws
        self.user = user
        self.names = names
        self.label = label
        self.id = os.urandom(6).hex()
        self.closed = False
        self._conn = Connection(Role.SERVER)
        self._streams: dict[int, Stream] = {}
        self._send_lock = asyncio.Lock()
        self._heartbeat_state = Heartbeat(asyncio.get_running_loop().time())

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
        async with self._send_lock:
            await self.ws.send_bytes(self._conn.send(frame))

    # -- used by the ingress -----------------------------------------------------

    async def open(self, head: RequestHead, end_stream: bool) -> Stream:
        """Open a stream carrying ``head``. Raises ``StreamFailed`` if the agent is gone."""
        async with self._send_lock:
            if self.closed:
                raise StreamFailed("agent disconnected")
            stream = Stream(self._conn.next_stream_id())
            self._streams[stream.id] = stream
            try:
                await self.ws.send_bytes(self._conn.send(Open(stream.id, head, end_stream)))
            except LocalProtocolError as exc:  # TooManyStreams
                del self._streams[stream.id]
                raise StreamFailed(str(exc)) from exc
            except ConnectionError as exc:
                raise StreamFailed("agent disconnected") from exc
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
                await self._send(Data(stream.id, piece, last))
            if not view:
                return

    async def consumed(self, stream: Stream, size: int) -> None:
        """The ingress wrote ``size`` response bytes to the public client: grant credit."""
        window = self._conn.consumed(stream.id, size)
        if window is not None:
            await self._send_raw(window)

    async def finish(self, stream: Stream) -> None:
        """Forget ``stream``; reset it first if it did not end normally (client gone, timeout)."""
        self._streams.pop(stream.id, None)
        if stream.reset_on_finish and self._conn.is_open(stream.id) and not self.closed:
            with contextlib.suppress(RelayError, ConnectionError):
                await self._send(Reset(stream.id, RESET_CANCEL, "public client went away"))

    # -- frames ----------------------------------------------------------------

    async def _send(self, frame: Open | Data | Reset | Ping | Pong | Window) -> None:
        async with self._send_lock:
            if self.closed:
                raise StreamFailed("agent disconnected")
            data = self._conn.send(frame)
            try:
                await self.ws.send_bytes(data)
            except ConnectionError as exc:
                raise StreamFailed("agent disconnected") from exc

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            if not self.closed:
                with contextlib.suppress(ConnectionError):
                    await self.ws.send_bytes(data)

    async def run(self) -> None:
        """Read frames until the websocket closes; fail every open stream then."""
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            async for msg in self.ws:
                self._heartbeat_state = Heartbeat(asyncio.get_running_loop().time())
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
                    await self._dispatch(frame)
        finally:
            heartbeat.cancel()
            self._mark_closed("agent disconnected")

    async def _dispatch(self, frame: object) -> None:
        if isinstance(frame, Ping):
            with contextlib.suppress(RelayError):
                await self._send(Pong(frame.payload))
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
        loop = asyncio.get_running_loop()
        while True:
            beat = self._heartbeat_state.check(loop.time())
            if beat.dead:
                log.warning("session %s: no frame for %ss, dropping it", self.id, HEARTBEAT_TIMEOUT)
                await self.close(CLOSE_HEARTBEAT, "heartbeat timeout")
                return
            if beat.ping:
                with contextlib.suppress(RelayError):
                    await self._send(Ping(b""))
            await asyncio.sleep(beat.wait)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            for stream in list(self._streams.values()):
                stream.fail(StreamFailed(reason))

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket with ``code``; streams still open fail at once."""
        self._mark_closed(reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), 5)
