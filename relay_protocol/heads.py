"""Request and response heads: what travels in OPEN and RESPONSE frames.

Header names and values are kept as bytes, in order, with repeats, so what the
public client sent reaches the local service byte for byte (and back).

Whose fault: a head built on this side (from a public request, or from the
local app's answer) that the protocol cannot carry raises ``BadHead`` or
``HeadTooLarge``, local errors the caller answers with a 4xx (or 502); the
same defects in a head the peer sent raise ``ProtocolError`` or
``FrameTooLarge`` from the decoder, and end the connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadHead, FrameTooLarge, HeadTooLarge, ProtocolError
from .limits import MAX_HEAD_SIZE, MAX_HEADER_COUNT

Headers = tuple[tuple[bytes, bytes], ...]

# RFC 9110 token: the characters a method or header name may use.
# Patterns end in \Z, not $: "$" also matches before a trailing "\n".
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values may not carry CR, LF or NUL: they would split or end the head.
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
# An origin-form target (RFC 9112 3.2.1): starts with "/", no whitespace or controls.
_TARGET = re.compile(rb"^/[\x21-\x7e\x80-\xff]*\Z")
#: Longest method: a u8 length on the wire, and no real method comes near it.
MAX_METHOD = 32
#: Longest client address or event id: a u8 length on the wire.
MAX_SHORT_FIELD = 255
#: Longest target, header name or header value: a u16 length on the wire.
MAX_FIELD = 0xFFFF


#: The bytes a header name may hold (the token characters above), for ``bytes.translate``.
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _check_headers(headers: Headers) -> None:
    """Raises ``BadHead`` (a local error): heads are checked where they are built.

    All names and all values are checked at once (a scan of each joined together, in
    C); only a head that fails is walked header by header, to name the culprit. Names
    and values are gathered by two comprehensions: with ``zip(*headers)`` a webhook's head
    took 1.8 us compiled, with these 1.2 us, and the same plain (docs/performance.md)."""
    if len(headers) > MAX_HEADER_COUNT:
        raise HeadTooLarge(f"{len(headers)} headers, over the limit of {MAX_HEADER_COUNT}", "headers")
    names = [name for name, _ in headers]
    values = [value for _, value in headers]
    joined_names, joined_values = b"".join(names), b"".join(values)
    if (
        not all(names)
        or joined_names.translate(None, _TOKEN_BYTES)
        or b"\r" in joined_values
        or b"\n" in joined_values
        or b"\0" in joined_values
        or (len(joined_names) > MAX_FIELD and max(map(len, names)) > MAX_FIELD)
        or (len(joined_values) > MAX_FIELD and max(map(len, values)) > MAX_FIELD)
    ):
        _name_the_bad_header(headers)


def _name_the_bad_header(headers: Headers) -> None:
    """Raise ``BadHead`` or ``HeadTooLarge`` for the first header the protocol cannot carry."""
    for name, value in headers:
        if not TOKEN.match(name):
            raise BadHead(f"invalid header name {name[:64]!r}")
        if _BAD_VALUE.search(value):
            raise BadHead(f"invalid value for header {name.decode('ascii')}")
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            raise HeadTooLarge(f"header {name[:64].decode('ascii')} over {MAX_FIELD} bytes", "headers")
    raise AssertionError("no bad header found")  # the two checks disagree: a bug here


@dataclass(frozen=True)
class RequestHead:
    """The head of a request the server forwards to the agent.

    ``target`` is the origin-form request target (path and query) exactly as
    the public client sent it, after the ``/t/NAME`` prefix was removed.
    ``client`` is the public client's address; ``event_id`` is empty for a
    live request.

    Raises ``BadHead`` (``HeadTooLarge`` for sizes) if the protocol cannot
    carry it; ``encode`` may still find the whole head over ``MAX_HEAD_SIZE``.
    """

    method: str
    target: bytes
    headers: Headers
    client: str = ""
    event_id: str = ""

    def __post_init__(self) -> None:
        if not TOKEN.match(self.method.encode("ascii", "replace")) or len(self.method) > MAX_METHOD:
            raise BadHead(f"invalid method {self.method[:MAX_METHOD]!r}")
        if not _TARGET.match(self.target):
            raise BadHead("request target must be origin-form (start with '/')")
        if len(self.target) > MAX_FIELD:
            raise HeadTooLarge(f"request target of {len(self.target)} bytes, over {MAX_FIELD}", "target")
        if not (self.client.isascii() and self.event_id.isascii()):
            raise BadHead("client address and event id must be ASCII")
        if len(self.client) > MAX_SHORT_FIELD:
            raise HeadTooLarge(f"client address over {MAX_SHORT_FIELD} bytes", "client")
        if len(self.event_id) > MAX_SHORT_FIELD:
            raise HeadTooLarge(f"event id over {MAX_SHORT_FIELD} bytes", "event id")
        _check_headers(self.headers)


@dataclass(frozen=True)
class ResponseHead:
    """The head of the local service's response, sent back by the agent.

    Raises ``BadHead`` as ``RequestHead`` does.
    """

    status: int
    headers: Headers

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise BadHead(f"invalid status {self.status}")
        _check_headers(self.headers)


def _read_headers(data: bytes, pos: int) -> tuple[Headers, int]:
    """The headers field of a head at ``pos``: a u16 count, then each name and value as
    a u16 length and its bytes; and the position after it. Raises ``ProtocolError``
    (truncated) or ``FrameTooLarge`` (too many)."""
    try:
        count = data[pos] << 8 | data[pos + 1]
        if count > MAX_HEADER_COUNT:
            raise FrameTooLarge(f"{count} headers, over the limit of {MAX_HEADER_COUNT}")
        pos += 2
        headers = []
        for _ in range(count):
            name_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
            value_end = name_end + 2 + (data[name_end] << 8 | data[name_end + 1])
            headers.append((data[pos + 2 : name_end], data[name_end + 2 : value_end]))
            pos = value_end
    except IndexError:
        raise ProtocolError("truncated head") from None
    if pos > len(data):  # a slice past the end is cut short, not an error
        raise ProtocolError("truncated head")
    return tuple(headers), pos


def _rest(data: bytes, pos: int, body: bool) -> bytes:
    """What follows a head that ends at ``pos``: nothing, or with ``body`` (the frame's
    BODY flag) one or more body bytes. Raises ``ProtocolError`` otherwise."""
    if not body:
        if pos < len(data):
            raise ProtocolError("trailing bytes after head")
        return b""
    if pos == len(data):
        raise ProtocolError("BODY flag on a head with no body bytes after it")
    return data[pos:]


def _read_field(data: bytes, pos: int, len_size: int) -> tuple[bytes, int]:
    """The field at ``pos`` (a ``len_size``-byte length, then its bytes), and the position
    after it. Raises ``ProtocolError`` if it is cut short."""
    end = pos + len_size + int.from_bytes(data[pos : pos + len_size], "big")
    if end > len(data) or pos + len_size > len(data):
        raise ProtocolError("truncated head")
    return data[pos + len_size : end], end


def _read_text(data: bytes, pos: int) -> tuple[str, int]:
    """An ASCII field with a u8 length, as ``_read_field``."""
    field, pos = _read_field(data, pos, 1)
    if not field.isascii():
        raise ProtocolError("non-ASCII text in head")
    return field.decode("ascii"), pos


def _field(value: bytes, len_size: int) -> bytes:
    return len(value).to_bytes(len_size, "big") + value


def _encode_headers(headers: Headers) -> bytes:
    parts = [len(headers).to_bytes(2, "big")]
    for name, value in headers:
        parts += (len(name).to_bytes(2, "big"), name, len(value).to_bytes(2, "big"), value)
    return b"".join(parts)


def _received(payload: bytes) -> bytes:
    if len(payload) > MAX_HEAD_SIZE:
        raise FrameTooLarge(f"head of {len(payload)} bytes, over the limit of {MAX_HEAD_SIZE}")
    return payload


def encode_request_head(head: RequestHead) -> bytes:
    """The OPEN payload. Raises ``HeadTooLarge`` over ``MAX_HEAD_SIZE`` (a local
    error: the head was built on this side); ``part`` is ``"target"`` when the
    target is most of it (answer 414), else ``"headers"`` (431)."""
    payload = (
        _field(head.method.encode("ascii"), 1)
        + _field(head.target, 2)
        + _field(head.client.encode("ascii"), 1)
        + _field(head.event_id.encode("ascii"), 1)
        + _encode_headers(head.headers)
    )
    if len(payload) > MAX_HEAD_SIZE:
        part = "target" if 2 * len(head.target) > len(payload) else "headers"
        raise HeadTooLarge(f"request head of {len(payload)} bytes, over the limit of {MAX_HEAD_SIZE}", part)
    return payload


def decode_request_head(payload: bytes, body: bool = False) -> tuple[RequestHead, bytes]:
    """The head an OPEN payload carries, and with ``body`` (the BODY flag) the body
    bytes after it (else b""). Raises ``ProtocolError`` or ``FrameTooLarge``."""
    data = _received(payload)
    method, pos = _read_text(data, 0)
    target, pos = _read_field(data, pos, 2)
    client, pos = _read_text(data, pos)
    event_id, pos = _read_text(data, pos)
    headers, pos = _read_headers(data, pos)
    rest = _rest(data, pos, body)
    try:
        return RequestHead(method, target, headers, client, event_id), rest
    except HeadTooLarge as exc:  # built from the peer's bytes: its fault
        raise FrameTooLarge(str(exc)) from exc
    except BadHead as bad_head:
        raise ProtocolError(str(bad_head)) from bad_head


def response_head_size(head: ResponseHead) -> int:
    """Bytes of ``head``'s RESPONSE payload, counted without building it."""
    return 4 + sum(4 + len(name) + len(value) for name, value in head.headers)


