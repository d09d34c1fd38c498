"""Frames: the messages of the wire protocol, and their encoding.

One binary websocket message carries one frame::

    +--------+--------+----------------------------+-----------------+
    | type   | flags  | stream id (u32, big end.)  | payload ...     |
    +--------+--------+----------------------------+-----------------+

or, between peers that both list the ``"batch"`` feature, a BATCH: several frames
in one message (type 0x0B, flags 0, stream 0, then for each frame its length as a
u32 and its bytes), so that what one side queued in one pass of its event loop
leaves in one websocket message and one write (``encode_batch``, ``iter_batch``).

Each frame is a frozen dataclass; ``FRAME_TYPES`` is the one table mapping type
codes to classes (a test pins it). ``AgentFrame`` and ``ServerFrame`` are the
two direction unions: what an agent may send, and what a server may send.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BodyDoesNotFit, FrameTooLarge, LocalProtocolError, ProtocolError
from .heads import (
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
)
from .limits import (
    FRAME_HEADER_SIZE,
    MAX_CONTROL_SIZE,
    MAX_DATA_SIZE,
    MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_TUNNELS_PER_AGENT,
)

#: Flag bit: this frame is the last one the sender sends on its half of the stream.
FLAG_END_STREAM = 0x01
#: Flag bit, OPEN and RESPONSE only: body bytes follow the head in the payload (the
#: stream's first body bytes, as if in a DATA frame right behind). Sent only to a peer
#: that listed the ``"inline-body"`` feature.
FLAG_BODY = 0x02


@dataclass(frozen=True)
class Hello:
    """Agent -> server, first frame: the version spoken and the tunnels wanted.

    Each tunnel is a JSON object with at least ``name``; unknown keys are
    ignored so later versions can add settings without a new frame.
    """

    version: int
    tunnels: tuple[dict[str, Any], ...]
    agent: str = ""
    #: The agent's label (its host name by default): fan-out destinations
    #: ``agent:LABEL`` pick agents by it. Sent only when not empty.
    label: str = ""
    #: What the agent understands beyond version 1 (``"batch"``): the server sends
    #: an optional form only to an agent that lists it. Sent only when not empty.
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Welcome:
    """Server -> agent, answer to HELLO: the granted tunnels with their public URLs."""

    version: int
    session: str
    tunnels: tuple[dict[str, Any], ...]
    limits: dict[str, int] = field(default_factory=dict)
    #: What the server understands beyond version 1 (e.g. ``"target-up"``): an
    #: agent sends an optional frame only to a server that lists it. Encoded
    #: only when not empty, so a server without features sends the old bytes.
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Open:
    """Server -> agent: a new stream carrying a public request's head, and with
    ``body`` its first body bytes (the ``"inline-body"`` feature)."""

    stream_id: int
    head: RequestHead
    end_stream: bool = False
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    """Agent -> server: the local service's response head on a stream, and with
    ``body`` its first body bytes (the ``"inline-body"`` feature)."""

    stream_id: int
    head: ResponseHead
    end_stream: bool = False
    body: bytes = b""


@dataclass(frozen=True)
class Data:
    """Either way: body bytes on a stream, raw; ``end_stream`` closes the sender's half."""

    stream_id: int
    data: bytes
    end_stream: bool = False


@dataclass(frozen=True)
class Window:
    """Either way: the receiver grants ``increment`` more bytes of credit on a stream."""

    stream_id: int
    increment: int


@dataclass(frozen=True)
class Reset:
    """Either way: the stream is cancelled, both halves, with a reason code."""

    stream_id: int
    code: int
    reason: str = ""


@dataclass(frozen=True)
class Ping:
    """Either way, stream 0: heartbeat; the peer answers with PONG and the same payload."""

    payload: bytes = b""


@dataclass(frozen=True)
class Pong:
    """Either way, stream 0: answer to PING."""

    payload: bytes = b""


