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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import FlowControlError, LocalProtocolError, ProtocolError, TooManyStreams
from .frames import (
    AGENT_FRAMES,
    SERVER_FRAMES,
    Data,
    Frame,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    Response,
    TargetUp,
    Welcome,
    Window,
    decode,
    encode,
)
from .limits import INITIAL_WINDOW, MAX_CONCURRENT_STREAMS, MAX_STREAM_ID


class Role(enum.Enum):
    SERVER = "server"
    AGENT = "agent"


class Half(enum.Enum):
    """State of one direction of a stream."""

    IDLE = "idle"  # no head yet
    BODY = "body"  # head sent or received, body may follow
    CLOSED = "closed"  # END_STREAM seen


class Step(enum.Enum):
    HEAD = "head"
    DATA = "data"
    END = "end"


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


def _steps(frame: Frame) -> list[Step]:
    if isinstance(frame, (Open, Response)):
        return [Step.HEAD, Step.END] if frame.end_stream else [Step.HEAD]
    assert isinstance(frame, Data)
    return [Step.DATA, Step.END] if frame.end_stream else [Step.DATA]


class Connection:
    """Protocol state of one agent connection, seen from ``role``."""

    def __init__(self, role: Role, *, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.role = role
        self.max_streams = max_streams
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0  # highest stream id opened so far (by the server)
        self._hello_seen = False  # HELLO sent or received: at most one per connection
        self._handshaken = False  # WELCOME sent or received: no handshake frame after it
        self._may_receive = AGENT_FRAMES if role is Role.SERVER else SERVER_FRAMES
        self._may_send = SERVER_FRAMES if role is Role.SERVER else AGENT_FRAMES

    # -- queries -------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def credit(self, stream_id: int) -> int:
        """Bytes of DATA this side may send on ``stream_id`` right now (0 if closed)."""
        stream = self._streams.get(stream_id)
        return stream.send_credit if stream and stream.send is Half.BODY else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def next_stream_id(self) -> int:
        """The id the next OPEN must carry (server side)."""
        return self._last_stream_id + 1

    # -- sending -------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Check that sending ``frame`` is legal now, update state, return its bytes.

        Raises ``LocalProtocolError`` (or ``TooManyStreams``) if it is not.
        """
        if not isinstance(frame, self._may_send):
            raise LocalProtocolError(f"a {self.role.value} never sends {type(frame).__name__}")
        if isinstance(frame, (Hello, Welcome)):
            if self._handshaken or (isinstance(frame, Hello) and self._hello_seen):
                raise LocalProtocolError("handshake already done")
            if isinstance(frame, Hello):
                self._hello_seen = True
            else:
                self._handshaken = True
        elif isinstance(frame, Open):
            if len(self._streams) >= self.max_streams:
                raise TooManyStreams(f"{len(self._streams)} streams open, limit {self.max_streams}")
            if frame.stream_id != self._last_stream_id + 1 or frame.stream_id > MAX_STREAM_ID:
                raise LocalProtocolError(f"OPEN must use stream id {self._last_stream_id + 1}")
            self._last_stream_id = frame.stream_id
            self._streams[frame.stream_id] = _Stream()
            self._advance_send(frame)
        elif isinstance(frame, (Response, Data)):
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                raise LocalProtocolError(f"stream {frame.stream_id} is not open")
            if isinstance(frame, Data) and len(frame.data) > stream.send_credit:
                raise LocalProtocolError(f"{len(frame.data)} bytes over the credit of {stream.send_credit}")
            self._advance_send(frame)
        elif isinstance(frame, Reset):
            self._streams.pop(frame.stream_id, None)
        return encode(frame)

    def _advance_send(self, frame: Open | Response | Data) -> None:
        stream = self._streams[frame.stream_id]
        for step in _steps(frame):
            nxt = TRANSITIONS.get((stream.send, step))
            if nxt is None:
                raise LocalProtocolError(
                    f"cannot send {step.value} on stream {frame.stream_id} in state {stream.send.value}"
                )
            stream.send = nxt
        if isinstance(frame, Data):
            stream.send_credit -= len(frame.data)
        self._forget_if_done(frame.stream_id, stream)

    def consumed(self, stream_id: int, size: int) -> bytes | None:
        """Tell the connection the application has taken ``size`` body bytes.

        Returns a WINDOW frame to send once half a window is owed, else None.
        Call it after the bytes left this process (written to the client or
        the target), so a slow reader slows the sender.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.recv is not Half.BODY or size <= 0:
            return None
        stream.unacked += size
        if stream.unacked < INITIAL_WINDOW // 2:
            return None
        increment, stream.unacked = stream.unacked, 0
        stream.recv_window += increment
        return encode(Window(stream_id, increment))

    # -- receiving -----------------------------------------------------------

    def receive(self, message: bytes) -> Frame | None:
        """Decode and check one received message.

        Returns the frame, or None for a frame that needs no action (a late
        frame on a stream this side already reset). Raises ``ProtocolError``.
        """
        frame = decode(message)
        if not isinstance(frame, self._may_receive):
            raise ProtocolError(f"a {self.role.value} never receives {type(frame).__name__}")
        if isinstance(frame, (Hello, Welcome)):
            if self._handshaken or (isinstance(frame, Hello) and self._hello_seen):
                raise ProtocolError("second handshake frame")
            if isinstance(frame, Hello):
                self._hello_seen = True
            else:
                self._handshaken = True
            return frame
        if isinstance(frame, (Ping, Pong, TargetUp)):
            return frame
        if isinstance(frame, Open):
            if frame.stream_id != self._last_stream_id + 1:
                expected = self._last_stream_id + 1
                raise ProtocolError(f"OPEN on stream {frame.stream_id}, expected {expected}")
            if len(self._streams) >= self.max_streams:
                raise ProtocolError(f"peer opened more than {self.max_streams} streams")
            self._last_stream_id = frame.stream_id
            self._streams[frame.stream_id] = _Stream()
            return self._advance_recv(frame)
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ProtocolError(f"{type(frame).__name__} on stream {stream_id} never opened")
            return None  # the stream ended or was reset here; the peer had not seen it yet
        if isinstance(frame, Reset):
            del self._streams[stream_id]
            return frame
        if isinstance(frame, Window):
            stream.send_credit += frame.increment
            if stream.send_credit > 2**31 - 1:
                raise FlowControlError(f"credit on stream {stream_id} overflows")
            return frame
        return self._advance_recv(frame)

    def _advance_recv(self, frame: Open | Response | Data) -> Frame:
        stream = self._streams[frame.stream_id]
        for step in _steps(frame):
            nxt = TRANSITIONS.get((stream.recv, step))
            if nxt is None:
                raise ProtocolError(
                    f"unexpected {step.value} on stream {frame.stream_id} in state {stream.recv.value}"
                )
            stream.recv = nxt
        if isinstance(frame, Data):
            stream.recv_window -= len(frame.data)
            if stream.recv_window < 0:
                raise FlowControlError(f"peer overran the window of stream {frame.stream_id}")
        self._forget_if_done(frame.stream_id, stream)
        return frame

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.send is Half.CLOSED and stream.recv is Half.CLOSED:
            del self._streams[stream_id]
