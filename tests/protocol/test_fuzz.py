"""Property tests: the decoder and a connection never fail in any way but ProtocolError.

Whatever a peer sends, the server and the agent must get a frame (or None for
a late frame) or a ProtocolError they can turn into a close with code 1002;
any other exception would be an unhandled crash of a connection handler.
"""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_protocol.connection import Connection, Role
from relay_protocol.errors import ProtocolError
from relay_protocol.frames import (
    FRAME_TYPES,
    Data,
    Frame,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    Response,
    Welcome,
    Window,
    decode,
    encode,
)
from relay_protocol.heads import RequestHead, ResponseHead

# Sized so the whole file runs in a few seconds on a laptop (and the suite stays under
# five minutes on CI's two cores); a run with more examples is one edit away.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(FUZZ, max_examples=250)
FEWER = settings(FUZZ, max_examples=150)

# -- strategies for valid frames ------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
tokens = st.text(alphabet=TCHARS, min_size=1, max_size=16)
header_names = tokens.map(str.encode)
header_values = st.binary(max_size=40).map(lambda b: b.translate(None, b"\r\n\x00"))
headers = st.lists(st.tuples(header_names, header_values), max_size=8).map(tuple)
targets = st.binary(max_size=40).map(lambda b: b"/" + bytes(c for c in b if 0x21 <= c <= 0x7E or c >= 0x80))
ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=40)
stream_ids = st.integers(1, 2**32 - 1)

request_heads = st.builds(
    RequestHead,
    method=tokens,
    target=targets,
    headers=headers,
    client=ascii_text,
    event_id=ascii_text,
)
response_heads = st.builds(ResponseHead, status=st.integers(100, 599), headers=headers)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
tunnels = st.lists(
    st.builds(
        lambda name, extra: {**extra, "name": name},
        st.text(max_size=20),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ),
    max_size=16,
).map(tuple)
versions = st.integers(0, 2**16 - 1)

valid_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, versions, tunnels, st.text(max_size=30)),
    st.builds(
        Welcome,
        versions,
        st.text(max_size=30),
        tunnels,
        st.dictionaries(st.text(max_size=10), st.integers(), max_size=4),
    ),
    st.builds(Open, stream_ids, request_heads, st.booleans()),
    st.builds(Response, stream_ids, response_heads, st.booleans()),
    st.builds(Data, stream_ids, st.binary(max_size=200), st.booleans()),
    st.builds(Window, stream_ids, st.integers(1, 2**32 - 1)),
    st.builds(Reset, stream_ids, st.integers(0, 2**16 - 1), st.text(max_size=1024)),
    st.builds(Ping, st.binary(max_size=64)),
    st.builds(Pong, st.binary(max_size=64)),
)


@ROUND_TRIP
@given(valid_frames)
def test_round_trip(frame: Frame) -> None:
    wire = encode(frame)
    assert decode(wire) == frame
    assert encode(decode(wire)) == wire  # one encoding per frame


# -- strategies for hostile messages --------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame's bytes with a few bytes changed, inserted, cut or appended."""
    wire = bytearray(encode(draw(valid_frames)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(0, len(wire)))
        if action == "flip" and pos < len(wire):
            wire[pos] = draw(st.integers(0, 255))
        elif action == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del wire[pos : pos + draw(st.integers(1, 4))]
        elif action == "truncate":
            del wire[pos:]
        else:
            wire += draw(st.binary(min_size=1, max_size=8))
    return bytes(wire)


# A valid frame header followed by random bytes reaches every payload parser.
headed = st.builds(
    lambda code, flags, sid, payload: bytes((code, flags)) + sid.to_bytes(4, "big") + payload,
    st.sampled_from(sorted(FRAME_TYPES)) | st.integers(0, 255),
    st.sampled_from([0, 1]) | st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
)
hostile = st.one_of(st.binary(max_size=300), headed, mutated())


def _decode_or_protocol_error(message: bytes) -> Frame | None:
    try:
        return decode(message)
    except ProtocolError:
        return None


@FUZZ
@given(hostile)
def test_decode_gives_a_frame_or_protocol_error(message: bytes) -> None:
    frame = _decode_or_protocol_error(message)
    if frame is not None:
        assert isinstance(frame, tuple(FRAME_TYPES.values()))
        # Binary frames have one encoding: what was accepted is what the encoder
        # writes. (HELLO and WELCOME carry JSON, which has many spellings.)
        if not isinstance(frame, Hello | Welcome):
            assert encode(frame) == message


@FEWER
@given(st.sampled_from(Role), hostile)
def test_fresh_connection_receive(role: Role, message: bytes) -> None:
    conn = Connection(role)
    try:
        result = conn.receive(message)
    except ProtocolError:
        return
    assert result is None or isinstance(result, tuple(FRAME_TYPES.values()))


# Frames on the few stream ids a live connection uses, so that a sequence of
# them walks the state machines instead of failing at the first frame.
small_ids = st.integers(1, 4)
plausible_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Open, small_ids, request_heads, st.booleans()),
    st.builds(Response, small_ids, response_heads, st.booleans()),
    st.builds(Data, small_ids, st.binary(max_size=50), st.booleans()),
    st.builds(Window, small_ids, st.integers(1, 2**32 - 1)),
    st.builds(Reset, small_ids, st.integers(0, 8)),
    st.builds(Hello, st.just(1), st.just(())),
    st.builds(Welcome, st.just(1), st.just("s"), st.just(())),
    st.builds(Ping),
)
messages = st.lists(plausible_frames.map(encode) | hostile, max_size=20)


@FEWER
@given(st.sampled_from(Role), messages, st.lists(st.integers(0, 2**18), max_size=20))
def test_connection_survives_any_message_sequence(
    role: Role, wires: list[bytes], consumed: list[int]
) -> None:
    conn = Connection(role, max_streams=3)
    for i, wire in enumerate(wires):
        try:
            result = conn.receive(wire)
        except ProtocolError:
            return  # the caller closes the connection here
        assert result is None or isinstance(result, tuple(FRAME_TYPES.values()))
        if isinstance(result, Data) and i < len(consumed):
            grant = conn.consumed(result.stream_id, consumed[i])
            assert grant is None or isinstance(decode(grant), Window)
        assert conn.open_streams <= 3
