"""Frames against fixed byte strings, both ways, and every decoder rejection.

The byte literals are the wire format: if one of these tests fails, an agent
written against docs/protocol.md no longer talks to this server.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from relay_protocol import frames
from relay_protocol.connection import Connection, Role
from relay_protocol.errors import (
    BadHead,
    BodyDoesNotFit,
    FrameTooLarge,
    HeadTooLarge,
    LocalProtocolError,
    ProtocolError,
)
from relay_protocol.frames import (
    FLAG_END_STREAM,
    FRAME_TYPES,
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
from relay_protocol.heads import RequestHead, ResponseHead, check_response_head_size, response_head_size
from relay_protocol.limits import (
    FRAME_HEADER_SIZE,
    MAX_DATA_SIZE,
    MAX_FRAME_SIZE,
    MAX_HEAD_SIZE,
    MAX_HEADER_COUNT,
)

# (frame, its exact encoding). Each encoding is written as header + payload.
WIRE: list[tuple[Frame, bytes]] = [
    (
        Hello(1, ({"name": "alice"},), "relay-agent/0.1"),
        b"\x01\x00\x00\x00\x00\x00"  # HELLO, no flags, stream 0
        b"\x00\x01"  # version 1
        b'{"agent":"relay-agent/0.1","tunnels":[{"name":"alice"}]}',
    ),
    (
        Welcome(
            1,
            "s1",
            ({"name": "alice", "url": "https://alice.example.com"},),
            {"max_streams": 1000},
        ),
        b"\x02\x00\x00\x00\x00\x00"
        b"\x00\x01"
        b'{"limits":{"max_streams":1000},"session":"s1",'
        b'"tunnels":[{"name":"alice","url":"https://alice.example.com"}]}',
    ),
    (
        Open(
            1,
            RequestHead(
                "POST",
                b"/hook?x=1",
                ((b"Host", b"alice.example.com"), (b"Content-Length", b"2")),
                "203.0.113.7",
                "ev1",
            ),
        ),
        b"\x03\x00\x00\x00\x00\x01"  # OPEN, no flags, stream 1
        b"\x04POST"  # u8 length + method
        b"\x00\x09/hook?x=1"  # u16 length + target
        b"\x0b203.0.113.7"  # u8 length + client
        b"\x03ev1"  # u8 length + event id
        b"\x00\x02"  # u16 header count
        b"\x00\x04Host\x00\x11alice.example.com"
        b"\x00\x0eContent-Length\x00\x012",
    ),
    (
        Open(2, RequestHead("GET", b"/", ()), end_stream=True),
        b"\x03\x01\x00\x00\x00\x02\x03GET\x00\x01/\x00\x00\x00\x00",
    ),
    (
        Response(1, ResponseHead(200, ((b"Content-Type", b"text/plain"),))),
        b"\x04\x00\x00\x00\x00\x01"
        b"\x00\xc8"  # status 200
        b"\x00\x01"
        b"\x00\x0cContent-Type\x00\x0atext/plain",
    ),
    (
        Response(3, ResponseHead(204, ()), end_stream=True),
        b"\x04\x01\x00\x00\x00\x03\x00\xcc\x00\x00",
    ),
    # Between peers that list "inline-body": a head with its body in one frame (BODY, 0x02).
    (
        Open(4, RequestHead("POST", b"/", ()), end_stream=True, body=b'{"a":1}'),
        b'\x03\x03\x00\x00\x00\x04\x04POST\x00\x01/\x00\x00\x00\x00{"a":1}',
    ),
    (
        Response(4, ResponseHead(200, ()), body=b"ok"),
        b"\x04\x02\x00\x00\x00\x04\x00\xc8\x00\x00ok",
    ),
    (Data(1, b"hi"), b"\x05\x00\x00\x00\x00\x01hi"),
    (Data(1, b"", end_stream=True), b"\x05\x01\x00\x00\x00\x01"),
    (Data(0x01020304, b"\x00\xff", end_stream=True), b"\x05\x01\x01\x02\x03\x04\x00\xff"),
    (Window(1, 131072), b"\x06\x00\x00\x00\x00\x01\x00\x02\x00\x00"),
    (Window(0xFFFFFFFF, 0xFFFFFFFF), b"\x06\x00\xff\xff\xff\xff\xff\xff\xff\xff"),
    (Reset(1, frames.RESET_CANCEL, "gone"), b"\x07\x00\x00\x00\x00\x01\x00\x01gone"),
    (Reset(7, frames.RESET_TARGET_ERROR), b"\x07\x00\x00\x00\x00\x07\x00\x04"),
    (Reset(2, frames.RESET_REFUSED, "é"), b"\x07\x00\x00\x00\x00\x02\x00\x05\xc3\xa9"),
    (Ping(b"12345678"), b"\x08\x00\x00\x00\x00\x0012345678"),
    (Ping(), b"\x08\x00\x00\x00\x00\x00"),
    (Pong(b"12345678"), b"\x09\x00\x00\x00\x00\x0012345678"),
    (TargetUp(), b"\x0a\x00\x00\x00\x00\x00"),  # TARGET_UP, no flags, stream 0, no payload
    (
        Welcome(1, "s2", (), {}, ("target-up",)),
        b'\x02\x00\x00\x00\x00\x00\x00\x01{"features":["target-up"],"limits":{},"session":"s2","tunnels":[]}',
    ),
]


@pytest.mark.parametrize(("frame", "wire"), WIRE, ids=lambda v: type(v).__name__)
def test_encode_gives_fixed_bytes(frame: Frame, wire: bytes) -> None:
    assert encode(frame) == wire


@pytest.mark.parametrize(("frame", "wire"), WIRE, ids=lambda v: type(v).__name__)
def test_decode_fixed_bytes(frame: Frame, wire: bytes) -> None:
    assert decode(wire) == frame


def test_every_frame_type_has_a_fixed_encoding() -> None:
    assert {type(frame) for frame, _ in WIRE} == set(FRAME_TYPES.values())


def test_type_codes_are_pinned() -> None:
    assert {code: cls.__name__ for code, cls in FRAME_TYPES.items()} == {
        0x01: "Hello",
        0x02: "Welcome",
        0x03: "Open",
        0x04: "Response",
        0x05: "Data",
        0x06: "Window",
        0x07: "Reset",
        0x08: "Ping",
        0x09: "Pong",
        0x0A: "TargetUp",
    }
    assert FLAG_END_STREAM == 0x01
    assert FRAME_HEADER_SIZE == 6


def test_reset_codes_are_pinned() -> None:
    codes = {name: value for name, value in vars(frames).items() if name.startswith("RESET_")}
    assert codes == {
        "RESET_CANCEL": 1,
        "RESET_TARGET_UNREACHABLE": 2,
        "RESET_TARGET_TIMEOUT": 3,
        "RESET_TARGET_ERROR": 4,
        "RESET_REFUSED": 5,
        "RESET_PROTOCOL": 6,
        "RESET_INTERNAL": 7,
        "RESET_BAD_RESPONSE": 8,
    }


def test_direction_unions() -> None:
    assert set(frames.AGENT_FRAMES) == {Hello, Response, Data, Window, Reset, Ping, Pong, TargetUp}
    assert set(frames.SERVER_FRAMES) == {Welcome, Open, Data, Window, Reset, Ping, Pong}


# -- decoder rejections ---------------------------------------------------------

HEAD_GET = b"\x03GET\x00\x01/\x00\x00"  # method, target, client, event id (no headers yet)


def _open(head_payload: bytes, stream_id: int = 1) -> bytes:
    return b"\x03\x00" + stream_id.to_bytes(4, "big") + head_payload


def _header(name: bytes, value: bytes) -> bytes:
    return len(name).to_bytes(2, "big") + name + len(value).to_bytes(2, "big") + value


REJECTED: dict[str, bytes] = {
    "empty": b"",
    "short frame": b"\x05\x00\x00\x00\x01",
    "unknown type 0x00": b"\x00\x00\x00\x00\x00\x00",
    "unknown type 0x0b": b"\x0b\x00\x00\x00\x00\x00",
    "unknown type 0xff": b"\xff\x00\x00\x00\x00\x01",
    "unknown flag 0x02": b"\x05\x02\x00\x00\x00\x01hi",
    "unknown flag 0x80": b"\x05\x81\x00\x00\x00\x01hi",
    "DATA on stream 0": b"\x05\x00\x00\x00\x00\x00hi",
    "OPEN on stream 0": _open(HEAD_GET + b"\x00\x00", stream_id=0),
    "RESPONSE on stream 0": b"\x04\x00\x00\x00\x00\x00\x00\xc8\x00\x00",
    "WINDOW on stream 0": b"\x06\x00\x00\x00\x00\x00\x00\x00\x00\x01",
    "RESET on stream 0": b"\x07\x00\x00\x00\x00\x00\x00\x01",
    "PING on stream 1": b"\x08\x00\x00\x00\x00\x01",
    "PONG on stream 1": b"\x09\x00\x00\x00\x00\x01",
    "TARGET_UP on stream 1": b"\x0a\x00\x00\x00\x00\x01",
    "TARGET_UP with a payload": b"\x0a\x00\x00\x00\x00\x00x",
    "END on TARGET_UP": b"\x0a\x01\x00\x00\x00\x00",
    "HELLO on stream 1": b'\x01\x00\x00\x00\x00\x01\x00\x01{"tunnels":[]}',
    "WELCOME on stream 1": b'\x02\x00\x00\x00\x00\x01\x00\x01{"session":"s","tunnels":[]}',
    "END on WINDOW": b"\x06\x01\x00\x00\x00\x01\x00\x00\x00\x01",
    "BODY on DATA": b"\x05\x02\x00\x00\x00\x01hi",
    "BODY on WINDOW": b"\x06\x02\x00\x00\x00\x01\x00\x00\x00\x01",
    "BODY on RESET": b"\x07\x02\x00\x00\x00\x01\x00\x01",
    "BODY on PING": b"\x08\x02\x00\x00\x00\x00",
    "flag 0x04": b"\x05\x04\x00\x00\x00\x01hi",
    "OPEN BODY without body bytes": b"\x03\x02\x00\x00\x00\x01" + HEAD_GET + b"\x00\x00",
    "RESPONSE BODY without body bytes": b"\x04\x03\x00\x00\x00\x01\x00\xc8\x00\x00",
    "END on RESET": b"\x07\x01\x00\x00\x00\x01\x00\x01",
    "END on PING": b"\x08\x01\x00\x00\x00\x00",
    "END on HELLO": b'\x01\x01\x00\x00\x00\x00\x00\x01{"tunnels":[]}',
    "WINDOW increment 0": b"\x06\x00\x00\x00\x00\x01\x00\x00\x00\x00",
    "WINDOW payload 3 bytes": b"\x06\x00\x00\x00\x00\x01\x00\x00\x01",
    "WINDOW payload 5 bytes": b"\x06\x00\x00\x00\x00\x01\x00\x00\x00\x01\x00",
    "RESET without code": b"\x07\x00\x00\x00\x00\x01\x00",
    "RESET reason not UTF-8": b"\x07\x00\x00\x00\x00\x01\x00\x01\xff",
    "HELLO without version": b"\x01\x00\x00\x00\x00\x00\x00",
    "HELLO bad JSON": b"\x01\x00\x00\x00\x00\x00\x00\x01{tunnels:[]}",
    "HELLO JSON not UTF-8": b"\x01\x00\x00\x00\x00\x00\x00\x01\xff\xfe\xfd",
    # json.loads takes bytes in UTF-16 and UTF-32 too (it guesses): the protocol says UTF-8.
    "HELLO JSON in UTF-16": b"\x01\x00\x00\x00\x00\x00\x00\x01" + '{"tunnels":[]}'.encode("utf-16-le"),
    "HELLO JSON in UTF-32": b"\x01\x00\x00\x00\x00\x00\x00\x01" + '{"tunnels":[]}'.encode("utf-32"),
    "HELLO JSON after a BOM": b"\x01\x00\x00\x00\x00\x00\x00\x01\xef\xbb\xbf" + b'{"tunnels":[]}',
    "HELLO JSON not an object": b"\x01\x00\x00\x00\x00\x00\x00\x01[]",
    "HELLO nested too deep": b"\x01\x00\x00\x00\x00\x00\x00\x01" + b"[" * 60_000,
    "HELLO without tunnels": b'\x01\x00\x00\x00\x00\x00\x00\x01{"agent":"a"}',
    "HELLO tunnel without name": b'\x01\x00\x00\x00\x00\x00\x00\x01{"tunnels":[{}]}',
    "HELLO tunnel name not str": b'\x01\x00\x00\x00\x00\x00\x00\x01{"tunnels":[{"name":1}]}',
    "HELLO too many tunnels": b"\x01\x00\x00\x00\x00\x00\x00\x01"
    + b'{"tunnels":['
    + b",".join([b'{"name":"a"}'] * 17)
    + b"]}",
    "HELLO agent not str": b'\x01\x00\x00\x00\x00\x00\x00\x01{"tunnels":[],"agent":5}',
    "WELCOME without session": b'\x02\x00\x00\x00\x00\x00\x00\x01{"tunnels":[]}',
    "WELCOME limits not object": b'\x02\x00\x00\x00\x00\x00\x00\x01{"session":"s","tunnels":[],"limits":[]}',
    "WELCOME features not a list": b"\x02\x00\x00\x00\x00\x00\x00\x01"
    b'{"session":"s","tunnels":[],"features":"x"}',
    "WELCOME feature not a string": b"\x02\x00\x00\x00\x00\x00\x00\x01"
    b'{"session":"s","tunnels":[],"features":[1]}',
    "OPEN truncated head": _open(b"\x03GET\x00\x01/\x00\x00\x00"),
    "OPEN field longer than payload": _open(b"\x09GET"),
    "OPEN header truncated": _open(HEAD_GET + b"\x00\x01\x00\x04Ho"),
    "OPEN trailing bytes": _open(HEAD_GET + b"\x00\x00" + b"x"),
    "OPEN empty method": _open(b"\x00\x00\x01/\x00\x00\x00\x00"),
    "OPEN method with space": _open(b"\x04GE T\x00\x01/\x00\x00\x00\x00"),
    "OPEN method ends in LF": _open(b"\x04GET\n\x00\x01/\x00\x00\x00\x00"),
    "OPEN method non-ASCII": _open(b"\x03G\xc9T\x00\x01/\x00\x00\x00\x00"),
    "OPEN absolute-form target": _open(b"\x03GET\x00\x12http://example.com\x00\x00\x00\x00"),
    "OPEN asterisk target": _open(b"\x07OPTIONS\x00\x01*\x00\x00\x00\x00"),
    "OPEN empty target": _open(b"\x03GET\x00\x00\x00\x00\x00\x00"),
    "OPEN target with space": _open(b"\x03GET\x00\x03/ a\x00\x00\x00\x00"),
    "OPEN target ends in LF": _open(b"\x03GET\x00\x03/a\n\x00\x00\x00\x00"),
    "OPEN client non-ASCII": _open(b"\x03GET\x00\x01/\x01\xff\x00\x00\x00"),
    "OPEN empty header name": _open(HEAD_GET + b"\x00\x01" + _header(b"", b"v")),
    "OPEN header name with colon": _open(HEAD_GET + b"\x00\x01" + _header(b"X:Y", b"v")),
    "OPEN header name with space": _open(HEAD_GET + b"\x00\x01" + _header(b"X Y", b"v")),
    "OPEN header name ends in LF": _open(HEAD_GET + b"\x00\x01" + _header(b"X-A\n", b"v")),
    "OPEN header value with CR": _open(HEAD_GET + b"\x00\x01" + _header(b"X-A", b"a\rb")),
    "OPEN header value with LF": _open(HEAD_GET + b"\x00\x01" + _header(b"X-A", b"a\nb")),
    "OPEN header value with NUL": _open(HEAD_GET + b"\x00\x01" + _header(b"X-A", b"a\x00b")),
    "OPEN header value ends in LF": _open(HEAD_GET + b"\x00\x01" + _header(b"X-A", b"a\n")),
    "RESPONSE truncated": b"\x04\x00\x00\x00\x00\x01\x00",
    "RESPONSE status 99": b"\x04\x00\x00\x00\x00\x01\x00\x63\x00\x00",
    "RESPONSE status 600": b"\x04\x00\x00\x00\x00\x01\x02\x58\x00\x00",
    "RESPONSE trailing bytes": b"\x04\x00\x00\x00\x00\x01\x00\xc8\x00\x00\x00",
    "RESPONSE header value with LF": b"\x04\x00\x00\x00\x00\x01\x00\xc8\x00\x01"
    + _header(b"Location", b"/a\r\nSet-Cookie: x=1"),
}


@pytest.mark.parametrize("message", REJECTED.values(), ids=REJECTED.keys())
def test_decoder_rejects(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(message)


def _too_many_headers() -> bytes:
    count = MAX_HEADER_COUNT + 1
    return _open(HEAD_GET + count.to_bytes(2, "big") + _header(b"A", b"") * count)


TOO_LARGE: dict[str, bytes] = {
    "over MAX_FRAME_SIZE": b"\x08\x00\x00\x00\x00\x00" + b"x" * (MAX_FRAME_SIZE - 5),
    "oversized DATA": b"\x05\x00\x00\x00\x00\x01" + b"x" * (MAX_DATA_SIZE + 1),
    "oversized head": _open(b"x" * (MAX_HEAD_SIZE + 1)),
    "too many headers": _too_many_headers(),
    "header count claims 65535": _open(HEAD_GET + b"\xff\xff"),
}


@pytest.mark.parametrize("message", TOO_LARGE.values(), ids=TOO_LARGE.keys())
def test_decoder_rejects_over_limits(message: bytes) -> None:
    with pytest.raises(FrameTooLarge):
        decode(message)


def test_largest_frames_are_accepted() -> None:
    data = b"\x05\x01\x00\x00\x00\x01" + b"x" * MAX_DATA_SIZE
    assert len(data) == MAX_FRAME_SIZE
    assert decode(data) == Data(1, b"x" * MAX_DATA_SIZE, end_stream=True)
    headers = tuple((b"A", b"") for _ in range(MAX_HEADER_COUNT))
    frame = Open(1, RequestHead("GET", b"/", headers))
    assert decode(encode(frame)) == frame


def test_attacker_sends_a_huge_frame() -> None:
    # A peer claims nothing and sends 16 MiB in one websocket message: the
    # decoder refuses it on its length alone, before parsing a byte of it.
    huge = b"\x05\x00\x00\x00\x00\x01" + bytes(16 * 1024 * 1024)
    with pytest.raises(FrameTooLarge, match="over"):
        decode(huge)
    # Through a connection, at any point of its life, the same.
    with pytest.raises(FrameTooLarge):
        Connection(Role.AGENT).receive(huge)
    with pytest.raises(FrameTooLarge):
        Connection(Role.SERVER).receive(b"\x01\x00\x00\x00\x00\x00\x00\x01" + b" " * MAX_FRAME_SIZE)


# -- encoder refusals: this side must not produce what the peer would reject ----


def test_encoder_refuses_oversized_data() -> None:
    # This side's mistake, not the peer's: a local error.
    with pytest.raises(LocalProtocolError):
        encode(Data(1, b"x" * (MAX_DATA_SIZE + 1)))


def test_encoder_refuses_oversized_head() -> None:
    headers = tuple((b"X", b"v" * 1000) for _ in range(70))
    with pytest.raises(HeadTooLarge) as caught:
        encode(Open(1, RequestHead("GET", b"/", headers)))
    assert caught.value.part == "headers"  # the ingress answers 431
    assert not isinstance(caught.value, ProtocolError)  # built here: never the peer's fault


@pytest.mark.parametrize("count", [0, 1, 62, 63])
def test_a_response_heads_size_is_counted_as_the_encoder_makes_it(count: int) -> None:
    # The agent checks an app's response head with the count (not a second encoding);
    # 63 headers of 1,050 bytes are over MAX_HEAD_SIZE (64 KiB), 62 are not.
    head = ResponseHead(200, tuple((b"X-%d" % i, b"v" * (1046 - len(b"X-%d" % i))) for i in range(count)))
    assert response_head_size(head) == 4 + count * 1050
    if response_head_size(head) <= MAX_HEAD_SIZE:
        check_response_head_size(head)
        assert len(encode(Response(1, head))) - FRAME_HEADER_SIZE == response_head_size(head)
    else:
        with pytest.raises(HeadTooLarge):
            check_response_head_size(head)
        with pytest.raises(HeadTooLarge):
            encode(Response(1, head))


def test_encoder_says_when_the_target_made_the_head_too_large() -> None:
    with pytest.raises(HeadTooLarge) as caught:
        encode(Open(1, RequestHead("GET", b"/" + b"a" * 60_000, ((b"X", b"v" * 6000),))))
    assert caught.value.part == "target"  # the ingress answers 414


def test_head_fields_over_their_length_prefix_are_refused_when_built() -> None:
    with pytest.raises(HeadTooLarge) as caught:
        RequestHead("GET", b"/" + b"a" * 0xFFFF, ())
    assert caught.value.part == "target"
    with pytest.raises(HeadTooLarge):
        RequestHead("GET", b"/", ((b"X", b"v" * 0x10000),))
    with pytest.raises(HeadTooLarge):
        ResponseHead(200, ((b"X", b"v" * 0x10000),))


BAD_HEADS = {
    "absolute-form target": lambda: RequestHead("GET", b"http://x/", ()),
    "target ends in LF": lambda: RequestHead("GET", b"/a\n", ()),
    "method ends in LF": lambda: RequestHead("GET\n", b"/", ()),
    "non-ASCII method": lambda: RequestHead("GÉT", b"/", ()),
    "header name ends in LF": lambda: RequestHead("GET", b"/", ((b"X-A\n", b"v"),)),
    "header value with CRLF": lambda: RequestHead("GET", b"/", ((b"X-A", b"v\r\nX-B: w"),)),
    "non-ASCII client": lambda: RequestHead("GET", b"/", (), client="é"),
    "non-ASCII event id": lambda: RequestHead("GET", b"/", (), event_id="é"),
    "status 1000": lambda: ResponseHead(1000, ()),
}


@pytest.mark.parametrize("make", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_heads_validate_themselves(make: Callable[[], object]) -> None:
    # Refused when built, so this side can never encode what the peer would reject;
    # a head built here comes from public input or the local app: a local error
    # (the caller answers 4xx or 502), never the peer-fault ProtocolError.
    with pytest.raises(BadHead) as caught:
        make()
    assert not isinstance(caught.value, ProtocolError)


def test_head_limits_when_built_locally() -> None:
    with pytest.raises(HeadTooLarge):
        RequestHead("GET", b"/", tuple((b"A", b"") for _ in range(MAX_HEADER_COUNT + 1)))
    with pytest.raises(HeadTooLarge):
        RequestHead("GET", b"/", (), client="1" * 256)


def test_the_same_defects_from_the_peer_are_its_fault() -> None:
    # Bytes a head built here may not hold, received from the peer: ProtocolError.
    with pytest.raises(ProtocolError):
        decode(_open(HEAD_GET + b"\x00\x01" + _header(b"X-A", b"a\nb")))
    with pytest.raises(FrameTooLarge):
        decode(_too_many_headers())


def test_reset_reason_is_truncated_on_encode() -> None:
    wire = encode(Reset(1, frames.RESET_INTERNAL, "x" * 5000))
    assert wire == b"\x07\x00\x00\x00\x00\x01\x00\x07" + b"x" * frames.MAX_RESET_REASON


def test_welcome_features_are_optional() -> None:
    # A server from before features sends none: the agent sees an empty tuple.
    old = b'\x02\x00\x00\x00\x00\x00\x00\x01{"session":"s","tunnels":[]}'
    assert decode(old) == Welcome(1, "s", ())
    assert decode(old).features == ()  # type: ignore[union-attr]
    # Unknown features are kept, for the agent to ignore.
    new = b'\x02\x00\x00\x00\x00\x00\x00\x01{"session":"s","tunnels":[],"features":["x","target-up"]}'
    assert decode(new) == Welcome(1, "s", (), {}, ("x", "target-up"))
    # Without features the encoding is the same bytes as before they existed.
    assert b"features" not in encode(Welcome(1, "s", ()))


def test_worked_example_in_docs_matches_the_encoder() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    block = re.search(r"As one hex string:\n\n```\n(.*?)```", doc, re.S)
    assert block is not None, "docs/protocol.md lost its worked OPEN example"
    head = RequestHead(
        "POST",
        b"/hook?x=1",
        ((b"Host", b"alice.relay.example.com"), (b"Content-Type", b"application/json")),
        "203.0.113.7",
        "evt_1",
    )
    assert bytes.fromhex("".join(block.group(1).split())) == encode(Open(1, head))


def test_every_cut_of_a_head_is_a_protocol_error() -> None:
    # The head decoders read fields by index and slice (a slice past the end is cut
    # short, silently): every prefix of a valid OPEN and RESPONSE, and every one with a
    # byte too many, must be refused as a ProtocolError, never another exception nor a
    # head read from what is not there.
    headers = (
        (b"Host", b"alice.example"),
        (b"X-Hub-Signature-256", b"sha256=" + b"a" * 64),
        (b"X-Empty", b""),
    )
    frames = [
        encode(Open(7, RequestHead("POST", b"/hook?x=1", headers, "192.0.2.1", "evt_1"))),
        encode(Response(7, ResponseHead(201, headers))),
    ]
    for frame in frames:
        assert decode(frame)
        for cut in range(6, len(frame)):
            with pytest.raises(ProtocolError):
                decode(frame[:cut])
        with pytest.raises(ProtocolError, match="trailing"):
            decode(frame + b"\x00")


def test_a_head_carrying_a_body_cut_inside_the_head_is_a_protocol_error() -> None:
    # With BODY, the bytes after the head are the body: a cut inside the body is a
    # shorter body, a cut inside the head is refused as any truncated head is.
    head = RequestHead("POST", b"/hook", ((b"Content-Type", b"application/json"),), "192.0.2.1")
    frame = encode(Open(1, head, end_stream=True, body=b"{}"))
    head_end = len(frame) - 2
    assert decode(frame[: head_end + 1]) == Open(1, head, end_stream=True, body=b"{")
    for cut in range(6, head_end + 1):
        with pytest.raises(ProtocolError):
            decode(frame[:cut])


def test_a_head_and_body_over_one_frame_are_refused_before_anything_is_encoded() -> None:
    head = ResponseHead(200, ((b"X-Pad", b"p" * 1000),))
    body = b"x" * (MAX_DATA_SIZE - 1000)
    with pytest.raises(BodyDoesNotFit):
        encode(Response(1, head, body=body))
    fits = Response(1, head, body=body[: MAX_DATA_SIZE - len(encode(Response(1, head))) + 6])
    assert len(encode(fits)) == MAX_FRAME_SIZE
    assert decode(encode(fits)) == fits


def test_a_bad_header_is_named_whichever_check_finds_it() -> None:
    # Headers are checked all at once; the error still names the first bad one.
    good = (b"X-A", b"1")
    for bad, message in [
        ((b"X B", b"v"), "invalid header name b'X B'"),
        ((b"", b"v"), "invalid header name b''"),
        ((b"X-C", b"a\rb"), "invalid value for header X-C"),
        ((b"X-C", b"a\x00"), "invalid value for header X-C"),
        ((b"X-C", b"v" * 0x10000), "header X-C over 65535 bytes"),
    ]:
        with pytest.raises(BadHead, match=re.escape(message)):
            ResponseHead(200, (good, bad, good))
    assert ResponseHead(200, (good, (b"X-Long", b"v" * 0xFFFF), (b"X-D", b"v" * 0xFFFF))).status == 200
