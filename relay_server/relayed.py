"""The responses the relay writes to public clients, as aiohttp's ``StreamResponse``
subclasses: the head of one it passes on is exactly the local service's, and each counts
the body bytes it sent (for the access log and the metrics).

A module of its own, and never compiled (setup.py): mypyc compiles classes that extend
aiohttp's only as the interpreter's, and not with two bases.

A relay must not invent or re-encode headers (README, HTTP fidelity). aiohttp's
``_prepare_headers`` (its hook between building a head and writing it) adds ``Content-Type:
application/octet-stream`` to a body without one, and ``Server`` with its name and
version to every response; its ``write_headers`` encodes header strings as UTF-8, which
turns an obs-text byte (``caf\\xe9``) into two. ``Date`` stays: a proxy forwarding a
response without one must add it (RFC 9110 6.6.1). The fidelity tests (raw sockets)
catch any change to aiohttp's hooks.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

#: The response whose head went out, if any: what the client got if it leaves before the end.
STARTED = web.RequestKey("relay.started", web.StreamResponse)
#: Headers aiohttp adds to a head that lacks them, and a relayed head keeps only if sent.
ADDED = ("Content-Type", "Server")


class ExactHead(web.StreamResponse):
    """A response (or a websocket's 101) whose head is written as the local service sent
    it. Header strings hold one latin-1 character per byte of the service's."""

    async def _prepare_headers(self) -> None:
        sent = [name for name in ADDED if name in self.headers]
        await super()._prepare_headers()
        for name in ADDED:
            if name not in sent:
                self.headers.popall(name, None)

    async def _write_headers(self) -> None:
        """Write the head as latin-1 bytes: byte for byte. aiohttp's own
        ``write_headers`` still runs (its hooks, its checks), then its buffer is replaced."""
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        status_line = f"HTTP/{request.version[0]}.{request.version[1]} {self.status} {self.reason}"
        await writer.write_headers(status_line, self.headers)
        if getattr(writer, "_headers_buf", None) is not None:
            writer._headers_buf = serialize_head(status_line, self.headers)  # type: ignore[attr-defined]
        if self._send_headers_immediately:
            writer.send_headers()


def serialize_head(status_line: str, headers: CIMultiDict[str]) -> bytes:
    """``status_line`` and ``headers`` as they go on the wire, each character one byte."""
    lines = [status_line, *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


class CountedResponse(web.StreamResponse):
    """A streamed response that counts the body bytes written (``sent``) and notes itself
    on its request once its head is written (``STARTED``)."""

    sent = 0

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        if isinstance(request, web.Request):
            request[STARTED] = self
        return writer

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await super().write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        self.sent += len(data)
        await super().write_eof(data)


class RelayedResponse(ExactHead, CountedResponse):
    """A response carrying exactly the local service's head (``relayed.ExactHead``)."""

    #: The head waits for the first body bytes, to leave in one write with them; the
    #: ingress sends it alone (``send_head``) when no body bytes are there yet.
    _send_headers_immediately = False

    def send_head(self) -> None:
        """Send the head now if it still waits (a body that has not arrived yet, an
        event stream: the client must see the head without waiting for it)."""
        if self._payload_writer is not None:
            self._payload_writer.send_headers()
