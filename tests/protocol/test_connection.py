"""Two Connection objects joined back to back: what one sends, the other receives.

Synchronous on purpose: the protocol core has no I/O, so every rule can be
checked by passing bytes by hand.
"""

from __future__ import annotations

import pytest

from relay_protocol import frames
from relay_protocol.connection import Connection, Role
from relay_protocol.errors import (
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    TooManyStreams,
)
from relay_protocol.frames import (
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
from relay_protocol.heads import RequestHead, ResponseHead
from relay_protocol.limits import (
    INITIAL_WINDOW,
    MAX_DATA_SIZE,
    MAX_WINDOW,
    MAX_WINDOW_GROWTH,
    PROTOCOL_VERSION,
)

HEAD = RequestHead("POST", b"/hook", ((b"Content-Type", b"application/json"),), "127.0.0.1")
OK = ResponseHead(200, ((b"Content-Type", b"text/plain"),))
CHUNK = b"x" * MAX_DATA_SIZE


class Pair:
    """A server and an agent connection; ``s2a``/``a2s`` send on one side and deliver."""

    def __init__(self, max_streams: int = 1000) -> None:
        self.server = Connection(Role.SERVER, max_streams=max_streams)
        self.agent = Connection(Role.AGENT, max_streams=max_streams)

    def s2a(self, frame: Frame) -> Frame | None:
        return self.agent.receive(self.server.send(frame))

    def a2s(self, frame: Frame) -> Frame | None:
        return self.server.receive(self.agent.send(frame))

    def handshake(self) -> Pair:
        self.a2s(Hello(PROTOCOL_VERSION, ({"name": "alice"},)))
        self.s2a(Welcome(PROTOCOL_VERSION, "sess", ({"name": "alice"},)))
        return self

    def open(self, end_stream: bool = False) -> int:
        stream_id = self.server.next_stream_id()
        self.s2a(Open(stream_id, HEAD, end_stream))
        return stream_id


@pytest.fixture
def pair() -> Pair:
    return Pair().handshake()


def test_full_request_response_exchange() -> None:
    pair = Pair()
    hello = Hello(PROTOCOL_VERSION, ({"name": "alice"},), "test-agent")
    assert pair.a2s(hello) == hello
    welcome = Welcome(PROTOCOL_VERSION, "sess-1", ({"name": "alice", "url": "http://x"},))
    assert pair.s2a(welcome) == welcome

    assert pair.server.next_stream_id() == 1
    assert pair.s2a(Open(1, HEAD)) == Open(1, HEAD)
    assert pair.s2a(Data(1, b'{"a":')) == Data(1, b'{"a":')
    assert pair.s2a(Data(1, b"1}", end_stream=True)) == Data(1, b"1}", end_stream=True)
    assert pair.agent.is_open(1) and pair.server.is_open(1)

    assert pair.a2s(Response(1, OK)) == Response(1, OK)
    assert pair.a2s(Data(1, b"hello ")) == Data(1, b"hello ")
    assert pair.a2s(Data(1, b"world", end_stream=True)) == Data(1, b"world", end_stream=True)

    # Both halves closed on both sides: the stream is forgotten everywhere.
    assert not pair.agent.is_open(1) and not pair.server.is_open(1)
    assert pair.agent.open_streams == 0 and pair.server.open_streams == 0
    assert pair.server.next_stream_id() == 2


def test_head_only_exchange_with_end_flags(pair: Pair) -> None:
    assert pair.s2a(Open(1, RequestHead("GET", b"/", ()), end_stream=True)) is not None
    assert pair.agent.credit(1) == 0  # the agent may not send DATA before RESPONSE
    pair.a2s(Response(1, ResponseHead(204, ()), end_stream=True))
    assert pair.server.open_streams == 0 and pair.agent.open_streams == 0


def test_ping_pong(pair: Pair) -> None:
    assert pair.s2a(Ping(b"t1")) == Ping(b"t1")
    assert pair.a2s(Pong(b"t1")) == Pong(b"t1")
    assert pair.a2s(Ping()) == Ping()
    assert pair.s2a(Pong()) == Pong()


def test_target_up_reaches_the_server_like_a_ping(pair: Pair) -> None:
    stream_id = pair.open()
    assert pair.a2s(TargetUp()) == TargetUp()
    assert pair.server.open_streams == 1 and pair.server.credit(stream_id) > 0  # no stream touched


# -- the stream state machine -----------------------------------------------------


def test_agent_cannot_send_data_before_response(pair: Pair) -> None:
    pair.open()
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Data(1, b"x"))