def check_response_head_size(head: ResponseHead) -> None:
    """Raise ``HeadTooLarge`` (local) if ``head`` is over ``MAX_HEAD_SIZE`` encoded: what
    ``encode_response_head`` will say, found before the head is queued, without encoding it."""
    if (size := response_head_size(head)) > MAX_HEAD_SIZE:
        raise HeadTooLarge(f"response head of {size} bytes, over the limit of {MAX_HEAD_SIZE}", "headers")


def encode_response_head(head: ResponseHead) -> bytes:
    """The RESPONSE payload. Raises ``HeadTooLarge`` over ``MAX_HEAD_SIZE`` (local)."""
    check_response_head_size(head)
    return head.status.to_bytes(2, "big") + _encode_headers(head.headers)


def decode_response_head(payload: bytes, body: bool = False) -> tuple[ResponseHead, bytes]:
    """The head a RESPONSE payload carries, and its body bytes as ``decode_request_head``."""
    data = _received(payload)
    if len(data) < 2:
        raise ProtocolError("truncated head")
    status = data[0] << 8 | data[1]
    headers, pos = _read_headers(data, 2)
    rest = _rest(data, pos, body)
    try:
        return ResponseHead(status, headers), rest
    except HeadTooLarge as exc:  # built from the peer's bytes: its fault
        raise FrameTooLarge(str(exc)) from exc
    except BadHead as bad_head:
        raise ProtocolError(str(bad_head)) from bad_head
