"""The server side of one connected agent: a websocket carrying many streams.

A thin shell around ``relay_protocol.Engine``, which owns everything that is
not I/O (stream ids, states, credit, cutting bodies into DATA frames, the
outgoing buffer, PING answers, the heartbeat decision, the error state). Here:

- one read loop feeds each websocket message to the engine and hands what it
  returns to the ``Stream`` the ingress is waiting on;
- one writer task sends the engine's ``outgoing()`` frames, oldest first, each
  websocket send bounded by ``SEND_TIMEOUT``; nothing else waits on the socket
  (a burst's frames go early, in fours, only onto an empty transport buffer:
  ``_queued``);
- a heartbeat task asks the engine what to do at each deadline;
- asyncio events wake callers waiting for credit (a WINDOW arrived) or room
  (the buffer fell below ``SEND_HIGH_WATER``: OPEN and DATA wait, control
  frames never do).

An agent that stops reading is aborted ``SEND_TIMEOUT`` after the oldest frame
it has not taken was queued (by the writer, or by the heartbeat if the agent
keeps talking).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable

from aiohttp import WSMsgType, web

from relay_protocol import (
    BadHead,
    Data,
    Engine,
    Hello,
    LocalProtocolError,
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
from relay_protocol.frames import (
    CLOSE_HEARTBEAT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED,
    FEATURE_BATCH,
    FEATURE_INLINE_BODY,
    RESET_CANCEL,
)
from relay_protocol.limits import HEARTBEAT_INTERVAL, SEND_TIMEOUT

from .budget import FRAMES_PER_TURN, MAX_FRAMES_PER_SECOND, FrameBudget

log = logging.getLogger("relay.server")

#: Websocket control messages the session takes (aiohttp's autoping is off).
_WEBSOCKET_PINGS = frozenset({WSMsgType.PING, WSMsgType.PONG})


class StreamFailed(RelayError):
    """The stream ended without a normal end: reset by the agent, or the agent went away."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code  # the agent's RESET code; None if the connection was lost


