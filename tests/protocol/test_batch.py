"""BATCH messages (0x0B): several frames in one websocket message, between peers that
both listed the ``"batch"`` feature; fixed bytes both ways, every malformed batch a
ProtocolError, and the engine packing what it queued into one message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_protocol import PROTOCOL_VERSION, Engine, ProtocolError, RequestHead, Role
from relay_protocol.engine import EARLY_SEND_FRAMES
from relay_protocol.errors import ConnectionFailed, FrameTooLarge
from relay_protocol.frames import (
    BATCH,
    FEATURE_BATCH,
    Data,
    Hello,
    Ping,
    Welcome,
    decode,
    encode,
    encode_batch,
    iter_batch,
)
from relay_protocol.limits import MAX_DATA_SIZE, MAX_FRAME_SIZE

HEAD = RequestHead("POST", b"/hook", ((b"Content-Type", b"application/json"),))


def test_a_batch_has_fixed_bytes() -> None:
    ping, data = encode(Ping(b"p")), encode(Data(1, b"ab", end_stream=True))
    wire = encode_batch([ping, data])
    assert wire == (
        bytes.fromhex("0b 00 00000000")
        + bytes.fromhex("00000007")
        + bytes.fromhex("08 00 00000000")
        + b"p"
        + bytes.fromhex("00000008")
        + bytes.fromhex("05 01 00000001")
        + b"ab"
    )
    assert list(iter_batch(wire)) == [ping, data]
    assert BATCH == 0x0B and FEATURE_BATCH == "batch"


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (bytes.fromhex("0b 00 00000000"), "empty BATCH"),
        (bytes.fromhex("0b 01 00000000 00000001 08"), "flags and stream id 0"),
        (bytes.fromhex("0b 00 00000001 00000001 08"), "flags and stream id 0"),
        (bytes.fromhex("0b 00 00000000 000000"), "cut inside a frame length"),
        (bytes.fromhex("0b 00 00000000 00000000"), "length of 0 or past the end"),
        (bytes.fromhex("0b 00 00000000 00000009 0800000000"), "length of 0 or past the end"),
        (bytes.fromhex("0b 00 00000000 00000006 0b0000000000"), "BATCH inside a BATCH"),
    ],
)
def test_a_malformed_batch_is_a_protocol_error(wire: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        list(iter_batch(wire))


def test_a_batch_over_the_frame_limit_is_refused() -> None:
    with pytest.raises(FrameTooLarge):
        next(iter_batch(encode_batch([encode(Ping(b"x" * 40_000)), encode(Ping(b"y" * 40_000))])))


@given(st.binary(max_size=300))
def test_any_bytes_after_the_batch_header_give_frames_or_a_protocol_error(tail: bytes) -> None:
    try:
        frames = list(iter_batch(bytes.fromhex("0b 00 00000000") + tail))
    except ProtocolError:
        return
    assert frames and all(frames)


def _pair(batching: bool) -> tuple[Engine, Engine]:
    features = (FEATURE_BATCH,) if batching else ()
    server, agent = Engine(Role.SERVER, 0.0), Engine(Role.AGENT, 0.0)
    agent.send(Hello(PROTOCOL_VERSION, ({"name": "alice"},), features=features), 0.0)
    hello = server.receive(_take(agent), 0.0)
    assert isinstance(hello, Hello) and hello.features == features
    server.send(Welcome(PROTOCOL_VERSION, "s", ({"name": "alice"},), features=features), 0.0)
    assert isinstance(agent.receive(_take(server), 0.0), Welcome)
    server.batching = agent.batching = batching
    return server, agent


def _take(engine: Engine) -> bytes:
    data = engine.outgoing()
    assert data is not None
    engine.sent()
    return data


def test_the_engine_packs_what_it_queued_into_one_message() -> None:
    server, agent = _pair(batching=True)
    sid = server.open(HEAD, end_stream=False, now=1.0)
    server.send_data(sid, b'{"n": 1}', end=True, now=1.0)
    server.send(Ping(b""), now=1.0)
    message = server.outgoing()
    assert message is not None and message[0] == BATCH
    assert server.outgoing() is message  # the same until sent
    assert server.buffered > 0
    server.sent()
    assert server.outgoing() is None and server.buffered == 0
    frames = agent.receive_all(message, 1.0)
    assert [type(f).__name__ for f in frames] == ["Open", "Data"]  # the PING is answered, not returned
    assert frames[1] == Data(sid, b'{"n": 1}', True)
    assert agent.outgoing() is not None  # the PONG


def test_a_lone_frame_and_big_frames_go_as_they_are() -> None:
    server, _ = _pair(batching=True)
    sid = server.open(HEAD, end_stream=False, now=0.0)
    assert decode(_take(server)).stream_id == sid  # type: ignore[union-attr]
    server.send_data(sid, b"a" * MAX_DATA_SIZE, end=False, now=0.0)
    server.send_data(sid, b"b" * MAX_DATA_SIZE, end=False, now=0.0)
    first = _take(server)
    assert len(first) <= MAX_FRAME_SIZE and first[0] != BATCH  # two would not fit in one message
    assert decode(first) == Data(sid, b"a" * MAX_DATA_SIZE)


def test_without_the_feature_every_frame_is_its_own_message() -> None:
    server, agent = _pair(batching=False)
    sid = server.open(HEAD, end_stream=False, now=0.0)
    server.send_data(sid, b"x", end=True, now=0.0)
    messages = [_take(server), _take(server)]
    assert all(m[0] != BATCH for m in messages)
    assert [type(f).__name__ for m in messages for f in agent.receive_all(m, 0.0)] == ["Open", "Data"]


def test_a_message_is_due_at_once_when_enough_frames_wait() -> None:
    """``send_due``: a burst leaves in fours while the loop's pass goes on; a lone request
    waits for the writer's turn; nothing is due while a message is out (not yet sent)."""
    server, agent = _pair(batching=True)
    for n in range(EARLY_SEND_FRAMES - 1):
        server.open(HEAD, end_stream=True, now=0.0)
        assert not server.send_due, n
    server.open(HEAD, end_stream=True, now=0.0)
    assert server.send_due
    message = server.outgoing()
    assert message is not None and not server.send_due  # out, not yet confirmed
    for _ in range(EARLY_SEND_FRAMES):
        server.open(HEAD, end_stream=True, now=0.0)
    assert not server.send_due
    server.sent()
    assert server.send_due  # the four queued meanwhile
    assert len(agent.receive_all(message, 0.0)) == EARLY_SEND_FRAMES
    assert len(agent.receive_all(_take(server), 0.0)) == EARLY_SEND_FRAMES
    assert not server.send_due and server.outgoing() is None


