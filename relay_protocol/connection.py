"""One side of an agent connection, without I/O: stream states and credit.

Feed every received websocket message to ``receive``; pass every frame you
want to send through ``send`` and write the bytes it returns. The object keeps
the stream state machines and the flow-control windows, and raises as soon as
either side breaks the rules: ``ProtocolError`` for the peer's faults,
``LocalProtocolError`` for the caller's.

Flow control: each direction of each stream starts with ``INITIAL_WINDOW``
bytes of credit. ``send`` refuses DATA beyond ``credit(stream_id)``; the
receiver grants more with WINDOW frames, which ``consumed`` produces once the
application has taken at least half a window of body bytes off its hands.

Every call checks, then encodes, then changes state: a call that raises
leaves the connection as it was (a head too large for the wire spends no
stream id), or, after a failure it cannot undo, in the error state, where
every later call raises ``ConnectionFailed`` (as h11 does). A refused
received frame (``ProtocolError``) changes nothing either; the engine then
puts the connection in the error state, as nothing more may be read or sent.

``relay_protocol.engine.Engine`` wraps this with the outgoing buffer, PING
answers, the heartbeat and body chunking; server and agent use the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import (
    ConnectionFailed,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    TooManyStreams,
)
from .frames import (
    AGENT_FRAMES,
    SERVER_FRAMES,
    Data,
    Frame,
    Hello,
    Open,
    Reset,
    Response,
    Welcome,
    Window,
    decode,
    encode,
)
from .limits import (
    FAST_GRANT_INTERVAL,
    INITIAL_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MAX_WINDOW_GROWTH,
)


class Role(enum.Enum):
    SERVER = "server"
    AGENT = "agent"


class Half(enum.Enum):
    """State of one direction of a stream."""

    IDLE = "idle"  # no head yet
    BODY = "body"  # head sent or received, body may follow
    CLOSED = "closed"  # END_STREAM seen

    # A member is equal to itself only: identity's hash, in C (Enum's own hashes the
    # name in Python, and the state machine looks members up for every frame).
    __hash__ = object.__hash__


class Step(enum.Enum):
    HEAD = "head"
    DATA = "data"
    END = "end"

    __hash__ = object.__hash__


#: The state machine of one half-stream, as data: (state, step) -> next state.
#: Any pair missing here is illegal.
TRANSITIONS: dict[tuple[Half, Step], Half] = {
    (Half.IDLE, Step.HEAD): Half.BODY,
    (Half.BODY, Step.DATA): Half.BODY,
    (Half.BODY, Step.END): Half.CLOSED,
}


@dataclass
class _Stream:
    send: Half = Half.IDLE
    recv: Half = Half.IDLE
    send_credit: int = INITIAL_WINDOW
    recv_window: int = INITIAL_WINDOW  # what the peer may still send
    unacked: int = 0  # consumed by the application, not yet granted back
    window: int = INITIAL_WINDOW  # the credit this side grants: grows while the stream is fast
    granted_at: float | None = None  # when the last WINDOW was granted (the caller's clock)


def _steps(kind: type[Frame], end_stream: bool) -> tuple[Step, ...]:
    first = Step.DATA if kind is Data else Step.HEAD
    return (first, Step.END) if end_stream else (first,)


def _walk(half: Half, steps: tuple[Step, ...]) -> Half | Step:
    """Where ``steps`` take ``half``: the state reached, or the first illegal step."""
    for step in steps:
        nxt = TRANSITIONS.get((half, step))
        if nxt is None:
            return step
        half = nxt
    return half


#: ``TRANSITIONS`` walked ahead of time for every frame that moves a half-stream:
#: (state, frame type, END_STREAM) -> the state reached, or the step that is illegal.
_MOVES: dict[tuple[Half, type[Frame], bool], Half | Step] = {
    (half, kind, end): _walk(half, _steps(kind, end))
    for half in Half
    for kind in (Open, Response, Data)
    for end in (False, True)
}


class Connection:
    """Protocol state of one agent connection, seen from ``role``."""

    def __init__(self, role: Role, *, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.role = role
        self.max_streams = max_streams
        self._streams: dict[int, _Stream] = {}
        self._growth = 0  # credit granted beyond INITIAL_WINDOW, all open streams together
        self._last_stream_id = 0  # highest stream id opened so far (by the server)
        self._hello_seen = False  # HELLO sent or received: at most one per connection
        self._handshaken = False  # WELCOME sent or received: no handshake frame after it
        self._may_receive = AGENT_FRAMES if role is Role.SERVER else SERVER_FRAMES
        self._may_send = SERVER_FRAMES if role is Role.SERVER else AGENT_FRAMES
        #: Why the connection is in its error state; None while it is usable.
        self.error: str | None = None

    # -- the error state -------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Enter the error state (the transport failed, a send could not complete):
        every later call raises ``ConnectionFailed``. The first reason is kept."""
        if self.error is None:
            self.error = reason

    def _check_usable(self) -> None:
        if self.error is not None:
            raise ConnectionFailed(f"connection failed: {self.error}")

    # -- queries -------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def credit(self, stream_id: int) -> int:
        """Bytes of DATA this side may send on ``stream_id`` right now (0 if closed)."""
        stream = self._streams.get(stream_id)
        return stream.send_credit if stream and stream.send is Half.BODY else 0

    def is_open(self, stream_id: int) -> bool:
        """True until the stream is finished (both halves closed) or reset, here or by the peer."""
        return stream_id in self._streams

    def send_half(self, stream_id: int) -> Half | None:
        """State of this side's sending half of ``stream_id``; None if the stream is not open."""
        stream = self._streams.get(stream_id)
        return stream.send if stream else None

    def next_stream_id(self) -> int:
        """The id the next OPEN must carry (server side)."""
        return self._last_stream_id + 1

    # -- sending -------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Check that sending ``frame`` is legal now, encode it, update state, return its bytes.

        Raises ``LocalProtocolError`` if it is not legal (``TooManyStreams``,
        ``BadHead``/``HeadTooLarge`` for a head the wire cannot carry,
        ``ConnectionFailed`` in the error state), having changed nothing.
        """
        self._check_usable()
        if not isinstance(frame, self._may_send):
            raise LocalProtocolError(f"a {self.role.value} never sends {type(frame).__name__}")
        if isinstance(frame, (Response, Data)):  # the most frequent first
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                raise LocalProtocolError(f"stream {frame.stream_id} is not open")
            size = len(frame.data) if isinstance(frame, Data) else len(frame.body)
            if size > stream.send_credit:
                raise LocalProtocolError(f"{size} bytes over the credit of {stream.send_credit}")
            nxt = _next_half(stream.send, frame, LocalProtocolError)
            data = encode(frame)
            stream.send_credit -= size
            stream.send = nxt
            self._forget_if_done(frame.stream_id, stream)
            return data
        if isinstance(frame, (Hello, Welcome)):
            if self._handshaken or (isinstance(frame, Hello) and self._hello_seen):
                raise LocalProtocolError("handshake already done")
            data = encode(frame)
            if isinstance(frame, Hello):
                self._hello_seen = True
            else:
                self._handshaken = True
            return data
        if isinstance(frame, Open):
            if len(self._streams) >= self.max_streams:
                raise TooManyStreams(f"{len(self._streams)} streams open, limit {self.max_streams}")
            if frame.stream_id != self._last_stream_id + 1 or frame.stream_id > MAX_STREAM_ID:
                raise LocalProtocolError(f"OPEN must use stream id {self._last_stream_id + 1}")
            if len(frame.body) > INITIAL_WINDOW:
                raise LocalProtocolError(f"{len(frame.body)} bytes over the credit of {INITIAL_WINDOW}")
            nxt = _next_half(Half.IDLE, frame, LocalProtocolError)
            data = encode(frame)  # before any change: a head too large spends no id
            self._opened(frame.stream_id, nxt, sending=True).send_credit -= len(frame.body)
            return data
        data = encode(frame)
        if isinstance(frame, Reset):
            self._drop(frame.stream_id)
        return data

    def _opened(self, stream_id: int, half: Half, *, sending: bool) -> _Stream:
        stream = _Stream(send=half) if sending else _Stream(recv=half)
        self._streams[stream_id] = stream
        self._last_stream_id = stream_id
        return stream

    def consumed(self, stream_id: int, size: int, now: float = 0.0) -> bytes | None:
        """Tell the connection the application has taken ``size`` body bytes at ``now``
        (the caller's clock, seconds).

        Returns a WINDOW frame to send once half the stream's window is owed, else None.
        Call it after the bytes left this process (written to the client or the
        target), so a slow reader slows the sender. A stream whose half window was
        taken again within ``FAST_GRANT_INTERVAL`` gets its window doubled, up to
        ``MAX_WINDOW`` and within the connection's ``MAX_WINDOW_GROWTH``. Raises
        ``ConnectionFailed`` in the error state.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.recv is not Half.BODY or size <= 0:
            return None
        stream.unacked += size
        if stream.unacked < stream.window // 2:
            return None
        grow = 0
        fast = stream.granted_at is not None and now - stream.granted_at < FAST_GRANT_INTERVAL
        if fast and stream.window < MAX_WINDOW and self._growth + stream.window <= MAX_WINDOW_GROWTH:
            grow = stream.window
            stream.window += grow
            self._growth += grow
        increment, stream.unacked = stream.unacked + grow, 0
        stream.granted_at = now
        stream.recv_window += increment
        return encode(Window(stream_id, increment))

    def _drop(self, stream_id: int) -> None:
        """Forget a stream; its window's growth goes back to the connection."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._growth -= stream.window - INITIAL_WINDOW

    # -- receiving -----------------------------------------------------------

    def receive(self, message: bytes) -> Frame | None:
        """Decode and check one received message.

        Returns the frame, or None for a frame that needs no action (a late
        frame on a stream this side already reset). Raises ``ProtocolError``
        having changed nothing (the caller closes the connection with 1002;
        ``Engine.receive`` enters the error state first);
        ``ConnectionFailed`` in the error state.
        """
        self._check_usable()
        return self._receive(message)

    def _receive(self, message: bytes) -> Frame | None:
        frame = decode(message)
        if not isinstance(frame, self._may_receive):
            raise ProtocolError(f"a {self.role.value} never receives {type(frame).__name__}")
        if isinstance(frame, (Data, Response, Window, Reset)):  # the most frequent first
            return self._on_stream(frame)
        if isinstance(frame, Open):
            if frame.stream_id != self._last_stream_id + 1:
                expected = self._last_stream_id + 1
                raise ProtocolError(f"OPEN on stream {frame.stream_id}, expected {expected}")
            if len(self._streams) >= self.max_streams:
                raise ProtocolError(f"peer opened more than {self.max_streams} streams")
            half = _next_half(Half.IDLE, frame, ProtocolError)
            if len(frame.body) > INITIAL_WINDOW:  # the frame's size keeps it far below
                raise FlowControlError(f"peer overran the window of stream {frame.stream_id}")
            self._opened(frame.stream_id, half, sending=False).recv_window -= len(frame.body)
            return frame
        if isinstance(frame, (Hello, Welcome)):
            if self._handshaken or (isinstance(frame, Hello) and self._hello_seen):
                raise ProtocolError("second handshake frame")
            if isinstance(frame, Hello):
                self._hello_seen = True
            else:
                self._handshaken = True
        return frame  # HELLO, WELCOME, PING, PONG, TARGET_UP

    def _on_stream(self, frame: Data | Response | Window | Reset) -> Frame | None:
        """A received frame on an open (or already forgotten) stream, checked and taken."""
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ProtocolError(f"{type(frame).__name__} on stream {stream_id} never opened")
            return None  # the stream ended or was reset here; the peer had not seen it yet
        if isinstance(frame, Reset):
            self._drop(stream_id)
            return frame
        if isinstance(frame, Window):
            if stream.send_credit + frame.increment > 2**31 - 1:
                raise FlowControlError(f"credit on stream {stream_id} overflows")
            stream.send_credit += frame.increment
            return frame
        nxt = _next_half(stream.recv, frame, ProtocolError)
        size = len(frame.data) if isinstance(frame, Data) else len(frame.body)
        if size > stream.recv_window:
            raise FlowControlError(f"peer overran the window of stream {frame.stream_id}")
        stream.recv_window -= size
        stream.recv = nxt
        self._forget_if_done(stream_id, stream)
        return frame

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.send is Half.CLOSED and stream.recv is Half.CLOSED:
            self._drop(stream_id)


def _next_half(
    half: Half, frame: Open | Response | Data, error: type[LocalProtocolError] | type[ProtocolError]
) -> Half:
    """The state ``half`` moves to when ``frame`` is sent or received; raises ``error`` if illegal."""
    moved = _MOVES[half, type(frame), frame.end_stream]
    if isinstance(moved, Step):
        verb = "cannot send" if error is LocalProtocolError else "unexpected"
        # Only a frame's first step can be illegal: END follows HEAD or DATA legally.
        raise error(f"{verb} {moved.value} on stream {frame.stream_id} in state {half.value}")
    return moved
