"""The early send (``AgentSession._queued`` on the server, ``_Session._queued`` on the
agent): a burst's frames go in fours as they are queued, written straight to the
transport, but only onto an empty transport buffer, never after the websocket's
CLOSE, and never raising: a failed write leaves the frames to the writer task."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from websockets.protocol import State

from relay_agent.tunnel import _Session
from relay_protocol import PROTOCOL_VERSION, Engine, RequestHead, Role
from relay_protocol.engine import EARLY_SEND_FRAMES
from relay_protocol.frames import FEATURE_BATCH, FEATURE_INLINE_BODY, Hello, Open, Ping, Welcome
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


async def test_a_failing_write_on_the_server_raises_nothing_and_leaves_the_frames_to_the_writer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, _, transport, _ = await _session()

    def broken(parts: tuple[bytes, ...]) -> None:
        raise RuntimeError("a transport that changed")

    transport.writelines = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        for _ in range(2 * EARLY_SEND_FRAMES):
            await session.open(HEAD, True, b"{}")
    assert ["sending frames early failed" in r.getMessage() for r in caplog.records] == [True]
    assert session._engine.outgoing() is not None  # still the writer's to send


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 70000])
def test_frame_heads_give_each_length_its_form(length: int) -> None:
    payload = bytes(length)
    assert _payload(_binary_frame_head(length) + payload) == payload
    assert len(_binary_frame_head(length)) == (2 if length < 126 else 4 if length < 65536 else 10)


class _Protocol:
    """What the agent uses of websockets' protocol object."""

    def __init__(self, fail: bool = False) -> None:
        self.state = State.OPEN
        self.sent: list[bytes] = []
        self.fail = fail

    def send_binary(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("a websockets release that changed")
        self.sent.append(data)


class _AgentConnection:
    """What the agent uses of a websockets ``ClientConnection``: its protocol object,
    its transport and ``send_data``, and nothing else (websockets 14 and 15 have no
    ``send_in_progress``, for one)."""

    def __init__(self, fail: bool = False) -> None:
        self.protocol = _Protocol(fail)
        self.transport = _Transport()
        self.flushed = 0

    def send_data(self) -> None:
        self.flushed += 1


def _agent_session(ws: _AgentConnection) -> _Session:
    tunnel = SimpleNamespace(config=SimpleNamespace(heartbeat_interval=10.0))
    session = _Session(ws, tunnel)  # type: ignore[arg-type]
    session.engine.batching = True  # as after a WELCOME listing "batch"
    return session


async def test_the_agent_sends_a_burst_through_websockets_protocol_object() -> None:
    ws = _AgentConnection()
    session = _agent_session(ws)
    for _ in range(EARLY_SEND_FRAMES - 1):
        session.engine.send(Ping(b""), 0.0)
        session._queued()
    assert ws.protocol.sent == []
    session.engine.send(Ping(b""), 0.0)
    session._queued()
    assert len(ws.protocol.sent) == 1 and ws.flushed == 1
    assert session.engine.outgoing() is None  # taken: the writer has nothing to send again


async def test_a_failing_early_send_raises_nothing_and_leaves_the_frames_to_the_writer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ws = _AgentConnection(fail=True)
    session = _agent_session(ws)
    with caplog.at_level(logging.WARNING, logger="relay.agent"):
        for _ in range(2 * EARLY_SEND_FRAMES):
            session.engine.send(Ping(b""), 0.0)
            session._queued()  # as reset() and respond() call it: it must not raise
    assert [r.getMessage().startswith("sending frames early failed") for r in caplog.records] == [True]
    message = session.engine.outgoing()
    assert message is not None and message == session.engine.outgoing()  # still the writer's to send