def test_server_rejects_data_before_response(pair: Pair) -> None:
    pair.open()
    with pytest.raises(ProtocolError, match="unexpected data"):
        pair.server.receive(encode(Data(1, b"x")))


def test_cannot_send_data_after_end(pair: Pair) -> None:
    pair.open(end_stream=True)
    with pytest.raises(LocalProtocolError):
        pair.server.send(Data(1, b"x"))
    pair.a2s(Response(1, OK))
    pair.a2s(Data(1, b"x", end_stream=True))
    # Both halves are closed now, so the stream is gone on both sides.
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Data(1, b"more"))


def test_rejects_data_after_end(pair: Pair) -> None:
    pair.open(end_stream=True)
    with pytest.raises(ProtocolError, match="unexpected data"):
        pair.agent.receive(encode(Data(1, b"x")))


def test_server_rejects_data_after_response_end(pair: Pair) -> None:
    pair.open()  # request half still open, so the stream stays known
    pair.a2s(Response(1, OK, end_stream=True))
    with pytest.raises(ProtocolError, match="unexpected data"):
        pair.server.receive(encode(Data(1, b"x")))


def test_second_response_is_illegal(pair: Pair) -> None:
    pair.open()
    pair.a2s(Response(1, OK))
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Response(1, OK))
    with pytest.raises(ProtocolError, match="unexpected head"):
        pair.server.receive(encode(Response(1, OK)))


def test_second_hello_is_illegal() -> None:
    pair = Pair()
    pair.a2s(Hello(PROTOCOL_VERSION, ()))
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Hello(PROTOCOL_VERSION, ()))
    with pytest.raises(ProtocolError, match="second handshake"):
        pair.server.receive(encode(Hello(PROTOCOL_VERSION, ())))


def test_no_handshake_frame_after_welcome(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError):
        pair.server.send(Welcome(PROTOCOL_VERSION, "again", ()))
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Hello(PROTOCOL_VERSION, ()))
    with pytest.raises(ProtocolError):
        pair.agent.receive(encode(Welcome(PROTOCOL_VERSION, "again", ())))
    with pytest.raises(ProtocolError):
        pair.server.receive(encode(Hello(PROTOCOL_VERSION, ())))


def test_cannot_send_on_unopened_stream(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError, match="not open"):
        pair.agent.send(Response(1, OK))
    with pytest.raises(LocalProtocolError, match="not open"):
        pair.server.send(Data(1, b"x"))


# -- credit -------------------------------------------------------------------------