@dataclass(frozen=True)
class TargetUp:
    """Agent -> server, stream 0, empty: the local service, unreachable a moment
    ago, accepts connections again (deliver what waits for it now). Sent only to
    a server whose WELCOME lists the ``"target-up"`` feature."""


#: The feature a server lists in WELCOME when it understands TARGET_UP.
FEATURE_TARGET_UP = "target-up"
#: The feature a side lists (agent: HELLO, server: WELCOME) when it reads BATCH messages.
FEATURE_BATCH = "batch"
#: The feature a side lists when it reads OPEN and RESPONSE frames carrying body bytes
#: (``FLAG_BODY``): a small request or answer then crosses in one frame, not two.
FEATURE_INLINE_BODY = "inline-body"
#: Type code of a BATCH message (not a frame of its own: it carries frames).
BATCH = 0x0B
#: Bytes before each frame in a BATCH: its length (u32, big endian).
_BATCH_LENGTH_SIZE = 4

Frame = Hello | Welcome | Open | Response | Data | Window | Reset | Ping | Pong | TargetUp
AgentFrame = Hello | Response | Data | Window | Reset | Ping | Pong | TargetUp
ServerFrame = Welcome | Open | Data | Window | Reset | Ping | Pong

#: The one table of type codes. Never renumber: it is the wire format. (A table, not a
#: class variable of each frame: mypyc takes a dataclass's ClassVar for a field,
#: mypyc/mypyc#1122, and the protocol library may be compiled: see README.)
FRAME_TYPES: dict[int, type[Frame]] = {
    0x01: Hello,
    0x02: Welcome,
    0x03: Open,
    0x04: Response,
    0x05: Data,
    0x06: Window,
    0x07: Reset,
    0x08: Ping,
    0x09: Pong,
    0x0A: TargetUp,
}
#: Each frame class's type code.
TYPE_CODES: dict[type[Frame], int] = {cls: code for code, cls in FRAME_TYPES.items()}
AGENT_FRAMES: tuple[type[Frame], ...] = (Hello, Response, Data, Window, Reset, Ping, Pong, TargetUp)
SERVER_FRAMES: tuple[type[Frame], ...] = (Welcome, Open, Data, Window, Reset, Ping, Pong)

# Reset codes. The numbers are wire format; docs/protocol.md lists them.
RESET_CANCEL = 1  # the public client went away, or the sender gave up
RESET_TARGET_UNREACHABLE = 2  # the agent could not connect to its target
RESET_TARGET_TIMEOUT = 3  # the target did not answer in time
RESET_TARGET_ERROR = 4  # the target broke the connection mid-response
RESET_REFUSED = 5  # the agent will not take the stream (over a limit, bad head)
RESET_PROTOCOL = 6  # the stream broke the protocol
RESET_INTERNAL = 7  # a bug on the sending side
RESET_BAD_RESPONSE = 8  # the target answered with a head the agent cannot parse or relay

#: Characters of a RESET reason kept: a reason is one line for a log, not a document.
MAX_RESET_REASON = 1024

# Websocket close codes. The numbers are wire format (docs/protocol.md, pinned by
# tests/protocol/test_close_codes.py); those in FINAL_CLOSE_CODES are final: retrying cannot help.
CLOSE_NORMAL = 1000  # normal close
CLOSE_GOING_AWAY = 1001  # the server is shutting down or restarting
CLOSE_PROTOCOL_ERROR = 1002  # a ProtocolError: bad frame, illegal step, overrun, handshake
CLOSE_UNSUPPORTED = 1003  # a text (non-binary) message
CLOSE_TOO_BIG = 1009  # a message over MAX_FRAME_SIZE (sent by the websocket library)
CLOSE_UNAUTHORIZED = 4001  # the token is bad, expired or revoked
CLOSE_FORBIDDEN = 4003  # a name belongs to another user or the token does not allow it
CLOSE_VERSION = 4005  # protocol version mismatch
CLOSE_HEARTBEAT = 4008  # nothing received for HEARTBEAT_TIMEOUT
CLOSE_TOO_MANY_AGENTS = 4029  # the user has the server's most agent connections already (retried)

