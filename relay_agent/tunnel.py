"""The agent's connection to the server: handshake, frames, streams, heartbeat, reconnect.

A thin shell around ``relay_protocol.Engine``, which owns everything that is
not I/O (stream states, credit, cutting bodies into DATA frames, the outgoing
buffer, PING answers, the heartbeat decision, the error state). Here: a read
loop feeding websocket messages to the engine, one writer task sending its
``outgoing()`` frames, each websocket send bounded by ``SEND_TIMEOUT`` (a burst's
frames go early, in fours, only onto an empty transport buffer: ``_queued``), a
heartbeat task, and asyncio events for credit and room (RESPONSE and DATA wait
while ``SEND_HIGH_WATER`` bytes are queued; control frames never do). A server
that stops reading is aborted ``SEND_TIMEOUT`` after the oldest frame it has
not taken was queued, even if it keeps sending, and the agent reconnects as
after any network failure.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus
from websockets.frames import CloseCode
from websockets.protocol import State

from relay_protocol import (
    PROTOCOL_VERSION,
    BadHead,
    Data,
    Engine,
    Frame,
    Hello,
    LocalProtocolError,
    Open,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Role,
    TargetUp,
    Welcome,
    Window,
)
from relay_protocol.frames import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_VERSION,
    FEATURE_BATCH,
    FEATURE_INLINE_BODY,
    FEATURE_TARGET_UP,
    RESET_BAD_RESPONSE,
    RESET_CANCEL,
    RESET_INTERNAL,
    RESET_TARGET_UNREACHABLE,
)
from relay_protocol.limits import MAX_FRAME_SIZE, SEND_TIMEOUT

from .backoff import backoff, should_retry
from .client import LocalClient
from .config import AgentConfig
from .errors import Refused
from .forward import ForwardFailed, Link, client_session, forward
from .inspector.recorder import Recorder
from .probe import TargetProbe
from .tls import CertificateRefused, certificate_problem, speaks_tls

log = logging.getLogger("relay.agent")

#: Seconds to open the websocket and get WELCOME back before trying again.
HANDSHAKE_TIMEOUT = 15.0

AGENT_NAME = f"relay-agent/{importlib.metadata.version('relay')}"


class StreamGone(Exception):
    """The stream was reset by the server or the connection was lost."""


class _RequestBody:
    """``AgentStream.body``: its chunks, each granted back to the server once the target
    asks for the next. An iterator class, not an async generator: mypyc compiles none."""

    def __init__(self, stream: AgentStream) -> None:
        self._stream = stream
        self._taken = 0

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        taken, self._taken = self._taken, 0  # granted once, even if this call is cancelled
        data = await self._stream.next_chunk(taken)
        if data is None:
            raise StopAsyncIteration
        self._taken = len(data)
        return data


class AgentStream:
    """One forwarded request, seen from the agent: implements ``forward.Link``."""

    def __init__(self, tunnel: _Session, open_frame: Open) -> None:
        self._session = tunnel
        self.id = open_frame.stream_id
        self.head = open_frame.head
        self.has_body = bool(open_frame.body) or not open_frame.end_stream
        self._chunks: collections.deque[bytes] = collections.deque()
        if open_frame.body:  # the body's first bytes (all of it, with END_STREAM) came with the head
            self._chunks.append(open_frame.body)
        self._ended = open_frame.end_stream  # the request body's end arrived
        self._arrived: asyncio.Future[None] | None = None
        self.credit_changed = asyncio.Event()
        self.gone = False
        self.why_gone = ""  # set by ``kill``: what ended the stream from the server's side
        self.task: asyncio.Task[None] | None = None

    # fed by the session's read loop
    def feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
        if end:
            self._ended = True
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def kill(self, why: str = "the connection to the server was lost") -> None:
        self.gone = True
        self.why_gone = why
        self.credit_changed.set()
        if self.task is not None:
            self.task.cancel()

    # forward.Link
    def body(self) -> AsyncIterator[bytes]:
        return _RequestBody(self)

    async def next_chunk(self, taken: int) -> bytes | None:
        """The request body's next chunk as it arrives, None after its end. ``taken``: bytes
        of the chunk before, which the target took: the server gets that much credit."""
        if taken:
            await self._session.consumed(self.id, taken)
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self._ended:
                return None
            self._arrived = asyncio.get_running_loop().create_future()
            await self._arrived
            self._arrived = None

    def whole_body(self) -> bytes | None:
        if not self._ended:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._session.grant(self.id, len(data))
        return data

    async def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        await self._session.respond(self, head, end, body)

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        await self._session.send_body(self, chunk, end)

    async def reset(self, code: int, reason: str) -> None:
        if not self.gone:
            self._session.reset(self.id, code, reason)


class _Session:
    """One websocket connection to the server, from HELLO to close."""

    def __init__(self, ws: ClientConnection, tunnel: Tunnel) -> None:
        self.ws = ws
        self.tunnel = tunnel
        self.engine = Engine(
            Role.AGENT, time.monotonic(), heartbeat_interval=tunnel.config.heartbeat_interval
        )
        self.streams: dict[int, AgentStream] = {}
        self.closed = False
        #: Why this side dropped the connection (its heartbeat or writer gave up); None if it did not.
        self.gave_up: str | None = None
        self.features: tuple[str, ...] = ()  # what the server listed in WELCOME
        self._ready = asyncio.Event()  # the engine may have frames to send
        self._room = asyncio.Event()  # the engine's buffer fell below its high-water mark
        self._room.set()
        self._early = True  # frames may go as they are queued (``_queued``); off after a failure

    def is_open(self, stream_id: int) -> bool:
        return self.engine.is_open(stream_id)

    async def respond(self, stream: AgentStream, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        """Send a stream's RESPONSE head, and ``body`` (at most ``MAX_DATA_SIZE``) right
        with it, once there is room. Raises ``StreamGone``, or ``BadHead`` if the head
        cannot travel (the stream is left as it was)."""
        await self._wait_room()
        if stream.gone or self.closed:
            raise StreamGone()
        try:
            self.engine.respond(stream.id, head, end, time.monotonic(), body)
        except BadHead:
            raise
        except LocalProtocolError as exc:  # StreamClosed, ConnectionFailed
            raise StreamGone() from exc
        self._queued()

    async def send_body(self, stream: AgentStream, chunk: bytes, end: bool) -> None:
        """Send response body bytes, waiting for credit and room. Raises ``StreamGone``."""
        offset = 0
        while True:
            if stream.gone or self.closed:
                raise StreamGone()
            rest = chunk if not offset else memoryview(chunk)[offset:]
            try:
                offset += self.engine.send_data(stream.id, rest, end, time.monotonic())
            except LocalProtocolError as exc:  # StreamClosed, ConnectionFailed
                raise StreamGone() from exc
            if self.engine.buffered:
                self._queued()
            if offset == len(chunk):
                return
            if not self.engine.credit(stream.id):
                stream.credit_changed.clear()
                await stream.credit_changed.wait()
            elif not self.engine.has_room:
                await self._wait_room()
            else:  # a message left at once (``_queued``) and made room: go on, after the others' turn
                await asyncio.sleep(0)

    def reset(self, stream_id: int, code: int, reason: str) -> None:
        """Reset a stream if it is still open; never waits, never raises."""
        if self.engine.reset(stream_id, code, reason, time.monotonic()):
            self._queued()

    def post(self, frame: TargetUp) -> None:
        """Queue a connection frame now, without waiting. Raises ``StreamGone`` if the connection is gone."""
        if self.closed:
            raise StreamGone()
        try:
            self.engine.send(frame, time.monotonic())
        except LocalProtocolError as exc:  # ConnectionFailed
            raise StreamGone() from exc
        self._ready.set()

    async def consumed(self, stream_id: int, size: int) -> None:
        self.grant(stream_id, size)

    def grant(self, stream_id: int, size: int) -> None:
        """``size`` request body bytes of a stream went to the target: credit the server."""
        if size:
            self.engine.consumed(stream_id, size, time.monotonic())
            if self.engine.buffered:
                self._queued()

    async def _wait_room(self) -> None:
        while not self.engine.has_room and not self.closed:
            self._room.clear()
            await self._room.wait()

    async def _send_now(self) -> None:
        """Send what the engine queued, before the writer runs (the handshake)."""
        while (data := self.engine.outgoing()) is not None:
            await self.ws.send(data)
            self.engine.sent()

    async def handshake(self) -> Welcome:
        config = self.tunnel.config
        tunnels = tuple({"name": n, **config.settings} for n in config.names)
        # Sent before the writer starts; the caller bounds the whole handshake in time.
        hello = Hello(
            PROTOCOL_VERSION, tunnels, AGENT_NAME, config.label, (FEATURE_BATCH, FEATURE_INLINE_BODY)
        )
        self.engine.send(hello, time.monotonic())
        await self._send_now()
        message = await self.ws.recv()
        if not isinstance(message, bytes):
            raise ProtocolError("server sent a text frame")
        frame = self.engine.receive(message, time.monotonic())
        if not isinstance(frame, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
        if frame.version != PROTOCOL_VERSION:
            raise Refused(
                CLOSE_VERSION, f"server speaks protocol {frame.version}, this agent {PROTOCOL_VERSION}"
            )
        self.features = frame.features
        self.engine.batching = FEATURE_BATCH in frame.features
        self.engine.inline_bodies = FEATURE_INLINE_BODY in frame.features
        return frame

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        heartbeat = asyncio.create_task(self._heartbeat())
        engine = self.engine
        try:
            async for message in self.ws:
                if not isinstance(message, bytes):
                    raise ProtocolError("server sent a text frame")
                try:
                    frames = engine.receive_all(message, time.monotonic())
                except LocalProtocolError:  # ConnectionFailed: the writer or heartbeat gave up
                    break
                for frame in frames:
                    self._dispatch(frame)
                if engine.buffered:
                    self._ready.set()  # a PONG
        finally:
            heartbeat.cancel()
            writer.cancel()
            self._mark_closed("connection closed")

    def _queued(self) -> None:
        """Frames were queued: the writer sends them after this pass of the event loop,
        or they go now if enough wait (``Engine.send_due``) and the transport takes them
        without waiting (nothing of its own still to write, so a slow reader's frames
        wait for the writer, which bounds the wait with ``SEND_TIMEOUT``). Never raises.

        Through websockets' own protocol object and ``send_data``, as its ``send`` does,
        less the wait for the transport to drain. (``send`` also waits for a fragmented
        message being sent: this connection never sends one.) If that fails (a
        websockets release that changed them), the writer sends everything from then on.
        """
        self._ready.set()
        engine, ws = self.engine, self.ws
        if not (engine.send_due and self._early) or self.closed:
            return
        try:
            transport = ws.transport
            if ws.protocol.state is not State.OPEN or transport.is_closing():
                return
            if transport.get_write_buffer_size():
                return
            data = engine.outgoing()
            assert data is not None
            ws.protocol.send_binary(data)  # raises before it takes anything: the writer sends it
            engine.sent()  # websockets has it now, as after its ``send``
            ws.send_data()  # a broken transport: the read loop and the writer see it
        except Exception as exc:
            self._early = False
            log.warning("sending frames early failed (%r): the writer sends them from now on", exc)
            return
        if engine.has_room:
            self._room.set()

    async def _write(self) -> None:
        """The one task that sends on the websocket, one frame at a time, each within SEND_TIMEOUT."""
        engine = self.engine
        try:
            while not self.closed:
                data = engine.outgoing()
                if data is None:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send(data)
                engine.sent()
                if engine.has_room:
                    self._room.set()
        except TimeoutError:
            self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the server does not read")
        except ConnectionClosed:
            self._mark_closed("connection closed")  # the read loop sees it too and reports it
        except Exception:
            log.exception("writer failed")
            self._abort("internal error in the writer")

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.engine.fail(reason)
            self._room.set()  # wake every stream waiting for room: the connection is gone
            for stream in list(self.streams.values()):
                stream.kill()

    def _abort(self, reason: str) -> None:
        """Drop a connection whose server does not read (or says nothing): no close
        handshake could complete. The read loop ends and the agent reconnects."""
        if not self.closed:
            log.warning("%s: reconnecting", reason)
            self.gave_up = reason
        self._mark_closed(reason)
        self.ws.transport.abort()

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Open):
            stream = AgentStream(self, frame)
            self.streams[stream.id] = stream
            stream.task = asyncio.create_task(self._serve(stream))
            return
        stream_or_none = self.streams.get(getattr(frame, "stream_id", 0))
        if stream_or_none is None:
            return
        if isinstance(frame, Data):
            stream_or_none.feed(frame.data, frame.end_stream)
        elif isinstance(frame, Window):
            stream_or_none.credit_changed.set()
        elif isinstance(frame, Reset):
            stream_or_none.kill(f"the server ended it: {frame.reason or frame.code}")

    async def _serve(self, stream: AgentStream) -> None:
        started = time.monotonic()
        status: int | str = "-"
        error = ""
        recorder = self.tunnel.recorder
        recording = recorder.record(stream.head, stream.has_body, stream) if recorder is not None else None
        link: Link = recording or stream
        try:
            tunnel = self.tunnel
            status = await forward(
                tunnel.local, tunnel.client, tunnel.config, stream.head, stream.has_body, link
            )
        except ForwardFailed as exc:
            status = exc.status  # what the client sees
            error = str(exc)
            if exc.code == RESET_TARGET_UNREACHABLE:
                self.tunnel.target_unreachable()
            await stream.reset(exc.code, str(exc))
        except BadHead as bad_head:  # the local app's answer cannot travel (a head over the limits)
            status = 502
            error = f"the response head cannot be relayed: {bad_head}"
            await stream.reset(RESET_BAD_RESPONSE, error)
        except StreamGone:
            status = "reset"
            error = stream.why_gone
        except asyncio.CancelledError:
            status = "cancelled"
            error = stream.why_gone
        except Exception as bug:  # a bug: keep the connection and other streams alive
            log.exception("stream %d: internal error", stream.id)
            await stream.reset(RESET_INTERNAL, f"agent error: {type(bug).__name__}")
        finally:
            self.streams.pop(stream.id, None)
            # Still open if answered before the request body ended: nothing more will be read.
            self.reset(stream.id, RESET_CANCEL, "response complete")
            if recording is not None:
                recording.finish(status, error)
            self.tunnel.on_request(stream.head, status, time.monotonic() - started, error)

    async def _heartbeat(self) -> None:
        while not self.closed:
            beat = self.engine.heartbeat(time.monotonic())
            if beat.stuck:
                self._abort(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the server does not read")
                return
            if beat.dead:
                self._abort(f"no frame from the server for {self.engine.silence_timeout:g}s")
                return
            if beat.ping:
                self._ready.set()
            await asyncio.sleep(beat.wait)


#: Called once a stream ends: its head, the status the public client saw (or how it
#: ended: "reset", "cancelled"), seconds taken, and why it failed ("" if it did not).
RequestLogger = Callable[[RequestHead, "int | str", float, str], None]
UrlPrinter = Callable[[Welcome], None]
#: Called when a connection failed or ended: why, and the seconds until the next try.
OfflineReporter = Callable[[str, float], None]


class Tunnel:
    """Keeps the agent connected: connect, serve, and reconnect with backoff, until refused.

    With a ``recorder`` (the inspector's), every stream is recorded as it is forwarded."""

    def __init__(
        self,
        config: AgentConfig,
        on_welcome: UrlPrinter,
        on_request: RequestLogger,
        *,
        recorder: Recorder | None = None,
        on_offline: OfflineReporter = lambda why, delay: None,
    ) -> None:
        self.config = config
        self.on_welcome = on_welcome
        self.on_request = on_request
        self.recorder = recorder
        self.on_offline = on_offline
        self.offline_reason = "not connected yet"
        self.client: aiohttp.ClientSession  # WebSocket upgrades to the target
        self.local: LocalClient  # every other request to the target
        self._probe = TargetProbe(config.target.host, config.target.port, self._target_up)
        self._session: _Session | None = None  # the welcomed connection, if any
        self._target_up_due = False  # the probe saw the target back; TARGET_UP not sent yet

    async def run(self) -> None:
        """Serve until cancelled. Raises ``Refused`` when the server refuses this agent."""
        self.local = LocalClient(self.config.target, self.config.forward_tls)
        try:
            async with client_session(self.config) as self.client:
                delays = backoff()
                while True:
                    served = await self._connect_once()
                    if served:
                        delays = backoff()  # it worked for a while: start over from short delays
                    delay = next(delays)
                    log.info("reconnecting in %.1fs", delay)
                    self.on_offline(self.offline_reason, delay)
                    await asyncio.sleep(delay)
        finally:
            await self.local.close()
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
        url = self.config.agent_url
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                ws = await connect(
                    url,
                    ssl=self.config.tls if url.startswith("wss://") else None,
                    additional_headers=headers,
                    max_size=MAX_FRAME_SIZE,
                    ping_interval=None,  # the protocol's own PING frames are the heartbeat
                    compression=None,
                    user_agent_header=AGENT_NAME,
                    open_timeout=None,
                )
        except InvalidStatus as exc:
            self._offline(f"server answered the upgrade with HTTP {exc.response.status_code}")
            return False
        except (OSError, TimeoutError, InvalidHandshake, socket.gaierror) as unreachable:
            parts = urlsplit(url)
            problem = certificate_problem(unreachable, parts.hostname or url)
            if problem is None and isinstance(unreachable, InvalidMessage) and parts.scheme == "ws":
                # Not HTTP on an http:// URL: an HTTPS server (--tls-cert, a proxy's 443)?
                port = parts.port or 80
                if await speaks_tls(parts.hostname or "", port):
                    problem = CertificateRefused(
                        f"{parts.hostname}:{port} speaks TLS: the server URL must be https://"
                    )
            if problem is not None:
                raise problem from unreachable  # configuration, not the network: never retried
            self._offline(
                f"cannot connect to {self.config.server}: {str(unreachable) or type(unreachable).__name__}"
            )
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
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            reason = closed.rcvd.reason if closed.rcvd else None
        except (ProtocolError, TimeoutError, OSError) as lost:
            self._offline(f"connection failed: {str(lost) or type(lost).__name__}")
            await ws.close(CLOSE_PROTOCOL_ERROR if isinstance(lost, ProtocolError) else CLOSE_NORMAL)
            return welcomed
        finally:
            self._session = None
            for stream in list(session.streams.values()):
                stream.kill()
        if not should_retry(code):
            raise Refused(code or 0, reason or "refused")
        if session.gave_up is not None:  # this side dropped it, and has said why
            self.offline_reason = session.gave_up
        elif code in (None, CloseCode.ABNORMAL_CLOSURE):  # RFC 6455 7.1.5: no close frame
            self._offline("lost the connection to the server (it ended without a close frame)")
        else:
            self._offline(f"disconnected from the server ({code} {reason or 'no reason given'})")
        return welcomed

    def _offline(self, reason: str) -> None:
        """Say why the connection failed or ended (on stderr, and to ``on_offline`` next)."""
        log.warning("%s", reason)
        self.offline_reason = reason