def test_a_batch_before_the_handshake_ends_the_connection() -> None:
    server = Engine(Role.SERVER, 0.0)
    batch = encode_batch([encode(Hello(PROTOCOL_VERSION, ())), encode(Ping(b""))])
    with pytest.raises(ProtocolError, match="got a BATCH"):
        server.receive_all(batch, 0.0)
    with pytest.raises(ConnectionFailed):
        server.receive_all(encode(Ping(b"")), 0.0)


def test_a_bad_frame_inside_a_batch_ends_the_connection() -> None:
    server, agent = _pair(batching=True)
    bad = encode_batch([encode(Ping(b"")), bytes.fromhex("05 00 00000009")])  # DATA on a stream never opened
    with pytest.raises(ProtocolError):
        agent.receive_all(bad, 0.0)
    with pytest.raises(ConnectionFailed):
        agent.receive_all(encode(Ping(b"")), 0.0)
    assert server.error is None


def test_a_batch_is_cut_out_one_frame_at_a_time() -> None:
    # A reader pauses between the frames of a long BATCH (the server's read loop lets
    # other tenants in): each frame is taken before the next is cut out, and a fault
    # further on ends the connection only when it is reached.
    server, agent = _pair(batching=True)
    cut = bytes.fromhex("00000009 08")  # a length running past the end
    parts = agent.parts(encode_batch([encode(Ping(b"1")), encode(Ping(b"2"))]) + cut)
    assert agent.receive(next(parts), 0.0) is None  # the first PING, answered
    assert agent.outgoing() is not None and agent.error is None
    assert agent.receive(next(parts), 0.0) is None
    with pytest.raises(ProtocolError, match="past the end"):
        next(parts)
    with pytest.raises(ConnectionFailed):
        agent.receive_all(encode(Ping(b"")), 0.0)
    assert server.error is None