#: Close codes after which an agent must not reconnect: the same token, names
#: and version would be refused again. Every other code (or none) is retried.
FINAL_CLOSE_CODES = frozenset({CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_VERSION})

_JSON_SEPARATORS = (",", ":")


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=_JSON_SEPARATORS, sort_keys=True).encode()


def _unjson(payload: bytes) -> dict[str, Any]:
    try:
        # Decoded here: json.loads guesses UTF-16 or UTF-32 (or a BOM) from bytes, and
        # the protocol says UTF-8 (docs/protocol.md).
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("control payload is not JSON") from exc
    except RecursionError as too_deep:  # "[[[[..." fits easily in MAX_CONTROL_SIZE
        raise ProtocolError("control payload nested too deeply") from too_deep
    if not isinstance(obj, dict):
        raise ProtocolError("control payload is not a JSON object")
    return obj


def _tunnel_list(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or len(value) > MAX_TUNNELS_PER_AGENT:
        raise ProtocolError(f"tunnels must be a list of at most {MAX_TUNNELS_PER_AGENT}")
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in value):
        raise ProtocolError("each tunnel must be an object with a string name")
    return tuple(value)


def _payload(frame: Frame) -> bytes:
    # The frames of every request first: a stream's DATA, RESPONSE and OPEN.
    if isinstance(frame, Data):
        if len(frame.data) > MAX_DATA_SIZE:  # the caller cuts bodies (Engine.send_data does)
            raise LocalProtocolError(f"DATA of {len(frame.data)} bytes, over {MAX_DATA_SIZE}")
        return frame.data
    if isinstance(frame, Response):
        return _with_body(encode_response_head(frame.head), frame.body)
    if isinstance(frame, Open):
        return _with_body(encode_request_head(frame.head), frame.body)
    if isinstance(frame, Hello):
        hello: dict[str, Any] = {"tunnels": list(frame.tunnels), "agent": frame.agent}
        if frame.label:
            hello["label"] = frame.label
        if frame.features:
            hello["features"] = list(frame.features)
        return frame.version.to_bytes(2, "big") + _json(hello)
    if isinstance(frame, Welcome):
        welcome: dict[str, Any] = {
            "session": frame.session,
            "tunnels": list(frame.tunnels),
            "limits": frame.limits,
        }
        if frame.features:
            welcome["features"] = list(frame.features)
        return frame.version.to_bytes(2, "big") + _json(welcome)
    if isinstance(frame, Window):
        return frame.increment.to_bytes(4, "big")
    if isinstance(frame, Reset):
        return frame.code.to_bytes(2, "big") + frame.reason[:MAX_RESET_REASON].encode()
    if isinstance(frame, TargetUp):
        return b""
    return frame.payload  # Ping, Pong


def _with_body(head: bytes, body: bytes) -> bytes:
    if not body:
        return head
    if len(head) + len(body) > _MAX_PAYLOAD:
        raise BodyDoesNotFit(f"a head of {len(head)} bytes and {len(body)} body bytes, over {_MAX_PAYLOAD}")
    return head + body


#: Largest payload of one frame.
_MAX_PAYLOAD = MAX_FRAME_SIZE - FRAME_HEADER_SIZE
#: A frame's header: type, flags, stream id (big-endian), FRAME_HEADER_SIZE bytes.
_HEADER = struct.Struct("!BBI")
_HEAD_FLAGS = FLAG_END_STREAM | FLAG_BODY
#: Frames that belong to a stream (a non-zero id), and those that may end one.
_ON_STREAM = frozenset({Open, Response, Data, Window, Reset})
_MAY_END = frozenset({Open, Response, Data})
#: Flags a frame may carry: END_STREAM on those that may end a stream, BODY on heads.
_FLAGS = {cls: FLAG_END_STREAM for cls in _MAY_END} | {Open: _HEAD_FLAGS, Response: _HEAD_FLAGS}


