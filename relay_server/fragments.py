"""No fragmented websocket messages from agents: their frame headers are read as the bytes
arrive, before aiohttp parses them, and the first fragment ends the connection.

aiohttp assembles a fragmented message (RFC 6455 5.4) before anyone sees it, and a fragment
that carries nothing adds nothing to it: it never becomes a message, never fills aiohttp's
queue (so reading is never paused) and never meets the user's frame budget
(``relay_server.budget``). A review sent 220 million empty fragments in 10 s on one agent
connection, each parsed by aiohttp (47 ns), and every other tenant's requests took 480 ms.
relay-agent never fragments (each protocol frame or BATCH is one websocket message of at
most ``MAX_FRAME_SIZE``), so the server refuses fragments: it closes the connection with
1002 at the first one, before a byte of it reaches aiohttp.

The screen reads from the first byte after the upgrade request, so it must be set before
any: bytes a client sends before the upgrade is answered (RFC 6455 4.1 says it waits) are
aiohttp's already, kept unparsed as ``RequestHandler._message_tail`` until the websocket
reader is set, and the screen could not tell where a frame starts. A review pipelined a
frame header with the upgrade request and sent unlimited fragments past the screen; such a
connection is refused (``tests/unit/test_app.py`` pipelines one to keep this honest).
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable

from aiohttp import web

from relay_protocol.frames import CLOSE_PROTOCOL_ERROR

#: Bits of a frame's first two bytes (RFC 6455 5.2).
_FIN = 0x80
_OPCODE = 0x0F
_MASKED = 0x80
_LENGTH = 0x7F
#: The close frame sent at the first fragment: 1002 and why, unmasked (a server's frame).
_REASON = b"fragmented messages are not accepted"
_CLOSE = bytes((0x88, 2 + len(_REASON))) + CLOSE_PROTOCOL_ERROR.to_bytes(2, "big") + _REASON


class FrameHeaders:
    """The headers of the websocket frames a client sends, read from its bytes as they
    arrive (any cut), payloads skipped unread."""

    def __init__(self) -> None:
        self._skip = 0  # payload bytes of the current frame still to come
        self._cut = b""  # the start of a header the last chunk ended in

    def whole(self, data: bytes) -> bool:
        """Take the next bytes; False at the first fragment: a frame without FIN, or a
        continuation frame. (A header cut by the end of ``data`` is judged when complete.)"""
        if self._cut:
            data, self._cut = self._cut + data, b""
        offset, end = 0, len(data)
        while True:
            if self._skip:
                if end - offset <= self._skip:
                    self._skip -= end - offset
                    return True
                offset += self._skip
                self._skip = 0
            if end - offset < 2:
                self._cut = data[offset:]
                return True
            first, second = data[offset], data[offset + 1]
            if not first & _FIN or not first & _OPCODE:
                return False
            size = second & _LENGTH
            extra = 2 if size == 126 else 8 if size == 127 else 0
            head = 2 + extra + (4 if second & _MASKED else 0)
            if end - offset < head:
                self._cut = data[offset:]
                return True
            if extra:
                size = int.from_bytes(data[offset + 2 : offset + 2 + extra], "big")
            offset += head
            self._skip = size


class _Screen(asyncio.Protocol):
    """Between a transport and the protocol it fed: bytes pass on once their frame
    headers are read; at the first fragment the connection is closed with 1002."""

    def __init__(
        self, inner: asyncio.Protocol, transport: asyncio.WriteTransport, refused: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._refused = refused
        self._headers = FrameHeaders()
        self._open = True

    def data_received(self, data: bytes) -> None:
        if not self._open or self._transport.is_closing():
            return
        if self._headers.whole(data):
            self._inner.data_received(data)
            return
        self._open = False
        self._refused()
        self._transport.write(_CLOSE)
        # Aborted, not closed: a close would wait for the client's end of a TLS shutdown
        # (reading and decrypting its flood meanwhile, a review measured 10 s of it).
        self._transport.abort()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def refuse_fragments(request: web.BaseRequest, refused: Callable[[], None]) -> bool:
    """From now on, read the websocket frames arriving on ``request``'s connection before
    its protocol (aiohttp's) does, and end the connection with 1002 at the first fragment,
    calling ``refused`` first (to say so). Call it before the upgrade is answered. False if
    the client sent bytes before that (they are out of the screen's reach): the caller
    refuses the upgrade."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    inner = transport.get_protocol()
    assert isinstance(inner, asyncio.Protocol)
    # A stream transport (uvloop's is not an asyncio.WriteTransport subclass).
    transport.set_protocol(_Screen(inner, typing.cast(asyncio.WriteTransport, transport), refused))
    # Read once the screen is set: whatever came before it is in aiohttp's upgrade tail.
    return not getattr(request.protocol, "_message_tail", b"")