class Stream:
    """One request/response exchange with the agent, seen from the ingress.

    The response body arrives as chunks in a deque, with at most one reader waiting
    on a future (the ingress, or whoever drains an attempt's answer): lighter than an
    ``asyncio.Queue`` and an ``asyncio.Event`` per stream, which a webhook's stream
    never needs (measured: docs/performance.md).
    """

    __slots__ = (
        "_chunks",
        "_credit",
        "_reader",
        "failure",
        "head",
        "id",
        "reset_on_finish",
        "reset_reason",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes | StreamFailed | None] = collections.deque()
        #: The one reader waiting for a chunk, if any.
        self._reader: asyncio.Future[None] | None = None
        #: Made by the first sender that waits for credit (a body larger than the window).
        self._credit: asyncio.Event | None = None
        self.failure: StreamFailed | None = None
        #: Why the relay gives the stream up, sent in its RESET if it did not end normally.
        self.reset_reason = "public client went away"
        # False once the stream is winding down on its own (a websocket close was
        # relayed): the agent then finishes it, even if the public client is gone.
        self.reset_on_finish = True

    async def read(self) -> bytes:
        """The next chunk of the response body; b"" at its end. Raises ``StreamFailed``."""
        while not self._chunks:
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._chunk(self._chunks.popleft())

    def read_nowait(self) -> bytes:
        """``read`` when ``has_chunk`` says it would not wait (else ``IndexError``)."""
        return self._chunk(self._chunks.popleft())

    @staticmethod
    def _chunk(item: bytes | StreamFailed | None) -> bytes:
        if item is None:
            return b""
        if isinstance(item, StreamFailed):
            raise item
        return item

    def has_chunk(self) -> bool:
        """True if ``read`` would return without waiting."""
        return bool(self._chunks)

    def take_whole(self, length: int | None) -> bytes | None:
        """The whole body, taken, if it is all here in one piece (it came in its
        RESPONSE, as a small answer does) and is ``length`` bytes long (any length if
        None); else None, and nothing is taken."""
        chunks = self._chunks
        if len(chunks) == 1 and chunks[0] is None:
            whole = b""
        elif len(chunks) == 2 and chunks[1] is None and isinstance(chunks[0], bytes):
            whole = chunks[0]
        else:
            return None
        if length is not None and len(whole) != length:
            return None
        chunks.clear()
        return whole

    def feed(self, data: bytes, end: bool) -> None:
        """Called by the session with body bytes from the agent."""
        if data:
            self._chunks.append(data)
        if end:
            self._chunks.append(None)
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    async def credit_changed(self) -> None:
        """Wait until the agent grants credit (a WINDOW) or the stream fails."""
        if self._credit is None:
            self._credit = asyncio.Event()
        self._credit.clear()
        await self._credit.wait()

    def credit_granted(self) -> None:
        if self._credit is not None:
            self._credit.set()

    def fail(self, failure: StreamFailed) -> None:
        """End the stream abnormally: every waiter (head, body, credit) gets ``failure``."""
        if self.failure is None:
            self.failure = failure
            if not self.head.done():
                self.head.set_exception(failure)
                self.head.exception()  # retrieved here: nobody may be awaiting it any more
            self._chunks.append(failure)
            self._wake_reader()
            self.credit_granted()


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
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.ws = ws
        self.user = user
        self.names = names
        self.label = label
        self.id = os.urandom(6).hex()
        self.closed = False
        #: Where the agent connects from (the client address, through a trusted proxy).
        self.remote = ""
        #: When it connected (seconds since the epoch).
        self.since = time.time()
        #: Called when the agent says its local service is reachable again (TARGET_UP).
        self.on_target_up: Callable[[], None] = lambda: None
        self._transport = transport  # aborted when the agent stops reading
        self._loop = asyncio.get_running_loop()
        self._engine = Engine(Role.SERVER, self._loop.time(), heartbeat_interval=heartbeat_interval)
        self._streams: dict[int, Stream] = {}
        self._ready = asyncio.Event()  # the engine may have frames to send
        self._room = asyncio.Event()  # the engine's buffer fell below its high-water mark
        self._room.set()
        self._early = True  # frames may go as they are queued (``_queued``); off after a failure
        self._throttled = False  # read more slowly once for being over its frame budget
        #: The frames it may be read at: its own until the agent endpoint hands it its
        #: user's, shared by all of that user's connections.
        self.budget = FrameBudget(self._loop.time())

    @property
    def can_open_now(self) -> bool:
        """True if ``open`` would not wait (room in the outgoing buffer)."""
        return self._engine.has_room or self.closed

    @property
    def open_streams(self) -> int:
        """Streams open on this connection now."""
        return len(self._streams)

    def __repr__(self) -> str:
        return f"<AgentSession {self.id} user={self.user} names={self.names}>"

    # -- handshake (used by the agent endpoint) --------------------------------

    def receive_handshake(self, message: bytes) -> Hello:
        """Decode the agent's first frame; raises ``ProtocolError`` unless it is HELLO.
        An agent that lists ``"batch"`` gets BATCH messages from then on, one that lists
        ``"inline-body"`` OPENs that carry a small body."""
        frame = self._engine.receive(message, self._loop.time())
        if not isinstance(frame, Hello):
            raise ProtocolError(f"expected HELLO, got {type(frame).__name__}")
        self._engine.batching = FEATURE_BATCH in frame.features
        self._engine.inline_bodies = FEATURE_INLINE_BODY in frame.features
        return frame

    async def welcome(self, frame: Welcome) -> None:
        """Send WELCOME (before ``run``: nothing else is sending yet), within ``SEND_TIMEOUT``."""
        self._engine.send(frame, self._loop.time())
        data = self._engine.outgoing()
        assert data is not None
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self.ws.send_bytes(data)
        except TimeoutError:
            self._abort("the agent does not read: WELCOME not taken")
        self._engine.sent()

    # -- used by the ingress -----------------------------------------------------

    async def open(self, head: RequestHead, end_stream: bool, body: bytes = b"") -> Stream:
        """Open a stream carrying ``head``, and ``body`` (at most ``MAX_DATA_SIZE``: the
        request body's first bytes, or with ``end_stream`` all of it) right with it.

        Raises ``BadHead`` (``HeadTooLarge``: answer 431, or 414 when its
        ``part`` is ``"target"``) if the head cannot be encoded: no stream id is
        spent and the connection is untouched. Raises ``StreamFailed`` if the
        agent is gone or at its stream limit. Waits while the outgoing buffer is
        full (an agent reading slowly, or not at all): the caller bounds that
        wait with its own timeout.
        """
        await self._wait_room()
        if self.closed:
            raise StreamFailed("agent disconnected")
        try:
            stream_id = self._engine.open(head, end_stream, self._loop.time(), body)
        except BadHead:
            raise  # the request's fault: the ingress answers it with a 4xx
        except LocalProtocolError as exc:  # TooManyStreams, ConnectionFailed
            raise StreamFailed(str(exc)) from exc
        self._queued()
        stream = self._streams[stream_id] = Stream(stream_id)
        return stream

    def send_body_now(self, stream: Stream, chunk: bytes, end: bool) -> int:
        """Queue as much of ``chunk`` as credit and room allow, without waiting; returns
        how many bytes were taken (``send_body`` the rest). Raises ``StreamFailed``."""
        if stream.failure:
            raise stream.failure
        try:
            taken = self._engine.send_data(stream.id, chunk, end, self._loop.time())
        except LocalProtocolError as exc:  # StreamClosed, ConnectionFailed
            raise stream.failure or StreamFailed(str(exc)) from exc
        if self._engine.buffered:
            self._queued()
        return taken

    async def send_body(self, stream: Stream, chunk: bytes, end: bool = False) -> None:
        """Send request body bytes, waiting for credit and room. Raises ``StreamFailed``."""
        offset = 0
        while True:
            if stream.failure:
                raise stream.failure
            if self.closed:
                raise StreamFailed("agent disconnected")
            rest = chunk if not offset else memoryview(chunk)[offset:]
            try:
                offset += self._engine.send_data(stream.id, rest, end, self._loop.time())
            except LocalProtocolError as exc:  # StreamClosed, ConnectionFailed
                raise stream.failure or StreamFailed(str(exc)) from exc
            if self._engine.buffered:
                self._queued()
            if offset == len(chunk):
                return
            if not self._engine.credit(stream.id):
                await stream.credit_changed()
            elif not self._engine.has_room:
                await self._wait_room()
            else:  # a message left at once (``_queued``) and made room: go on, after the others' turn
                await asyncio.sleep(0)

    async def consumed(self, stream: Stream, size: int) -> None:
        """The ingress wrote ``size`` response bytes to the public client: grant credit."""
        self._engine.consumed(stream.id, size, self._loop.time())
        if self._engine.buffered:
            self._queued()

    async def finish(self, stream: Stream) -> None:
        """Forget ``stream``; reset it first if it did not end normally (client gone, timeout).

        Never waits: the RESET is queued for the writer.
        """
        self._streams.pop(stream.id, None)
        if stream.reset_on_finish and self._engine.reset(
            stream.id, RESET_CANCEL, stream.reset_reason, self._loop.time()
        ):
            self._queued()

    # -- frames ----------------------------------------------------------------

    async def _wait_room(self) -> None:
        while not self._engine.has_room and not self.closed:
            self._room.clear()
            await self._room.wait()

    def _queued(self) -> None:
        """Frames were queued: the writer sends them after this pass of the event loop,
        or they go now if enough wait (``Engine.send_due``) and the transport takes them
        without waiting (nothing of its own still to write, so a slow reader's frames
        wait for the writer, which bounds the wait with ``SEND_TIMEOUT``). Never raises:
        if the write fails, the writer sends everything from then on (and meets the
        failure itself)."""
        self._ready.set()
        engine, transport = self._engine, self._transport
        if not (engine.send_due and self._early) or self.closed or transport is None:
            return
        if self.ws.closed:  # its CLOSE is out (aiohttp marks it first): no frame may follow
            return
        try:
            if transport.is_closing() or transport.get_write_buffer_size():
                return
            data = engine.outgoing()
            assert data is not None
            transport.writelines((_binary_frame_head(len(data)), data))
        except Exception as exc:  # nothing taken: the message stays the writer's to send
            self._early = False
            log.warning("session %s: sending frames early failed (%r); the writer sends them", self.id, exc)
            return
        engine.sent()
        if engine.has_room:
            self._room.set()

    async def _write(self) -> None:
        """The one task that sends on the websocket, one frame at a time, each within SEND_TIMEOUT."""
        engine = self._engine
        try:
            while not self.closed:
                data = engine.outgoing()
                if data is None:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send_bytes(data)
                engine.sent()
                if engine.has_room:
                    self._room.set()
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
        engine = self._engine
        budget = self.budget
        try:
            async for msg in self.ws:
                # Over budget (this connection or another of its user's): wait before this
                # message is decoded, so the user's connections together get their rate.
                await self._pace(budget)
                if msg.type is not WSMsgType.BINARY:
                    if msg.type in _WEBSOCKET_PINGS:  # answered here, each a frame of the budget
                        budget.spend(1, self._loop.time())
                        if msg.type is WSMsgType.PING:
                            await self._pong(msg.data)
                        continue
                    await self.close(CLOSE_UNSUPPORTED, "only binary frames are accepted")
                    break
                now, turn = self._loop.time(), 0
                try:
                    for data in engine.parts(msg.data):
                        frame = engine.receive(data, now)
                        if frame is not None:
                            self._dispatch(frame)
                        turn += 1
                        if turn == FRAMES_PER_TURN:  # a long BATCH: let the other tenants in
                            budget.spend(turn, now)
                            await self._pace(budget, turn=True)
                            now, turn = self._loop.time(), 0
                except ProtocolError as exc:
                    log.warning("session %s: protocol error: %s", self.id, exc)
                    await self.close(CLOSE_PROTOCOL_ERROR, f"protocol error: {exc}")
                    break
                except LocalProtocolError:  # ConnectionFailed: the writer or heartbeat gave up
                    break
                if engine.buffered:
                    self._ready.set()  # a PONG
                budget.spend(turn, now)
        finally:
            heartbeat.cancel()
            writer.cancel()
            self._mark_closed("agent disconnected")

    async def _pong(self, payload: bytes | bytearray) -> None:
        """Answer a websocket ping (RFC 6455 5.5.2; relay-agent sends none: its heartbeat
        is the protocol's PING frame), unless the connection is going."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self.ws.pong(bytes(payload))  # aiohttp reads a ping as a bytearray
        except TimeoutError:
            self._abort(f"a pong waited {SEND_TIMEOUT:g}s to be sent: the agent does not read")
        except (ConnectionError, RuntimeError):  # closed under us
            pass

    async def _pace(self, budget: FrameBudget, turn: bool = False) -> None:
        """Wait while ``budget`` is overdrawn, asking again after each wait (another of
        the user's connections may have read meanwhile); with ``turn``, in the middle of a
        message, yield to the loop's other tasks even if it is not."""
        pause = budget.due(self._loop.time())
        if not pause and turn:
            await asyncio.sleep(0)
        while pause:
            self._over_budget()
            await asyncio.sleep(pause)
            pause = budget.due(self._loop.time())

    def _over_budget(self) -> None:
        if not self._throttled:  # once per connection: a flooder would flood the log too
            self._throttled = True
            log.warning(
                "session %s of %s: over %d frames a second; reading it more slowly",
                self.id,
                self.user,
                MAX_FRAMES_PER_SECOND,
            )

    def _dispatch(self, frame: object) -> None:
        if isinstance(frame, TargetUp):
            log.debug("session %s: target up", self.id)
            try:
                self.on_target_up()
            except Exception:
                log.exception("session %s: target-up callback failed", self.id)
            return
        stream = self._streams.get(getattr(frame, "stream_id", 0))
        if stream is None:
            return  # the ingress already gave up on it
        if isinstance(frame, Data):
            stream.feed(frame.data, frame.end_stream)
        elif isinstance(frame, Response):
            if not stream.head.done():
                stream.head.set_result(frame.head)
            stream.feed(frame.body, frame.end_stream)
        elif isinstance(frame, Window):
            stream.credit_granted()
        elif isinstance(frame, Reset):
            stream.fail(StreamFailed(frame.reason or "reset by agent", frame.code))

    async def _heartbeat(self) -> None:
        while not self.closed:
            beat = self._engine.heartbeat(self._loop.time())
            if beat.stuck:
                self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the agent does not read")
                return
            if beat.dead:
                if not self.closed:
                    silent = self._engine.silence_timeout
                    log.warning("session %s of %s: no frame for %gs, dropping it", self.id, self.user, silent)
                    await self.close(CLOSE_HEARTBEAT, "heartbeat timeout")
                return
            if beat.ping:
                self._ready.set()
            await asyncio.sleep(beat.wait)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._engine.fail(reason)
            self._room.set()  # wake every caller waiting for room: the connection is gone
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


def _binary_frame_head(length: int) -> bytes:
    """The head of an unmasked, final, binary websocket frame (a server's) whose payload
    is ``length`` bytes: RFC 6455 5.2. aiohttp's writer sends the rest (CLOSE, PONG) a
    whole frame per write, so frames written here never cut into one of its own."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return bytes((0x82, 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 127)) + length.to_bytes(8, "big")