def encode(frame: Frame) -> bytes:
    """Encode one frame into the bytes of one binary websocket message."""
    flags = FLAG_END_STREAM if getattr(frame, "end_stream", False) else 0
    if getattr(frame, "body", b""):
        flags |= FLAG_BODY
    return _HEADER.pack(TYPE_CODES[type(frame)], flags, getattr(frame, "stream_id", 0)) + _payload(frame)


def encode_batch(frames: list[bytes]) -> bytes:
    """One BATCH message carrying ``frames`` (encoded frames, none a BATCH), in order.
    The caller keeps it within ``MAX_FRAME_SIZE`` (``batch_size`` says what it takes)."""
    parts = [bytes((BATCH, 0, 0, 0, 0, 0))]
    for frame in frames:
        parts.append(len(frame).to_bytes(_BATCH_LENGTH_SIZE, "big"))
        parts.append(frame)
    return b"".join(parts)


def batch_size(sizes: int, count: int) -> int:
    """Bytes of a BATCH carrying ``count`` frames of ``sizes`` bytes in all."""
    return FRAME_HEADER_SIZE + count * _BATCH_LENGTH_SIZE + sizes


def is_batch(message: bytes) -> bool:
    return bool(message) and message[0] == BATCH


def iter_batch(message: bytes) -> Iterator[bytes]:
    """The frames a BATCH message carries, each still encoded (``decode`` checks each),
    one at a time: a reader may act on each before the next is cut out.

    Raises ``ProtocolError`` (``FrameTooLarge``) for a message over ``MAX_FRAME_SIZE``
    or flags or a stream id that are not 0, before the first frame; for a length running
    past the end, an empty frame or a BATCH inside a BATCH, when the iteration reaches
    it; for no frame at all, at the end."""
    if len(message) > MAX_FRAME_SIZE:
        raise FrameTooLarge(f"BATCH of {len(message)} bytes, over {MAX_FRAME_SIZE}")
    if len(message) < FRAME_HEADER_SIZE or message[1:FRAME_HEADER_SIZE] != bytes(5):
        raise ProtocolError("BATCH header must have flags and stream id 0")
    offset, end = FRAME_HEADER_SIZE, len(message)
    if offset == end:
        raise ProtocolError("empty BATCH")
    view = memoryview(message)
    while offset < end:
        if offset + _BATCH_LENGTH_SIZE > end:
            raise ProtocolError("BATCH cut inside a frame length")
        size = int.from_bytes(view[offset : offset + _BATCH_LENGTH_SIZE], "big")
        offset += _BATCH_LENGTH_SIZE
        if size == 0 or offset + size > end:
            raise ProtocolError("BATCH frame length of 0 or past the end")
        if message[offset] == BATCH:
            raise ProtocolError("BATCH inside a BATCH")
        yield bytes(view[offset : offset + size])
        offset += size


def decode(message: bytes) -> Frame:
    """Decode one websocket message into a frame.

    Raises ``ProtocolError`` (or its subclass ``FrameTooLarge``) for anything
    that is not exactly one well-formed frame; never anything else.
    """
    if len(message) > MAX_FRAME_SIZE:
        raise FrameTooLarge(f"frame of {len(message)} bytes, over {MAX_FRAME_SIZE}")
    if len(message) < FRAME_HEADER_SIZE:
        raise ProtocolError("frame shorter than its header")
    type_code, flags, stream_id = _HEADER.unpack_from(message)
    payload = message[FRAME_HEADER_SIZE:]
    cls = FRAME_TYPES.get(type_code)
    if cls is None:
        raise ProtocolError(f"unknown frame type 0x{type_code:02x}")
    if flags & ~(FLAG_END_STREAM | FLAG_BODY):
        raise ProtocolError(f"unknown flags 0x{flags:02x}")
    if flags & ~_FLAGS.get(cls, 0):
        flag = "END_STREAM" if flags & FLAG_END_STREAM and cls not in _MAY_END else "BODY"
        raise ProtocolError(f"{flag} flag on {cls.__name__}")
    on_stream = cls in _ON_STREAM
    if on_stream and stream_id == 0:
        raise ProtocolError(f"{cls.__name__} on stream 0")
    if not on_stream and stream_id != 0:
        raise ProtocolError(f"{cls.__name__} on stream {stream_id}, expected 0")
    return _decode_payload(cls, stream_id, payload, flags)


