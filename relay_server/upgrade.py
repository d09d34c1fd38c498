"""WebSocket upgrades: relay a public client's websocket as messages on one stream.

The server runs its own WebSocket handshake with the public client once the
agent reports that the local service accepted (status 101); from then on each
message, ping, pong and close travels as a ``relay_protocol.messages`` record
in the stream's DATA bytes, both directions at once, under flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from relay_protocol import RelayError, ResponseHead
from relay_protocol.headers import WEBSOCKET_HANDSHAKE, header_value, strip_hop_by_hop, without
from relay_protocol.limits import MAX_WEBSOCKET_MESSAGE
from relay_protocol.messages import Kind, Message, MessageDecoder, encode_message

from .relayed import ExactHead
from .session import AgentSession, Stream, StreamFailed

log = logging.getLogger("relay.server")

#: Seconds to wait for the other side's CLOSE once one side closed.
CLOSE_GRACE = 5.0

#: Close codes that report a condition and may not be sent in a CLOSE frame (RFC 6455 7.4.1).
_NOT_SENDABLE = frozenset({1005, 1006, 1015})

_KIND_OF = {
    WSMsgType.TEXT: Kind.TEXT,
    WSMsgType.BINARY: Kind.BINARY,
    WSMsgType.PING: Kind.PING,
    WSMsgType.PONG: Kind.PONG,
}


class Idle:
    """Last time a stream carried traffic, and a watchdog that fires after ``limit`` of silence."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    def touch(self) -> None:
        self._last = self._loop.time()

    async def expired(self) -> None:
        """Return once nothing touched this for ``limit`` seconds."""
        while (left := self._last + self.limit - self._loop.time()) > 0:
            await asyncio.sleep(left)


class RelayedWebSocketResponse(ExactHead, web.WebSocketResponse):
    """The public side of a relayed websocket: its 101 carries the local service's
    headers as it sent them (``relayed.ExactHead``)."""


async def relay_websocket(
    request: web.Request, session: AgentSession, stream: Stream, head: ResponseHead, idle_limit: float
) -> web.WebSocketResponse:
    protocol = header_value(head.headers, b"sec-websocket-protocol")
    ws = RelayedWebSocketResponse(
        protocols=(protocol.decode("latin-1"),) if protocol else (),
        autoping=False,  # pings and pongs are relayed end to end, not answered here
        max_msg_size=MAX_WEBSOCKET_MESSAGE,
        compress=False,
    )
    extra = without(strip_hop_by_hop(head.headers), *WEBSOCKET_HANDSHAKE, b"sec-websocket-protocol")
    for name, value in extra:
        ws.headers.add(name.decode("latin-1"), value.decode("latin-1"))
    await ws.prepare(request)
    idle = Idle(idle_limit)
    to_agent = asyncio.create_task(_public_to_agent(ws, session, stream, idle))
    to_public = asyncio.create_task(_agent_to_public(ws, session, stream, idle))
    watchdog = asyncio.create_task(idle.expired())
    try:
        done, _ = await asyncio.wait({to_agent, to_public, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog in done:
            log.info("stream %s: websocket idle for %ss, closing", stream.id, idle_limit)
            with contextlib.suppress(StreamFailed):
                await _send(session, stream, Message.close(WSCloseCode.GOING_AWAY, "idle timeout"))
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"idle timeout")
        elif to_agent in done and not to_public.done():
            # The public client closed: give the local service time to answer its CLOSE.
            await asyncio.wait({to_public}, timeout=CLOSE_GRACE)
    finally:
        for task in (to_agent, to_public, watchdog):
            task.cancel()
        for result in await asyncio.gather(to_agent, to_public, watchdog, return_exceptions=True):
            if isinstance(result, Exception):  # a bug: said, not swallowed (the others end quietly)
                log.error("stream %s: the websocket relay failed", stream.id, exc_info=result)
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"tunnel closed")
    return ws


async def _send(session: AgentSession, stream: Stream, message: Message, end: bool = False) -> None:
    await session.send_body(stream, encode_message(message), end=end)


async def _public_to_agent(
    ws: web.WebSocketResponse, session: AgentSession, stream: Stream, idle: Idle
) -> None:
    """Relay the public client's messages until it closes or goes away."""
    try:
        while True:
            msg = await ws.receive()
            idle.touch()
            kind = _KIND_OF.get(msg.type)
            if kind is not None:
                data = (
                    msg.data.encode() if msg.type is WSMsgType.TEXT else bytes(msg.data)
                )  # a ping: bytearray
                await _send(session, stream, Message(kind, data))
                continue
            if msg.type is WSMsgType.CLOSE:
                close = Message.close(msg.data, msg.extra or "")
            else:  # CLOSING, CLOSED, ERROR: the client vanished without a CLOSE
                close = Message.close(WSCloseCode.GOING_AWAY)
            await _send(session, stream, close, end=True)
            # The client may hang up at once (cancelling this handler): the agent
            # still relays the close to the local service and ends the stream.
            stream.reset_on_finish = False
            return
    except StreamFailed:
        return


async def _agent_to_public(
    ws: web.WebSocketResponse, session: AgentSession, stream: Stream, idle: Idle
) -> None:
    """Relay the local service's messages until it closes."""
    decoder = MessageDecoder()
    try:
        while chunk := await stream.read():
            idle.touch()
            for message in decoder.feed(chunk):
                if message.kind is Kind.CLOSE:
                    code, reason = message.close_code()
                    if code in _NOT_SENDABLE:
                        code = WSCloseCode.OK
                    await ws.close(code=code, message=reason.encode())
                    return
                await ws.send_frame(message.payload, WSMsgType(message.kind))
            await session.consumed(stream, len(chunk))
    except (RelayError, ConnectionError) as exc:  # StreamFailed, or a malformed message
        log.info("stream %s: websocket ended: %s", stream.id, exc)
    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"tunnel closed")
