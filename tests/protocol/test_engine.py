"""The stream engine, two of them joined back to back: what one queues, the other receives.

Synchronous, with a clock passed by hand: the engine reads no clock and never
awaits, so every rule (chunking under credit and room, PING answers, the
outgoing buffer, the heartbeat, the error state) is checked by moving bytes.
"""

from __future__ import annotations

import pytest

from relay_protocol import Engine, Role
from relay_protocol.errors import (
    BadHead,
    ConnectionFailed,
    HeadTooLarge,
    LocalProtocolError,
    ProtocolError,
    StreamClosed,
    TooManyStreams,
)
from relay_protocol.frames import (
    RESET_CANCEL,
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
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    INITIAL_WINDOW,
    MAX_DATA_SIZE,
    MAX_HEAD_SIZE,
    PROTOCOL_VERSION,
    SEND_TIMEOUT,
)

HEAD = RequestHead("POST", b"/hook", ((b"Content-Type", b"application/json"),), "127.0.0.1")
OK = ResponseHead(200, ())
BIG = 1 << 30  # a high-water mark no test reaches: credit alone limits


def drain(src: Engine, dst: Engine, now: float = 0.0) -> list[Frame]:
    """Send everything ``src`` queued to ``dst``; the frames ``dst`` returned (None dropped)."""
    got = []
    while (data := src.outgoing()) is not None:
        src.sent()
        frame = dst.receive(data, now)
        if frame is not None:
            got.append(frame)
    return got


def queued(engine: Engine) -> list[Frame]:
    """Decode what ``engine`` has queued, without taking it."""
    return [decode(data) for data, _ in engine._frames]


def pair(high_water: int = BIG, now: float = 0.0) -> tuple[Engine, Engine]:
    server = Engine(Role.SERVER, now, high_water=high_water)
    agent = Engine(Role.AGENT, now, high_water=high_water)
    agent.send(Hello(PROTOCOL_VERSION, ({"name": "alice"},)), now)
    drain(agent, server, now)
    server.send(Welcome(PROTOCOL_VERSION, "s", ({"name": "alice"},)), now)
    drain(server, agent, now)
    return server, agent


# -- chunking under credit -------------------------------------------------------------


def test_a_body_is_cut_into_data_frames_within_the_credit() -> None:
    server, agent = pair()
    sid = server.open(HEAD, end_stream=False, now=0.0)
    body = bytes(range(256)) * 1200  # 307,200 bytes: more than one window
    taken = server.send_data(sid, body, end=True, now=0.0)
    assert taken == INITIAL_WINDOW  # all the credit, not a byte more
    frames = drain(server, agent)
    sizes = [len(f.data) for f in frames if isinstance(f, Data)]
    assert sizes == [MAX_DATA_SIZE] * 4  # cut at MAX_DATA_SIZE
    assert not any(f.end_stream for f in frames if isinstance(f, Data))  # END not sent yet
    assert server.credit(sid) == 0
    assert server.send_data(sid, body[taken:], end=True, now=0.0) == 0  # nothing while no credit

    agent.consumed(sid, INITIAL_WINDOW, now=0.0)
    window = drain(agent, server)
    assert window == [Window(sid, INITIAL_WINDOW)]
    rest = memoryview(body)[taken:]
    assert server.send_data(sid, rest, end=True, now=0.0) == len(rest)
    frames += drain(server, agent)
    data = [f for f in frames if isinstance(f, Data)]
    assert b"".join(f.data for f in data) == body  # every byte, in order
    assert data[-1].end_stream and not any(f.end_stream for f in data[:-1])


def test_a_chunk_within_the_credit_is_one_frame_and_not_copied() -> None:
    server, _ = pair()
    sid = server.open(HEAD, end_stream=False, now=0.0)
    chunk = b"x" * 1000
    assert server.send_data(sid, chunk, end=False, now=0.0) == 1000
    assert queued(server)[-1] == Data(sid, chunk)
    assert server._frames[-1][0][6:] == chunk


def test_an_empty_end_needs_neither_credit_nor_room() -> None:
    server, _agent = pair(high_water=1)
    sid = server.open(HEAD, end_stream=False, now=0.0)  # the buffer is now over its mark
    assert not server.has_room
    assert server.send_data(sid, b"", end=False, now=0.0) == 0
    assert server.send_data(sid, b"", end=True, now=0.0) == 0
    assert queued(server)[-1] == Data(sid, b"", end_stream=True)


