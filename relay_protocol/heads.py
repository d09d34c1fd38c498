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


def _check_headers(headers: Headers) -> None:
    """Raises ``BadHead`` (a local error): heads are checked where they are built."""
    if len(headers) > MAX_HEADER_COUNT:
        raise HeadTooLarge(f"{len(headers)} headers, over the limit of {MAX_HEADER_COUNT}", "headers")
    for name, value in headers:
        if not TOKEN.match(name):
            raise BadHead(f"invalid header name {name[:64]!r}")
        if _BAD_VALUE.search(value):
            raise BadHead(f"invalid value for header {name.decode('ascii')}")
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            raise HeadTooLarge(f"header {name[:64].decode('ascii')} over {MAX_FIELD} bytes", "headers")


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


class _Reader:
    """Reads length-prefixed fields from a payload; any overrun is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def integer(self, size: int) -> int:
        end = self._pos + size
        if end > len(self._data):
            raise ProtocolError("truncated head")
        value = int.from_bytes(self._data[self._pos : end], "big")
        self._pos = end
        return value

    def field(self, len_size: int) -> bytes:
        length = self.integer(len_size)
        end = self._pos + length
        if end > len(self._data):
            raise ProtocolError("truncated head")
        value = self._data[self._pos : end]
        self._pos = end
        return value

    def text(self, len_size: int) -> str:
        try:
            return self.field(len_size).decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError("non-ASCII text in head") from exc

    def headers(self) -> Headers:
        count = self.integer(2)
        if count > MAX_HEADER_COUNT:
            raise FrameTooLarge(f"{count} headers, over the limit of {MAX_HEADER_COUNT}")
        return tuple((self.field(2), self.field(2)) for _ in range(count))

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError("trailing bytes after head")


def _field(value: bytes, len_size: int) -> bytes:
    return len(value).to_bytes(len_size, "big") + value


def _encode_headers(headers: Headers) -> bytes:
    parts = [len(headers).to_bytes(2, "big")]
    for name, value in headers:
        parts.append(_field(name, 2))
        parts.append(_field(value, 2))
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


def decode_request_head(payload: bytes) -> RequestHead:
    reader = _Reader(_received(payload))
    method = reader.text(1)
    target = reader.field(2)
    client = reader.text(1)
    event_id = reader.text(1)
    headers = reader.headers()
    reader.finish()
    try:
        return RequestHead(method, target, headers, client, event_id)
    except HeadTooLarge as exc:  # built from the peer's bytes: its fault
        raise FrameTooLarge(str(exc)) from exc
    except BadHead as exc:
        raise ProtocolError(str(exc)) from exc


def encode_response_head(head: ResponseHead) -> bytes:
    """The RESPONSE payload. Raises ``HeadTooLarge`` over ``MAX_HEAD_SIZE`` (local)."""
    payload = head.status.to_bytes(2, "big") + _encode_headers(head.headers)
    if len(payload) > MAX_HEAD_SIZE:
        message = f"response head of {len(payload)} bytes, over the limit of {MAX_HEAD_SIZE}"
        raise HeadTooLarge(message, "headers")
    return payload


def decode_response_head(payload: bytes) -> ResponseHead:
    reader = _Reader(_received(payload))
    status = reader.integer(2)
    headers = reader.headers()
    reader.finish()
    try:
        return ResponseHead(status, headers)
    except HeadTooLarge as exc:  # built from the peer's bytes: its fault
        raise FrameTooLarge(str(exc)) from exc
    except BadHead as exc:
        raise ProtocolError(str(exc)) from exc
