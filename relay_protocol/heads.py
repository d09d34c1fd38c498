"""Request and response heads: what travels in OPEN and RESPONSE frames.

Header names and values are kept as bytes, in order, with repeats, so what the
public client sent reaches the local service byte for byte (and back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FrameTooLarge, ProtocolError
from .limits import MAX_HEAD_SIZE, MAX_HEADER_COUNT

Headers = tuple[tuple[bytes, bytes], ...]

# RFC 9110 token: the characters a method or header name may use.
# Patterns end in \Z, not $: "$" also matches before a trailing "\n".
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values may not carry CR, LF or NUL: they would split or end the head.
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
# An origin-form target (RFC 9112 3.2.1): starts with "/", no whitespace or controls.
_TARGET = re.compile(rb"^/[\x21-\x7e\x80-\xff]*\Z")


def _check_headers(headers: Headers) -> None:
    if len(headers) > MAX_HEADER_COUNT:
        raise FrameTooLarge(f"{len(headers)} headers, over the limit of {MAX_HEADER_COUNT}")
    for name, value in headers:
        if not _TOKEN.match(name):
            raise ProtocolError(f"invalid header name {name[:64]!r}")
        if _BAD_VALUE.search(value):
            raise ProtocolError(f"invalid value for header {name.decode('ascii')}")


@dataclass(frozen=True)
class RequestHead:
    """The head of a request the server forwards to the agent.

    ``target`` is the origin-form request target (path and query) exactly as
    the public client sent it, after the ``/t/NAME`` prefix was removed.
    ``client`` is the public client's address; ``event_id`` is empty for a
    live request.
    """

    method: str
    target: bytes
    headers: Headers
    client: str = ""
    event_id: str = ""

    def __post_init__(self) -> None:
        if not _TOKEN.match(self.method.encode("ascii", "replace")) or len(self.method) > 32:
            raise ProtocolError(f"invalid method {self.method[:32]!r}")
        if not _TARGET.match(self.target):
            raise ProtocolError("request target must be origin-form (start with '/')")
        if not (self.client.isascii() and self.event_id.isascii()):
            raise ProtocolError("client address and event id must be ASCII")
        if len(self.client) > 255 or len(self.event_id) > 255:
            raise FrameTooLarge("client address or event id over 255 bytes")
        _check_headers(self.headers)


@dataclass(frozen=True)
class ResponseHead:
    """The head of the local service's response, sent back by the agent."""

    status: int
    headers: Headers

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ProtocolError(f"invalid status {self.status}")
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


def _checked(payload: bytes) -> bytes:
    if len(payload) > MAX_HEAD_SIZE:
        raise FrameTooLarge(f"head of {len(payload)} bytes, over the limit of {MAX_HEAD_SIZE}")
    return payload


def encode_request_head(head: RequestHead) -> bytes:
    return _checked(
        _field(head.method.encode("ascii"), 1)
        + _field(head.target, 2)
        + _field(head.client.encode("ascii"), 1)
        + _field(head.event_id.encode("ascii"), 1)
        + _encode_headers(head.headers)
    )


def decode_request_head(payload: bytes) -> RequestHead:
    reader = _Reader(_checked(payload))
    method = reader.text(1)
    target = reader.field(2)
    client = reader.text(1)
    event_id = reader.text(1)
    headers = reader.headers()
    reader.finish()
    return RequestHead(method, target, headers, client, event_id)


def encode_response_head(head: ResponseHead) -> bytes:
    return _checked(head.status.to_bytes(2, "big") + _encode_headers(head.headers))


def decode_response_head(payload: bytes) -> ResponseHead:
    reader = _Reader(_checked(payload))
    status = reader.integer(2)
    headers = reader.headers()
    reader.finish()
    return ResponseHead(status, headers)