def test_data_stops_at_the_high_water_mark() -> None:
    server, agent = pair(high_water=2 * MAX_DATA_SIZE)
    sid = server.open(HEAD, end_stream=False, now=0.0)
    body = b"y" * INITIAL_WINDOW
    taken = server.send_data(sid, body, end=True, now=0.0)
    assert taken == 2 * MAX_DATA_SIZE  # credit was left: the room stopped it
    assert not server.has_room
    assert server.send_data(sid, body[taken:], end=True, now=0.0) == 0
    drain(server, agent)
    assert server.has_room and server.buffered == 0
    assert server.send_data(sid, body[taken:], end=True, now=0.0) == len(body) - taken
    frames = drain(server, agent)
    assert frames[-1] == Data(sid, b"y" * MAX_DATA_SIZE, end_stream=True)


def test_the_agent_cuts_its_response_the_same_way() -> None:
    server, agent = pair()
    sid = server.open(HEAD, end_stream=True, now=0.0)
    drain(server, agent)
    agent.respond(sid, OK, end_stream=False, now=0.0)
    body = b"z" * (INITIAL_WINDOW + 10)
    assert agent.send_data(sid, body, end=True, now=0.0) == INITIAL_WINDOW
    frames = drain(agent, server)
    assert frames[0] == Response(sid, OK)
    assert [len(f.data) for f in frames[1:] if isinstance(f, Data)] == [MAX_DATA_SIZE] * 4


def test_sending_on_a_reset_stream_is_stream_closed() -> None:
    server, agent = pair()
    sid = server.open(HEAD, end_stream=False, now=0.0)
    drain(server, agent)
    assert agent.reset(sid, RESET_CANCEL, "gone", now=0.0)
    assert drain(agent, server) == [Reset(sid, RESET_CANCEL, "gone")]
    with pytest.raises(StreamClosed):
        server.send_data(sid, b"late", end=True, now=0.0)
    assert not server.reset(sid, RESET_CANCEL, "again", now=0.0)  # nothing to reset
    assert server.outgoing() is None
    with pytest.raises(StreamClosed):
        agent.respond(sid, OK, end_stream=True, now=0.0)


def test_sending_after_this_side_ended_is_a_local_error() -> None:
    server, _agent = pair()
    sid = server.open(HEAD, end_stream=False, now=0.0)
    server.send_data(sid, b"a", end=True, now=0.0)
    with pytest.raises(LocalProtocolError) as caught:
        server.send_data(sid, b"b", end=False, now=0.0)
    assert not isinstance(caught.value, StreamClosed)  # a bug in the caller, not a race


# -- PING and PONG ------------------------------------------------------------------------


def test_a_ping_is_answered_with_its_payload() -> None:
    server, agent = pair()
    server.send(Ping(b"t1"), now=0.0)
    assert drain(server, agent) == []  # nothing for the caller to do
    assert queued(agent) == [Pong(b"t1")]
    assert drain(agent, server) == []  # a PONG needs nothing either


def test_at_most_one_pong_is_owed() -> None:
    _server, agent = pair()
    for payload in (b"1", b"2", b"3"):
        agent.receive(encode(Ping(payload)), now=0.0)
    assert queued(agent) == [Pong(b"1")]  # a peer pinging faster than it reads grows nothing
    assert agent.buffered == len(encode(Pong(b"1")))
    agent.sent()
    agent.receive(encode(Ping(b"4")), now=0.0)
    assert queued(agent) == [Pong(b"4")]  # the PONG left: the next PING is answered


def test_a_pong_behind_other_frames_is_still_owed() -> None:
    server, agent = pair()
    sid = server.open(HEAD, end_stream=True, now=0.0)
    drain(server, agent)
    agent.receive(encode(Ping(b"a")), now=0.0)
    agent.respond(sid, OK, end_stream=False, now=0.0)
    agent.sent()  # the PONG left; the RESPONSE waits
    agent.receive(encode(Ping(b"b")), now=0.0)
    assert queued(agent) == [Response(sid, OK), Pong(b"b")]
    agent.receive(encode(Ping(b"c")), now=0.0)
    assert queued(agent) == [Response(sid, OK), Pong(b"b")]