def _decode_payload(cls: type[Frame], stream_id: int, payload: bytes, flags: int) -> Frame:
    # The frames of every request first: a stream's DATA, RESPONSE and OPEN.
    end_stream = bool(flags & FLAG_END_STREAM)
    if cls is Data:
        if len(payload) > MAX_DATA_SIZE:
            raise FrameTooLarge(f"DATA of {len(payload)} bytes, over {MAX_DATA_SIZE}")
        return Data(stream_id, payload, end_stream)
    if cls is Response:
        response, carried = decode_response_head(payload, bool(flags & FLAG_BODY))
        return Response(stream_id, response, end_stream, carried)
    if cls is Open:
        request, carried = decode_request_head(payload, bool(flags & FLAG_BODY))
        return Open(stream_id, request, end_stream, carried)
    if cls is Hello or cls is Welcome:
        if len(payload) < 2 or len(payload) > MAX_CONTROL_SIZE:
            raise ProtocolError(f"{cls.__name__} payload of invalid size")
        version = int.from_bytes(payload[:2], "big")
        body = _unjson(payload[2:])
        tunnels = _tunnel_list(body.get("tunnels"))
        features = body.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ProtocolError(f"{cls.__name__.upper()} features must be a list of strings")
        if cls is Hello:
            agent, label = body.get("agent", ""), body.get("label", "")
            if not isinstance(agent, str) or not isinstance(label, str):
                raise ProtocolError("agent and label must be strings")
            return Hello(version, tunnels, agent, label, tuple(features))
        session, limits = body.get("session"), body.get("limits", {})
        if not isinstance(session, str) or not isinstance(limits, dict):
            raise ProtocolError("WELCOME needs a session string and a limits object")
        return Welcome(version, session, tunnels, limits, tuple(features))
    if cls is Window:
        if len(payload) != 4:
            raise ProtocolError("WINDOW payload must be 4 bytes")
        increment = int.from_bytes(payload, "big")
        if increment == 0:
            raise ProtocolError("WINDOW increment of 0")
        return Window(stream_id, increment)
    if cls is Reset:
        if len(payload) < 2 or len(payload) > MAX_CONTROL_SIZE:
            raise ProtocolError("RESET payload of invalid size")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("RESET reason is not UTF-8") from exc
        return Reset(stream_id, int.from_bytes(payload[:2], "big"), reason)
    if cls is TargetUp:
        if payload:
            raise ProtocolError("TARGET_UP carries no payload")
        return TargetUp()
    if len(payload) > MAX_CONTROL_SIZE:
        raise FrameTooLarge("PING/PONG payload too large")
    return Ping(payload) if cls is Ping else Pong(payload)


__all__ = [
    "AGENT_FRAMES",
    "BATCH",
    "CLOSE_FORBIDDEN",
    "CLOSE_GOING_AWAY",
    "CLOSE_HEARTBEAT",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "CLOSE_TOO_MANY_AGENTS",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNSUPPORTED",
    "CLOSE_VERSION",
    "FEATURE_BATCH",
    "FEATURE_INLINE_BODY",
    "FEATURE_TARGET_UP",
    "FINAL_CLOSE_CODES",
    "FLAG_BODY",
    "FLAG_END_STREAM",
    "FRAME_TYPES",
    "MAX_STREAM_ID",
    "SERVER_FRAMES",
    "TYPE_CODES",
    "AgentFrame",
    "Data",
    "Frame",
    "Hello",
    "Open",
    "Ping",
    "Pong",
    "Reset",
    "Response",
    "ServerFrame",
    "TargetUp",
    "Welcome",
    "Window",
]
