"""The server's early send (``AgentSession._queued``): a burst's frames go to the agent
in fours as they are queued, written straight to the transport as websocket frames,
but only onto an empty transport buffer and never after the websocket's CLOSE."""

from __future__ import annotations

import pytest

from relay_protocol import PROTOCOL_VERSION, Engine, RequestHead, Role
from relay_protocol.engine import EARLY_SEND_FRAMES
from relay_protocol.frames import FEATURE_BATCH, FEATURE_INLINE_BODY, Hello, Open, Welcome
from relay_server.session import AgentSession, _binary_frame_head

HEAD = RequestHead("POST", b"/hook", ((b"Content-Type", b"application/json"),))


class _Transport:
    """What the session uses of an asyncio transport, keeping what was written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0  # bytes the transport still holds (the peer reads slowly)
        self.closing = False

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.written.append(b"".join(parts))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


class _WebSocket:
    """What the session uses of aiohttp's ``WebSocketResponse`` before ``run``."""

    def __init__(self) -> None:
        self.closed = False
        self.sent: list[bytes] = []

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


async def _session() -> tuple[AgentSession, _WebSocket, _Transport, Engine]:
    ws, transport = _WebSocket(), _Transport()
    session = AgentSession(ws, "alice", ["alice"], transport=transport)  # type: ignore[arg-type]
    agent = Engine(Role.AGENT, 0.0)
    features = (FEATURE_BATCH, FEATURE_INLINE_BODY)
    agent.send(Hello(PROTOCOL_VERSION, ({"name": "alice"},), features=features), 0.0)
    hello = agent.outgoing()
    assert hello is not None
    agent.sent()
    session.receive_handshake(hello)
    await session.welcome(Welcome(PROTOCOL_VERSION, session.id, ({"name": "alice"},), features=features))
    assert isinstance(agent.receive(ws.sent.pop(), 0.0), Welcome)
    return session, ws, transport, agent


def _payload(frame: bytes) -> bytes:
    """The payload of one unmasked websocket frame (RFC 6455 5.2)."""
    assert frame[0] == 0x82  # FIN, binary
    length, offset = frame[1], 2
    if length == 126:
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == offset + length
    return frame[offset:]


async def test_a_burst_leaves_in_fours_as_it_is_queued() -> None:
    session, _, transport, agent = await _session()
    for _ in range(EARLY_SEND_FRAMES - 1):
        await session.open(HEAD, True, b"{}")
    assert transport.written == []  # a lone request waits for the writer's turn
    await session.open(HEAD, True, b"{}")
    [frame] = transport.written
    opens = [f for f in agent.receive_all(_payload(frame), 0.0) if isinstance(f, Open)]
    assert [f.stream_id for f in opens] == list(range(1, EARLY_SEND_FRAMES + 1))


async def test_a_transport_still_writing_leaves_the_frames_to_the_writer() -> None:
    session, _, transport, _ = await _session()
    transport.buffered = 1  # the agent has not taken what went before
    for _ in range(2 * EARLY_SEND_FRAMES):
        await session.open(HEAD, True, b"{}")
    assert transport.written == []


@pytest.mark.parametrize("why", ["websocket closed", "transport closing"])
async def test_nothing_goes_early_once_the_connection_closes(why: str) -> None:
    session, ws, transport, _ = await _session()
    if why == "websocket closed":
        ws.closed = True  # aiohttp marks it so before it sends its CLOSE
    else:
        transport.closing = True
    for _ in range(2 * EARLY_SEND_FRAMES):
        await session.open(HEAD, True, b"{}")
    assert transport.written == []


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 70000])
def test_frame_heads_give_each_length_its_form(length: int) -> None:
    payload = bytes(length)
    assert _payload(_binary_frame_head(length) + payload) == payload
    assert len(_binary_frame_head(length)) == (2 if length < 126 else 4 if length < 65536 else 10)