# -- the outgoing buffer -----------------------------------------------------------------


def test_the_buffer_counts_bytes_and_remembers_when_its_oldest_frame_came() -> None:
    server, _ = pair()
    assert server.outgoing() is None and server.oldest_queued() is None and server.buffered == 0
    sid = server.open(HEAD, end_stream=False, now=5.0)
    server.send_data(sid, b"x" * 100, end=False, now=7.0)
    server.send(Ping(b""), now=9.0)
    sizes = [len(encode(f)) for f in queued(server)]
    assert server.buffered == sum(sizes)
    assert server.oldest_queued() == 5.0
    first = server.outgoing()
    assert first is not None and decode(first).head == HEAD  # type: ignore[union-attr]
    assert server.outgoing() is first and server.buffered == sum(sizes)  # stays until sent
    server.sent()
    assert server.oldest_queued() == 7.0 and server.buffered == sum(sizes[1:])
    server.sent()
    server.sent()
    assert server.oldest_queued() is None and server.buffered == 0 and server.outgoing() is None
    server.sent()  # nothing left: harmless


def test_control_frames_never_wait_for_room() -> None:
    server, _agent = pair(high_water=1)
    sid = server.open(HEAD, end_stream=False, now=0.0)
    assert not server.has_room
    server.consumed(sid, 0, now=0.0)
    assert server.reset(sid, RESET_CANCEL, "", now=0.0)
    server.receive(encode(Ping(b"p")), now=0.0)
    assert [type(f) for f in queued(server)] == [type(queued(server)[0]), Reset, Pong]


# -- the heartbeat -----------------------------------------------------------------------


def test_the_heartbeat_pings_when_due_and_not_while_a_frame_waits() -> None:
    server, _agent = pair(now=0.0)
    assert not server.heartbeat(1.0).ping
    beat = server.heartbeat(HEARTBEAT_INTERVAL)
    assert beat.ping and queued(server) == [Ping(b"")]
    # The PING is still waiting at the next deadline: no second one behind it.
    assert not server.heartbeat(2 * HEARTBEAT_INTERVAL).ping
    assert queued(server) == [Ping(b"")]


def test_a_silent_peer_is_dead_and_the_engine_then_refuses_use() -> None:
    server, agent = pair(now=0.0)
    agent.receive(encode(Ping(b"")), now=HEARTBEAT_TIMEOUT - 1)  # a sign of life from the server
    drain(agent, server, now=HEARTBEAT_TIMEOUT - 1)
    assert not server.heartbeat(HEARTBEAT_TIMEOUT).dead  # the PONG just came
    assert server.outgoing() is not None  # the PING then due leaves; no answer ever comes
    server.sent()
    beat = server.heartbeat(2 * HEARTBEAT_TIMEOUT)
    assert beat.dead and not beat.stuck
    assert server.error is not None and "heartbeat" in server.error
    with pytest.raises(ConnectionFailed):
        server.open(HEAD, end_stream=True, now=0.0)


def test_a_peer_that_does_not_read_is_stuck_at_the_send_timeout_however_much_it_talks() -> None:
    server, _agent = pair(now=0.0)
    server.open(HEAD, end_stream=True, now=1.0)  # never taken by the transport
    for t in range(2, int(SEND_TIMEOUT)):
        server.receive(encode(Ping(b"")), now=float(t))  # the agent talks all the time
        assert not server.heartbeat(float(t)).dead
    beat = server.heartbeat(1.0 + SEND_TIMEOUT)
    assert beat.dead and beat.stuck
    assert server.outgoing() is None and server.buffered == 0  # the error state drops the buffer


# -- the error state --------------------------------------------------------------------------


