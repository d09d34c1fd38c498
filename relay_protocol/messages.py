"""WebSocket messages on an upgraded stream.

After a RESPONSE with status 101, the DATA bytes of both halves of a stream
are no longer an HTTP body but a sequence of WebSocket messages, each encoded
as::

    +--------+----------------------------+------------------+
    | kind   | length (u32, big-endian)   | payload (length) |
    +--------+----------------------------+------------------+

The kinds are the WebSocket opcodes of RFC 6455. The sequence is a byte
stream: a message may span DATA frames and a DATA frame may hold several
messages, so the sender is free to split under its credit. A CLOSE payload is
a u16 close code followed by a UTF-8 reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import FrameTooLarge, LocalProtocolError, ProtocolError
from .limits import MAX_WEBSOCKET_MESSAGE

_HEADER_SIZE = 5


class Kind(enum.IntEnum):
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@dataclass(frozen=True)
class Message:
    kind: Kind
    payload: bytes

    @classmethod
    def close(cls, code: int, reason: str = "") -> Message:
        if not 0 <= code <= 0xFFFF:
            raise LocalProtocolError(f"invalid close code {code}")
        return cls(Kind.CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])

    def close_code(self) -> tuple[int, str]:
        """Code and reason of a CLOSE message (1005, "" when it carried none)."""
        if len(self.payload) < 2:
            return 1005, ""
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode("utf-8", "replace")


def encode_message(message: Message) -> bytes:
    """The bytes of one message; raises ``LocalProtocolError`` over the size limit."""
    if len(message.payload) > MAX_WEBSOCKET_MESSAGE:
        raise LocalProtocolError(f"message of {len(message.payload)} bytes over {MAX_WEBSOCKET_MESSAGE}")
    return bytes((message.kind,)) + len(message.payload).to_bytes(4, "big") + message.payload


class MessageDecoder:
    """Turns the DATA bytes of an upgraded stream back into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Messages completed by ``data``. Raises ``ProtocolError`` for an unknown kind
        or a length over ``MAX_WEBSOCKET_MESSAGE`` (before buffering the payload)."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER_SIZE:
            try:
                kind = Kind(self._buffer[0])
            except ValueError as exc:
                raise ProtocolError(f"unknown message kind 0x{self._buffer[0]:02x}") from exc
            length = int.from_bytes(self._buffer[1:_HEADER_SIZE], "big")
            if length > MAX_WEBSOCKET_MESSAGE:
                raise FrameTooLarge(f"message of {length} bytes over {MAX_WEBSOCKET_MESSAGE}")
            end = _HEADER_SIZE + length
            if len(self._buffer) < end:
                break
            messages.append(Message(kind, bytes(self._buffer[_HEADER_SIZE:end])))
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)