def test_send_refuses_data_over_credit(pair: Pair) -> None:
    pair.open()
    assert pair.server.credit(1) == INITIAL_WINDOW
    for _ in range(INITIAL_WINDOW // MAX_DATA_SIZE):
        pair.s2a(Data(1, CHUNK))
    assert pair.server.credit(1) == 0
    with pytest.raises(LocalProtocolError, match="credit"):
        pair.server.send(Data(1, b"x"))
    # An empty END still goes through: it carries no bytes.
    pair.s2a(Data(1, b"", end_stream=True))


def test_credit_is_partial(pair: Pair) -> None:
    pair.open()
    pair.s2a(Data(1, b"x" * 1000))
    assert pair.server.credit(1) == INITIAL_WINDOW - 1000
    for _ in range(3):
        pair.s2a(Data(1, CHUNK))
    left = INITIAL_WINDOW - 1000 - 3 * MAX_DATA_SIZE
    assert pair.server.credit(1) == left
    with pytest.raises(LocalProtocolError):
        pair.server.send(Data(1, CHUNK[: left + 1]))
    assert pair.server.credit(1) == left  # the refused frame took nothing
    pair.s2a(Data(1, CHUNK[:left]))
    assert pair.server.credit(1) == 0


def test_consumed_grants_after_half_a_window(pair: Pair) -> None:
    pair.open()
    half = INITIAL_WINDOW // 2
    for _ in range(INITIAL_WINDOW // MAX_DATA_SIZE):
        pair.s2a(Data(1, CHUNK))
    assert pair.server.credit(1) == 0

    assert pair.agent.consumed(1, half - 1) is None
    grant = pair.agent.consumed(1, 1)
    assert grant is not None
    assert decode(grant) == Window(1, half)
    assert grant == b"\x06\x00\x00\x00\x00\x01" + half.to_bytes(4, "big")
    assert pair.agent.consumed(1, half - 1) is None  # the count starts again

    assert pair.server.receive(grant) == Window(1, half)
    assert pair.server.credit(1) == half
    pair.s2a(Data(1, CHUNK))
    assert pair.server.credit(1) == half - MAX_DATA_SIZE


def test_consumed_in_one_big_step(pair: Pair) -> None:
    pair.open()
    pair.s2a(Data(1, CHUNK))
    pair.s2a(Data(1, CHUNK))
    grant = pair.agent.consumed(1, 2 * MAX_DATA_SIZE)
    assert grant is not None and decode(grant) == Window(1, 2 * MAX_DATA_SIZE)


def test_consumed_ignores_closed_and_unknown_streams(pair: Pair) -> None:
    pair.open(end_stream=True)
    assert pair.agent.consumed(1, INITIAL_WINDOW) is None  # nothing more will come
    assert pair.agent.consumed(99, INITIAL_WINDOW) is None
    assert pair.agent.consumed(1, 0) is None


def test_credit_flows_the_other_way_too(pair: Pair) -> None:
    pair.open(end_stream=True)
    pair.a2s(Response(1, OK))
    assert pair.agent.credit(1) == INITIAL_WINDOW
    for _ in range(INITIAL_WINDOW // MAX_DATA_SIZE):
        pair.a2s(Data(1, CHUNK))
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Data(1, b"x"))
    grant = pair.server.consumed(1, INITIAL_WINDOW)
    assert grant is not None
    pair.agent.receive(grant)
    assert pair.agent.credit(1) == INITIAL_WINDOW


def test_receiver_raises_when_peer_overruns(pair: Pair) -> None:
    pair.open()
    for _ in range(INITIAL_WINDOW // MAX_DATA_SIZE):
        pair.s2a(Data(1, CHUNK))
    # The server's own send() would refuse this; a rogue peer writes the bytes itself.
    with pytest.raises(FlowControlError):
        pair.agent.receive(encode(Data(1, b"x")))


def test_overrun_is_counted_across_frames(pair: Pair) -> None:
    pair.open()
    rogue = encode(Data(1, CHUNK))
    for _ in range(INITIAL_WINDOW // MAX_DATA_SIZE):
        pair.agent.receive(rogue)
    with pytest.raises(FlowControlError):
        pair.agent.receive(rogue)


def test_credit_overflow_is_a_peer_fault(pair: Pair) -> None:
    pair.open()
    with pytest.raises(FlowControlError):
        pair.server.receive(encode(Window(1, 2**31)))


def test_window_on_stream_with_closed_send_half_is_accepted(pair: Pair) -> None:
    pair.open(end_stream=True)
    assert pair.server.receive(encode(Window(1, 10))) == Window(1, 10)
    assert pair.server.credit(1) == 0  # nothing more to send on a closed half


# -- reset and late frames --------------------------------------------------------------


def test_reset_by_server_then_late_frames_are_ignored(pair: Pair) -> None:
    pair.open()
    reset = Reset(1, frames.RESET_CANCEL, "client went away")
    wire = pair.server.send(reset)
    assert not pair.server.is_open(1)
    # The agent had already sent these before it saw the RESET.
    assert pair.server.receive(encode(Response(1, OK))) is None
    assert pair.server.receive(encode(Data(1, b"late"))) is None
    assert pair.server.receive(encode(Window(1, 100))) is None
    assert pair.server.receive(encode(Reset(1, frames.RESET_CANCEL))) is None
    assert pair.agent.receive(wire) == reset
    assert not pair.agent.is_open(1)
    assert pair.agent.open_streams == 0 and pair.server.open_streams == 0


def test_reset_by_agent_then_late_frames_are_ignored(pair: Pair) -> None:
    pair.open()
    assert pair.a2s(Reset(1, frames.RESET_TARGET_UNREACHABLE, "refused")) == Reset(
        1, frames.RESET_TARGET_UNREACHABLE, "refused"
    )
    assert pair.agent.receive(encode(Data(1, b"late", end_stream=True))) is None
    with pytest.raises(LocalProtocolError):
        pair.agent.send(Response(1, OK))
    with pytest.raises(LocalProtocolError):
        pair.server.send(Data(1, b"x"))
    assert pair.server.credit(1) == 0


def test_late_frames_after_normal_close_are_ignored(pair: Pair) -> None:
    pair.open(end_stream=True)
    pair.a2s(Response(1, OK, end_stream=True))
    assert pair.server.receive(encode(Window(1, 5))) is None


@pytest.mark.parametrize(
    "frame",
    [Data(5, b"x"), Window(5, 1), Reset(5, frames.RESET_CANCEL)],
    ids=["data", "window", "reset"],
)
def test_frames_for_never_opened_streams_raise(pair: Pair, frame: Frame) -> None:
    pair.open()
    with pytest.raises(ProtocolError, match="never opened"):
        pair.agent.receive(encode(frame))
    with pytest.raises(ProtocolError, match="never opened"):
        pair.server.receive(encode(frame))


def test_response_for_never_opened_stream_raises(pair: Pair) -> None:
    with pytest.raises(ProtocolError, match="never opened"):
        pair.server.receive(encode(Response(1, OK)))


# -- stream ids and limits -----------------------------------------------------------


def test_stream_ids_go_up_by_one(pair: Pair) -> None:
    for expected in (1, 2, 3):
        assert pair.server.next_stream_id() == expected
        pair.open()
    with pytest.raises(LocalProtocolError, match="stream id 4"):
        pair.server.send(Open(3, HEAD))
    with pytest.raises(LocalProtocolError, match="stream id 4"):
        pair.server.send(Open(5, HEAD))
    assert pair.server.next_stream_id() == 4


@pytest.mark.parametrize("stream_id", [1, 2, 4, 5, 2**32 - 1])
def test_agent_rejects_out_of_order_open(pair: Pair, stream_id: int) -> None:
    pair.open()
    pair.open()
    with pytest.raises(ProtocolError, match="expected 3"):
        pair.agent.receive(encode(Open(stream_id, HEAD)))
    # The refused OPEN changed nothing: 3 is still the next legal id.
    assert pair.agent.receive(encode(Open(3, HEAD))) == Open(3, HEAD)


def test_ids_are_not_reused_after_close(pair: Pair) -> None:
    pair.open(end_stream=True)
    pair.a2s(Response(1, OK, end_stream=True))
    assert pair.server.open_streams == 0
    with pytest.raises(LocalProtocolError):
        pair.server.send(Open(1, HEAD))
    with pytest.raises(ProtocolError):
        pair.agent.receive(encode(Open(1, HEAD)))


def test_too_many_streams() -> None:
    pair = Pair(max_streams=2).handshake()
    pair.open()
    pair.open()
    with pytest.raises(TooManyStreams):
        pair.server.send(Open(3, HEAD))
    assert pair.server.next_stream_id() == 3  # the refused OPEN used no id
    # A peer that ignores the limit is a protocol error on the receiving side.
    with pytest.raises(ProtocolError, match="more than 2"):
        pair.agent.receive(encode(Open(3, HEAD)))
    # Closing one makes room again.
    pair.s2a(Reset(1, frames.RESET_CANCEL))
    pair.s2a(Open(3, HEAD))
    assert pair.server.open_streams == 2 and pair.agent.open_streams == 2


def test_too_many_streams_is_a_local_protocol_error() -> None:
    assert issubclass(TooManyStreams, LocalProtocolError)


# -- direction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [Open(1, HEAD), Welcome(PROTOCOL_VERSION, "s", ())],
    ids=["open", "welcome"],
)
def test_server_never_receives_server_frames(frame: Frame) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(ProtocolError, match="never receives"):
        server.receive(encode(frame))
    agent = Connection(Role.AGENT)
    with pytest.raises(LocalProtocolError, match="never sends"):
        agent.send(frame)


@pytest.mark.parametrize(
    "frame",
    [Response(1, OK), Hello(PROTOCOL_VERSION, ()), TargetUp()],
    ids=["response", "hello", "target-up"],
)
def test_agent_never_receives_agent_frames(frame: Frame) -> None:
    agent = Connection(Role.AGENT)
    with pytest.raises(ProtocolError, match="never receives"):
        agent.receive(encode(frame))
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="never sends"):
        server.send(frame)


def test_errors_say_whose_fault() -> None:
    assert not issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(ProtocolError, LocalProtocolError)
    assert issubclass(FlowControlError, ProtocolError)


# -- window growth (a receiver's policy) ----------------------------------------------------


def _grants(conn: Connection, stream_id: int, times: list[float], size: int) -> list[int]:
    """Take ``size`` body bytes at each of ``times``; the WINDOW increments granted."""
    got = []
    for now in times:
        window = conn.consumed(stream_id, size, now)
        if window is not None:
            frame = decode(window)
            assert isinstance(frame, Window)
            got.append(frame.increment)
    return got


def _receiving(role: Role = Role.AGENT, streams: int = 1) -> Connection:
    conn = Connection(role)
    conn.receive(encode(Welcome(PROTOCOL_VERSION, "s", ())))
    for sid in range(1, streams + 1):
        conn.receive(encode(Open(sid, RequestHead("POST", b"/", ()), end_stream=False)))
    return conn


def test_a_fast_stream_gets_its_window_doubled_up_to_the_maximum() -> None:
    conn = _receiving()
    half = INITIAL_WINDOW // 2
    # Half a window taken every millisecond: the reader keeps up, the window doubles.
    increments = _grants(conn, 1, [i * 0.001 for i in range(200)], half)
    assert increments[0] == half  # the first grant: nothing known yet
    assert max(increments) <= MAX_WINDOW
    windows = [conn._streams[1].window]
    assert windows == [MAX_WINDOW]


def test_a_slow_stream_keeps_the_initial_window() -> None:
    conn = _receiving()
    half = INITIAL_WINDOW // 2
    increments = _grants(conn, 1, [i * 1.0 for i in range(20)], half)  # a second apart
    assert increments == [half] * 20
    assert conn._streams[1].window == INITIAL_WINDOW


def test_growth_is_bounded_per_connection_and_given_back_by_finished_streams() -> None:
    streams = MAX_WINDOW_GROWTH // (MAX_WINDOW - INITIAL_WINDOW) + 2
    conn = _receiving(streams=streams)
    for sid in range(1, streams + 1):
        _grants(conn, sid, [i * 0.001 for i in range(100)], INITIAL_WINDOW // 2)
    grown = sum(s.window - INITIAL_WINDOW for s in conn._streams.values())
    assert grown <= MAX_WINDOW_GROWTH
    assert conn._growth == grown
    conn.receive(encode(Reset(1, 1, "done")))
    assert conn._growth == grown - (MAX_WINDOW - INITIAL_WINDOW)