def test_after_a_local_failure_every_call_is_refused_and_nothing_is_half_done() -> None:
    server, _agent = pair()
    sid = server.open(HEAD, end_stream=False, now=0.0)
    data = server.outgoing()
    assert data is not None
    server.fail("send failed half-way")  # the writer's websocket send broke mid-frame
    assert server.error == "send failed half-way"
    assert server.outgoing() is None and server.buffered == 0 and server.oldest_queued() is None
    server.sent()  # the writer finishing its broken send: harmless
    for call in (
        lambda: server.open(HEAD, end_stream=True, now=0.0),
        lambda: server.send_data(sid, b"x", end=True, now=0.0),
        lambda: server.send(Ping(b""), now=0.0),
        lambda: server.receive(encode(Ping(b"")), now=0.0),
    ):
        with pytest.raises(ConnectionFailed):
            call()
    assert not server.reset(sid, RESET_CANCEL, "", now=0.0)  # never raises
    server.consumed(sid, INITIAL_WINDOW, now=0.0)  # nothing to grant on a dead connection
    assert server.outgoing() is None
    assert not server.is_open(sid)
    server.fail("again")
    assert server.error == "send failed half-way"  # the first reason is kept


def test_a_peer_protocol_error_puts_the_engine_in_the_error_state() -> None:
    _server, agent = pair()
    with pytest.raises(ProtocolError):
        agent.receive(encode(Data(7, b"never opened")), now=0.0)
    assert agent.error is not None
    with pytest.raises(ConnectionFailed):
        agent.receive(encode(Ping(b"")), now=0.0)
    with pytest.raises(ConnectionFailed):
        agent.send(TargetUp(), now=0.0)


def test_the_first_frame_must_be_the_handshake() -> None:
    server = Engine(Role.SERVER, 0.0)
    with pytest.raises(ProtocolError, match="expected HELLO, got Ping"):
        server.receive(encode(Ping(b"x")), now=0.0)
    assert server.outgoing() is None  # no PONG before the handshake
    agent = Engine(Role.AGENT, 0.0)
    with pytest.raises(ProtocolError, match="expected WELCOME"):
        agent.receive(encode(Ping(b"x")), now=0.0)


# -- a head that cannot travel spends no stream id --------------------------------------------


def _too_big_head() -> RequestHead:
    # What issue 8 sent: a target, headers and a Host each near the ingress limits.
    headers = tuple((b"X-Pad-%d" % i, b"v" * 8000) for i in range(9))
    return RequestHead("GET", b"/" + b"p" * 8000, headers, "203.0.113.7")


def test_a_head_too_big_raises_a_local_error_and_spends_no_stream_id() -> None:
    server, agent = pair()
    first = server.open(HEAD, end_stream=True, now=0.0)
    before = server.buffered
    with pytest.raises(HeadTooLarge) as caught:
        server.open(_too_big_head(), end_stream=True, now=0.0)
    assert isinstance(caught.value, BadHead) and not isinstance(caught.value, ProtocolError)
    assert caught.value.part == "headers"  # what the ingress answers: 431
    assert server.buffered == before and server.open_streams == 1  # nothing queued, nothing opened
    second = server.open(HEAD, end_stream=True, now=0.0)
    assert (first, second) == (1, 2)
    # The agent takes both OPENs: no "OPEN on stream 3, expected 2" for the tunnel.
    frames = drain(server, agent)
    assert [getattr(f, "stream_id", None) for f in frames] == [1, 2]
    assert agent.error is None and server.error is None


def test_the_head_just_within_the_limit_travels() -> None:
    server, agent = pair()
    pad = MAX_HEAD_SIZE - len(encode(Response(1, ResponseHead(200, ((b"X", b""),))))) + 6
    head = ResponseHead(200, ((b"X", b"v" * pad),))
    sid = server.open(HEAD, end_stream=True, now=0.0)
    drain(server, agent)
    agent.respond(sid, head, end_stream=True, now=0.0)
    assert drain(agent, server) == [Response(sid, head, end_stream=True)]
    sid = server.open(HEAD, end_stream=True, now=0.0)
    drain(server, agent)
    with pytest.raises(HeadTooLarge):
        agent.respond(sid, ResponseHead(200, ((b"X", b"v" * (pad + 1)),)), end_stream=True, now=0.0)
    # The stream is as it was: a 502 head can still be sent on it.
    agent.respond(sid, ResponseHead(502, ()), end_stream=True, now=0.0)
    assert drain(agent, server) == [Response(sid, ResponseHead(502, ()), end_stream=True)]


