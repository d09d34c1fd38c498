"""aiohttp's client made to send a request head byte for byte: what the agent's
WebSocket upgrades to the local service go through (every other request goes through
``client.py``, which writes a head as the bytes it is given).

A module of its own, and never compiled (setup.py): ``_ExactHeaders`` extends multidict's
``CIMultiDict``, a C type, which a class compiled by mypyc cannot extend (the agent
crashed on the first upgrade when it did).

aiohttp's client cannot send a head as it came: its session merges header names
that differ only in case (``X-Dup: 1`` then ``x-dup: 2`` leaves ``x-dup: 2``), and
it writes every name and value as UTF-8 (``caf\\xe9`` read as latin-1 leaves as
``caf\\xc3\\xa9``). So a forwarded request carries its headers past the session (a
context variable read by ``ExactRequest``) in an ``_ExactHeaders``, which
``_serialize_headers`` writes as latin-1: one character, one byte, as received.
A websocket upgrade goes the same way: ``ws_connect`` hands its own handshake
headers (Upgrade, Connection, Sec-WebSocket-Key/Version/Protocol) to the request,
and ``ExactRequest`` appends those the forwarded head lacks after it.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import aiohttp.http_writer
from multidict import CIMultiDict

from relay_protocol.heads import Headers

# RFC 9110 5.5: a field value may not hold controls other than HTAB (nor DEL).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: The head a forward sends, read by ``ExactRequest`` (set around ``ws_connect``).
exact_headers: contextvars.ContextVar[Headers | None] = contextvars.ContextVar(
    "relay_exact_headers", default=None
)


class UnsendableHead(ValueError):
    """A header holds a byte HTTP forbids (a control character)."""


class _ExactHeaders(CIMultiDict[str]):
    """Headers whose names and values are latin-1 text: each character is one byte of the wire."""


class ExactRequest(aiohttp.ClientRequest):
    """A client request whose headers, when a forward set them, are exactly those, in order,
    followed by any the caller (``ws_connect``'s handshake) gave that they lack."""

    def update_headers(self, headers: Any) -> None:
        exact = exact_headers.get()
        if exact is None:
            super().update_headers(headers)
            return
        self.headers = _ExactHeaders()
        for name, value in exact:
            self.headers.add(name.decode("latin-1"), value.decode("latin-1"))
        own = headers.items() if isinstance(headers, Mapping) else (headers or ())
        for name, value in list(own):
            if name not in self.headers:
                self.headers.add(name, value)
        if "Host" not in self.headers:
            host = self.url.host_port_subcomponent
            assert host is not None  # an absolute URL: always the target's
            self.headers["Host"] = host


_aiohttp_serialize_headers = aiohttp.http_writer._serialize_headers


def _serialize_headers(status_line: str, headers: Any) -> bytes:
    """aiohttp's header serializer, except that ``_ExactHeaders`` are written as latin-1
    and the request line keeps the target's bytes (``Target.url_for``)."""
    if type(headers) is not _ExactHeaders:
        return _aiohttp_serialize_headers(status_line, headers)
    lines = [status_line.encode("utf-8", "surrogateescape")]
    for name, value in headers.items():
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1"))
    if any(_CONTROL.search(text) for pair in headers.items() for text in pair) or _CONTROL.search(
        status_line
    ):
        # As aiohttp's own serializer: never split a head or end it early.
        raise UnsendableHead("a control character in a header")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def install_exact_serializer() -> None:
    # StreamWriter.write_headers looks the serializer up in its module at each call.
    aiohttp.http_writer._serialize_headers = _serialize_headers
