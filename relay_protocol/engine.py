"""The stream engine: everything about one agent connection that is not I/O.

As websockets' protocol object does, ``Engine`` takes bytes in and gives bytes
out, and owns the rules in between, once, for both sides:

- stream ids, states and credit (its ``Connection``);
- cutting a body into DATA frames within the credit, ``MAX_DATA_SIZE`` and the
  room left in the outgoing buffer (``send_data``);
- the outgoing buffer itself: encoded frames, oldest first, with their byte
  count and the time the oldest was queued; with ``batching`` on (both peers
  listed the ``"batch"`` feature), ``outgoing`` hands over every frame that fits
  in one BATCH message, so what a pass of the event loop queued leaves in one
  websocket message and one write, or a burst in messages of ``EARLY_SEND_FRAMES``
  as it is queued (``send_due``);
- answering PING with PONG, with at most one PONG owed (a peer that pings
  faster than it reads cannot grow this side's memory);
- the heartbeat: when to PING, when the peer is dead (silent, or not reading);
- the error state: after ``fail`` (the transport failed, a send could not
  complete) or the peer's ``ProtocolError`` every call raises
  ``ConnectionFailed`` and nothing more is handed out to send.

The shell around it (``relay_server/session.py``, ``relay_agent/tunnel.py``)
is a read loop that calls ``receive``, one writer task that sends ``outgoing()``
and calls ``sent()``, each send bounded by ``SEND_TIMEOUT``, a task that calls
``heartbeat`` when told to, and asyncio events to wait for credit (a WINDOW
returned by ``receive``) and for room (``has_room``). The caller passes the
clock (``now``) to every call that queues or receives: this module reads no
clock and never awaits.

Calls that fail leave the engine as it was: ``open`` with a head too large for
the wire raises ``HeadTooLarge`` before a stream id is spent.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

from .connection import Connection, Half, Role
from .errors import BodyDoesNotFit, ConnectionFailed, LocalProtocolError, ProtocolError, StreamClosed
from .frames import (
    TYPE_CODES,
    Data,
    Frame,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    Response,
    Welcome,
    batch_size,
    encode_batch,
    is_batch,
    iter_batch,
)
from .heads import RequestHead, ResponseHead
from .heartbeat import Beat, Heartbeat
from .limits import (
    HEARTBEAT_INTERVAL,
    MAX_CONCURRENT_STREAMS,
    MAX_DATA_SIZE,
    MAX_FRAME_SIZE,
    SEND_HIGH_WATER,
    SEND_TIMEOUT,
)

_PONG = TYPE_CODES[Pong]

#: Frames waiting that make a message worth sending at once (``send_due``), before the
#: pass of the event loop that queued them ends. A burst of requests (16 at once from
#: 16 senders) is otherwise all handled before the first of them leaves, and the peer
#: waits the while: the two processes took turns, on two cores, for 1.3-1.4 of them
#: busy. Sent in fours they work at once (1.8-1.9 cores busy; 29 % and 79 % more requests
#: per second at 16 and 64 senders, medians of three rounds; anything from 2 to 12 did as
#: well: docs/performance.md, "Taking turns"). A lone request is not held.
EARLY_SEND_FRAMES = 4


class Engine:
    """One side (``role``) of one agent connection, without I/O. ``now``: the caller's
    clock. ``heartbeat_interval``: seconds between PINGs; the peer is dead after
    ``silence_timeout`` seconds (three intervals) without a frame from it, or when a
    frame has waited ``SEND_TIMEOUT`` to be sent (``heartbeat.Heartbeat``)."""

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        max_streams: int = MAX_CONCURRENT_STREAMS,
        high_water: int = SEND_HIGH_WATER,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.role = role
        self.high_water = high_water
        self._conn = Connection(role, max_streams=max_streams)
        self._heartbeat = Heartbeat(now, heartbeat_interval)
        # Encoded frames not yet taken by the transport, and when each was queued.
        self._frames: collections.deque[tuple[bytes, float]] = collections.deque()
        #: Hand several frames over as one BATCH message: set once both peers listed
        #: the ``"batch"`` feature in the handshake.
        self.batching = False
        #: Send a body with its head in one frame (``open``, ``respond``): set once the
        #: peer listed the ``"inline-body"`` feature in the handshake.
        self.inline_bodies = False
        # What ``outgoing`` handed over and ``sent`` has not confirmed: the message,
        # and how many frames of the buffer's head it carries.
        self._out: bytes | None = None
        self._out_count = 0
        #: Bytes of the frames in the outgoing buffer.
        self.buffered = 0
        self._pong_owed = False  # a PONG waits in the buffer: a new PING is not answered
        # The first frame received must be the handshake: HELLO on the server, WELCOME on the agent.
        self._greeted = False
        self._greeting: type[Frame] = Hello if role is Role.SERVER else Welcome

    # -- state -----------------------------------------------------------------

    @property
    def silence_timeout(self) -> float:
        """Seconds of silence from the peer that end the connection (``HEARTBEAT_TIMEOUT``
        at the default interval), counted while nothing of ours waits to be sent."""
        return self._heartbeat.silence_timeout

    @property
    def error(self) -> str | None:
        """Why the engine is in its error state; None while it is usable."""
        return self._conn.error

    def fail(self, reason: str) -> None:
        """Enter the error state: the transport failed, a send could not complete,
        or the connection is being closed. The outgoing buffer is dropped (nothing
        more will be sent) and every later call raises ``ConnectionFailed``."""
        self._conn.fail(reason)
        self._frames.clear()
        self._out, self._out_count = None, 0
        self.buffered = 0
        self._pong_owed = False

    @property
    def open_streams(self) -> int:
        return self._conn.open_streams

    def is_open(self, stream_id: int) -> bool:
        """True until the stream is finished or reset (here or by the peer)."""
        return self._conn.error is None and self._conn.is_open(stream_id)

    def credit(self, stream_id: int) -> int:
        return self._conn.credit(stream_id)

    # -- the outgoing buffer -----------------------------------------------------

    @property
    def has_room(self) -> bool:
        """True while OPEN, RESPONSE and DATA may be queued: fewer than
        ``high_water`` bytes wait. Control frames never wait for room."""
        return self.buffered < self.high_water

    @property
    def send_due(self) -> bool:
        """True when ``EARLY_SEND_FRAMES`` frames wait and no message is out: the shell
        may send ``outgoing()`` now, where its transport takes it without waiting,
        rather than leave it to its writer's next turn."""
        return self._out is None and len(self._frames) >= EARLY_SEND_FRAMES

    def outgoing(self) -> bytes | None:
        """The next websocket message to send, or None: the oldest frame, or with
        ``batching`` a BATCH of the oldest frames that fit in ``MAX_FRAME_SIZE``. It
        stays queued (and counts as waiting, for the heartbeat) until ``sent``; until
        then every call returns the same message."""
        if self._out is not None:
            return self._out
        if not self._frames:
            return None
        first = self._frames[0][0]
        count, size = 1, len(first)
        if self.batching:
            for data, _ in itertools.islice(self._frames, 1, None):
                if batch_size(size + len(data), count + 1) > MAX_FRAME_SIZE:
                    break
                count += 1
                size += len(data)
        if count == 1:
            self._out = first
        else:
            self._out = encode_batch([data for data, _ in itertools.islice(self._frames, count)])
        self._out_count = count
        return self._out

    def sent(self) -> None:
        """The message ``outgoing`` returned left: the transport took it."""
        count, self._out, self._out_count = self._out_count or 1, None, 0
        for _ in range(min(count, len(self._frames))):  # fewer: dropped by ``fail`` meanwhile
            data, _ = self._frames.popleft()
            self.buffered -= len(data)
            if data[0] == _PONG:
                self._pong_owed = False

    def oldest_queued(self) -> float | None:
        """When the oldest frame not yet taken by the transport was queued; None if none waits."""
        return self._frames[0][1] if self._frames else None

    def _queue(self, data: bytes, now: float) -> None:
        self._frames.append((data, now))
        self.buffered += len(data)

    # -- receiving ---------------------------------------------------------------

    def receive_all(self, message: bytes, now: float) -> list[Frame]:
        """Take one received websocket message, a frame or a BATCH of frames; returns
        the frames the caller acts on, in order (see ``receive``). Raises as ``receive``
        and ``parts``; the frames of a BATCH before the faulty one have then been taken
        (the connection is closed anyway)."""
        return [frame for data in self.parts(message) if (frame := self.receive(data, now)) is not None]

    def parts(self, message: bytes) -> Iterator[bytes]:
        """The frames one received websocket message carries, still encoded, for
        ``receive`` one at a time: the message itself, or a BATCH's frames (taken only
        after the handshake), cut out one by one so that a reader may pause between
        them. Raises ``ProtocolError`` when the iteration reaches a fault of the BATCH
        (the engine is then in its error state)."""
        if not is_batch(message):
            yield message
            return
        try:
            if not self._greeted:
                raise ProtocolError(f"expected {self._greeting.__name__.upper()}, got a BATCH")
            yield from iter_batch(message)
        except ProtocolError as exc:
            self.fail(f"protocol error: {exc}")
            raise

    def receive(self, message: bytes, now: float) -> Frame | None:
        """Take one received websocket message.

        Returns the frame the caller acts on (HELLO, WELCOME, OPEN, RESPONSE,
        DATA, WINDOW: credit grew, RESET, TARGET_UP), or None when nothing is
        left to do: a late frame, a PONG, or a PING (answered here, once at a
        time). The first frame must be the peer's handshake (HELLO to a server,
        WELCOME to an agent). Raises ``ProtocolError`` (the engine is then in
        its error state: close with 1002) or ``ConnectionFailed``.
        """
        self._heartbeat.seen(now)
        try:
            frame = self._conn.receive(message)
            if not self._greeted:
                if not isinstance(frame, self._greeting):
                    name = type(frame).__name__ if frame is not None else "a late frame"
                    raise ProtocolError(f"expected {self._greeting.__name__.upper()}, got {name}")
                self._greeted = True
        except ProtocolError as exc:
            self.fail(f"protocol error: {exc}")
            raise
        if isinstance(frame, Ping):
            if not self._pong_owed:
                self._queue(self._conn.send(Pong(frame.payload)), now)
                self._pong_owed = True
            return None
        if isinstance(frame, Pong):
            return None
        return frame

    # -- sending -----------------------------------------------------------------

    def send(self, frame: Frame, now: float) -> None:
        """Queue a frame that needs no stream logic: HELLO, WELCOME, TARGET_UP, PING.

        Raises ``LocalProtocolError`` (``ConnectionFailed`` in the error state).
        """
        self._queue(self._conn.send(frame), now)

    def open(self, head: RequestHead, end_stream: bool, now: float, body: bytes = b"") -> int:
        """Queue an OPEN for ``head`` on the next stream id, and return that id (server).

        ``body``: the request body's first bytes, at most ``MAX_DATA_SIZE``, all queued
        now: inside the OPEN when the peer reads such frames (``inline_bodies``) and
        head and body fit one frame, else in a DATA frame right behind it. END_STREAM
        (``end_stream``) goes with the body's last byte.

        Raises ``HeadTooLarge`` if the head cannot be encoded, ``TooManyStreams``
        at the limit, ``ConnectionFailed`` in the error state, ``LocalProtocolError``
        for a body over ``MAX_DATA_SIZE``; then no id is spent.
        Does not look at ``has_room``: the caller waits for room first.
        """
        self._check_body(body)
        stream_id = self._conn.next_stream_id()
        self._send_head(Open(stream_id, head, end_stream, body), now)
        return stream_id

    def respond(
        self, stream_id: int, head: ResponseHead, end_stream: bool, now: float, body: bytes = b""
    ) -> None:
        """Queue the RESPONSE head of a stream (agent), with ``body`` as in ``open``.
        Raises ``StreamClosed`` if the stream is finished or reset, ``HeadTooLarge``,
        ``ConnectionFailed``, ``LocalProtocolError`` (a body over ``MAX_DATA_SIZE``)."""
        self._check_body(body)
        self._sending(stream_id, Half.IDLE)
        self._send_head(Response(stream_id, head, end_stream, body), now)

    @staticmethod
    def _check_body(body: bytes) -> None:
        if len(body) > MAX_DATA_SIZE:
            raise LocalProtocolError(f"{len(body)} body bytes with a head, over {MAX_DATA_SIZE}")

    def _send_head(self, frame: Open | Response, now: float) -> None:
        """Queue a head frame and its body: in one frame, or in two if the peer does not
        read bodies in heads or they do not fit one (a head never spends credit the body
        needs: each half starts with ``INITIAL_WINDOW``, over ``MAX_DATA_SIZE``)."""
        body, end_stream = frame.body, frame.end_stream
        if body:
            if self.inline_bodies:
                try:
                    self._queue(self._conn.send(frame), now)
                    return
                except BodyDoesNotFit:
                    pass
            frame = (
                Open(frame.stream_id, frame.head)
                if isinstance(frame, Open)
                else Response(frame.stream_id, frame.head)
            )
        self._queue(self._conn.send(frame), now)
        if body:
            self._queue(self._conn.send(Data(frame.stream_id, body, end_stream)), now)

    def send_data(self, stream_id: int, data: bytes | memoryview, end: bool, now: float) -> int:
        """Queue as much of ``data`` as may go now; return how many bytes were taken.

        Bytes go in DATA frames of at most ``MAX_DATA_SIZE``, within the stream's
        credit, while the buffer has room. END_STREAM rides on the frame that
        takes the last byte; an empty ``data`` with ``end`` queues an empty DATA
        with END_STREAM, which needs neither credit nor room. So END_STREAM was
        sent exactly when ``end`` and the whole of ``data`` was taken.

        Taking less than all: wait for credit (a WINDOW from ``receive``) if the
        stream has none, else for room (unless a message left meanwhile and made
        some), and call again with the rest.
        Raises ``StreamClosed`` if the stream is finished or reset,
        ``LocalProtocolError`` if its sending half is not in its body,
        ``ConnectionFailed`` in the error state.
        """
        self._sending(stream_id, Half.BODY)
        size = len(data)
        taken = 0
        while True:
            n = min(size - taken, self._conn.credit(stream_id), MAX_DATA_SIZE)
            last = end and taken + n == size
            if (n == 0 and not last) or (n and self.buffered >= self.high_water):
                return taken
            # The common case, the whole chunk in one frame, costs no copy.
            piece = data if n == size and isinstance(data, bytes) else bytes(data[taken : taken + n])
            self._queue(self._conn.send(Data(stream_id, piece, last)), now)
            taken += n
            if taken == size:
                return taken

    def consumed(self, stream_id: int, size: int, now: float) -> None:
        """The application took ``size`` body bytes of ``stream_id`` off our hands
        (wrote them to the public client or the target): queue a WINDOW once half
        a window is owed. Does nothing in the error state."""
        if self._conn.error is not None:
            return
        window = self._conn.consumed(stream_id, size, now)
        if window is not None:
            self._queue(window, now)

    def reset(self, stream_id: int, code: int, reason: str, now: float) -> bool:
        """Queue a RESET if the stream is still open; True if one was queued.

        Never raises: a stream already finished or reset, or a connection in
        its error state, needs no RESET.
        """
        if not self.is_open(stream_id):
            return False
        self._queue(self._conn.send(Reset(stream_id, code, reason)), now)
        return True

    def _sending(self, stream_id: int, want: Half) -> None:
        """Raise unless this side's half of ``stream_id`` is in state ``want``."""
        half = self._conn.send_half(stream_id)
        if half is want and self._conn.error is None:
            return
        if self._conn.error is not None:
            raise ConnectionFailed(f"connection failed: {self._conn.error}")
        if half is None:
            raise StreamClosed(f"stream {stream_id} is finished or reset")
        raise LocalProtocolError(f"stream {stream_id}: cannot send in state {half.value}")

    # -- the heartbeat -----------------------------------------------------------

    def heartbeat(self, now: float) -> Beat:
        """What to do at ``now``; call again after ``Beat.wait`` seconds.

        Queues a PING when one is due (never while a frame waits to be sent).
        On ``Beat.dead`` the engine enters its error state: close the
        connection (abort the transport if ``Beat.stuck``: the peer does not
        read, so a close handshake could not complete).
        """
        if self._conn.error is not None:
            return Beat(dead=True, ping=False, wait=0.0)
        beat = self._heartbeat.check(now, self.oldest_queued())
        if beat.stuck:
            self.fail(f"a frame waited {SEND_TIMEOUT:g}s to be sent: the peer does not read")
        elif beat.dead:
            self.fail("heartbeat timeout: nothing received")
        elif beat.ping:
            self._queue(self._conn.send(Ping(b"")), now)
        return beat