def test_too_many_streams_spends_no_id_either() -> None:
    server = Engine(Role.SERVER, 0.0, max_streams=1)
    assert server.open(HEAD, end_stream=False, now=0.0) == 1
    with pytest.raises(TooManyStreams):
        server.open(HEAD, end_stream=False, now=0.0)
    assert server.reset(1, RESET_CANCEL, "", now=0.0)
    assert server.open(HEAD, end_stream=False, now=0.0) == 2


# -- a head carrying its body (the "inline-body" feature) -----------------------------


def inline_pair() -> tuple[Engine, Engine]:
    server, agent = pair()
    server.inline_bodies = agent.inline_bodies = True
    return server, agent


def test_a_small_request_and_its_answer_cross_in_one_frame_each() -> None:
    server, agent = inline_pair()
    sid = server.open(HEAD, True, 0.0, body=b'{"a":1}')
    assert queued(server) == [Open(sid, HEAD, end_stream=True, body=b'{"a":1}')]
    assert drain(server, agent) == [Open(sid, HEAD, end_stream=True, body=b'{"a":1}')]
    agent.respond(sid, OK, True, 0.0, body=b"ok")
    assert drain(agent, server) == [Response(sid, OK, end_stream=True, body=b"ok")]
    # Both halves ended with the heads: nothing is left of the stream on either side.
    assert not server.is_open(sid) and not agent.is_open(sid)
    assert server.open_streams == agent.open_streams == 0


def test_a_peer_that_did_not_list_inline_body_gets_the_body_in_data() -> None:
    server, agent = pair()  # the feature is off on both
    sid = server.open(HEAD, True, 0.0, body=b"hello")
    assert drain(server, agent) == [Open(sid, HEAD), Data(sid, b"hello", end_stream=True)]
    agent.respond(sid, OK, False, 0.0, body=b"ok")
    assert drain(agent, server) == [Response(sid, OK), Data(sid, b"ok")]
    assert server.is_open(sid)  # the answer's end is still to come


def test_a_body_that_does_not_fit_beside_its_head_follows_in_data() -> None:
    server, agent = inline_pair()
    big_head = RequestHead("POST", b"/", ((b"X-Pad", b"p" * 60_000),))
    body = b"x" * 10_000
    sid = server.open(big_head, True, 0.0, body=body)
    assert drain(server, agent) == [Open(sid, big_head), Data(sid, body, end_stream=True)]


def test_a_body_in_a_head_spends_credit_as_data_does() -> None:
    server, agent = inline_pair()
    sid = server.open(HEAD, False, 0.0, body=b"x" * 1000)  # more of the body follows
    drain(server, agent)
    assert server.credit(sid) == INITIAL_WINDOW - 1000
    agent.respond(sid, OK, False, 0.0, body=b"y" * 300)
    drain(agent, server)
    assert agent.credit(sid) == INITIAL_WINDOW - 300
    # Taken off the receiver's hands, the head's body bytes are granted back like DATA's.
    agent.consumed(sid, INITIAL_WINDOW // 2 - 1000, 0.0)
    assert drain(agent, server) == []
    server.send_data(sid, b"x" * (INITIAL_WINDOW - 1000), False, 0.0)
    drain(server, agent)
    agent.consumed(sid, INITIAL_WINDOW // 2 + 1000, 0.0)
    assert [type(f) for f in drain(agent, server)] == [Window]


def test_a_body_over_one_data_frame_is_refused_with_nothing_spent() -> None:
    server, agent = inline_pair()
    with pytest.raises(LocalProtocolError, match="body bytes with a head"):
        server.open(HEAD, True, 0.0, body=b"x" * (MAX_DATA_SIZE + 1))
    assert server.open_streams == 0 and queued(server) == []
    sid = server.open(HEAD, True, 0.0, body=b"x")
    assert sid == 1  # no stream id was spent
    drain(server, agent)
    with pytest.raises(LocalProtocolError, match="body bytes with a head"):
        agent.respond(sid, OK, True, 0.0, body=b"x" * (MAX_DATA_SIZE + 1))
    agent.respond(sid, OK, True, 0.0, body=b"x" * MAX_DATA_SIZE)  # with its head, over one frame
    assert drain(agent, server) == [Response(sid, OK), Data(sid, b"x" * MAX_DATA_SIZE, end_stream=True)]
