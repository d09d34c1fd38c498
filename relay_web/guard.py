"""What a stranger's connection to one of relay's aiohttp servers may cost (the relay
server's public port, the agent's inspector): caps on open connections, a head-read
timeout, descriptors kept free.

aiohttp keeps a connection that never completes its request head for its keep-alive
timeout (an hour by default) and accepts connections until ``accept()`` fails with
EMFILE. ``GuardedAppRunner`` serves an application through ``GuardedRequestHandler``,
which is admitted by a ``ConnectionGuard`` (total and per client address) and closed
when its head does not arrive in time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import typing
from collections.abc import Callable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger("relay.web")

#: Descriptors kept free below RLIMIT_NOFILE for what is not a public connection: the
#: store, its WAL, logs, and the socket accepted only to be refused.
FD_RESERVE = 64


def busy_response(body: bytes, content_type: str, *headers: bytes) -> bytes:
    """A whole ``503`` answer for a connection over a cap, written before any request
    is read (so not by aiohttp), then the connection is closed: ``headers`` are extra
    ``Name: value`` lines."""
    lines = [
        b"HTTP/1.1 503 Service Unavailable",
        b"Content-Type: " + content_type.encode("ascii"),
        b"Content-Length: " + str(len(body)).encode(),
        *headers,
        b"Retry-After: 1",
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def fd_limit() -> int | None:
    """The soft RLIMIT_NOFILE of this process, or None if unlimited or unknown."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def effective_max_connections(configured: int, limit: int | None = None) -> int:
    """``configured``, lowered so that connections never exhaust the descriptors."""
    limit = fd_limit() if limit is None else limit
    if limit is None:
        return configured
    return max(1, min(configured, limit - FD_RESERVE))


class ConnectionGuard:
    """Counts open connections, total and per client address, against their caps. A
    connection over a cap is sent ``busy_response`` (a whole HTTP response: no request
    was read) and closed; a client address that ``exempt`` accepts (a front proxy
    carrying many clients' connections) has no cap of its own."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_client: int,
        head_timeout: float,
        busy_response: bytes,
        exempt: Callable[[str], bool] = lambda client: False,
    ) -> None:
        self.max_connections = effective_max_connections(max_connections)
        self.max_per_client = max_per_client
        self.head_timeout = head_timeout
        self.busy_response = busy_response
        self.exempt = exempt
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.refused = 0

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``; False (nothing counted) if over a cap."""
        if self.total >= self.max_connections:
            self.refused += 1
            return False
        if self.per_client[client] >= self.max_per_client and not self.exempt(client):
            self.refused += 1
            return False
        self.total += 1
        self.per_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


#: The ``Server`` header of relay's own answers: not aiohttp's default, which names the
#: Python and aiohttp versions to anyone who asks (a review pointed at it).
SERVER_HEADER = "relay"
#: The ``X-Relay-Error`` of an answer aiohttp makes itself, before any handler: a request
#: its HTTP parser refused (400, or 413, 414, 431 for a part too large) or a crash (500).
PARSER_ERRORS = {413: "body-too-large", 414: "uri-too-long", 431: "headers-too-large", 500: "internal-error"}


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, admitted by a guard and bounded in head-read time."""

    def __init__(
        self, manager: Server, guard: ConnectionGuard, admitted: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        #: Counted by the guard already when accepted, before its TLS handshake
        #: (``relay_web.listen``): the count is this handler's once it has the connection.
        self._admitted = admitted
        #: The client whose count this handler gives back when its connection is lost.
        self._client: str | None = None
        #: True once the connection reached this handler: its count is the handler's to give back.
        self.took_over = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_body: StreamReader | None = None  # the body of the last request parsed

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's own answer (a request its parser refused, a crash), with the
        ``X-Relay-Error`` every error of the relay carries (``PARSER_ERRORS``) and its
        ``Server`` (``SERVER_HEADER``)."""
        response = super().handle_error(request, status, exc, message)
        response.headers.setdefault("X-Relay-Error", PARSER_ERRORS.get(status, "bad-request"))
        response.headers["Server"] = SERVER_HEADER
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.took_over = True
        if self._admitted is not None:
            self._client = self._admitted
        else:
            client = client_address(transport)
            if not self._guard.admit(client):
                log.debug("refused a connection from %s: over the connection caps", client)
                # A stream transport (uvloop's is not an asyncio.WriteTransport subclass).
                typing.cast(asyncio.WriteTransport, transport).write(self._guard.busy_response)
                self.force_close()  # closes the transport once the 503 is flushed
                return
            self._client = client
        self._head_timer = self._loop.call_later(self._guard.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and data and self._between_requests():
            # The first bytes of the next head on a kept-alive connection (the last
            # request's body is all in, whether or not its answer is written yet):
            # the head timeout starts again.
            self._head_timer = self._loop.call_later(self._guard.head_timeout, self._head_timed_out)
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:
            # A complete head arrived: from here on the handler's own timeouts apply,
            # and between requests aiohttp's keep-alive timer.
            self._last_body = self._messages[-1][1] if self._messages else None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def _between_requests(self) -> bool:
        """No request is being received: the last one's body (if any) is complete, and the
        connection was not upgraded (then its bytes are websocket frames, not heads)."""
        if self._upgraded or self._payload_parser is not None:
            return False
        return self._last_body is None or self._last_body.is_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._client is not None:
            self._guard.release(self._client)
            self._client = None
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.debug(
            "closing a connection from %s: no request head within %ss", self._client, self._guard.head_timeout
        )
        self.force_close()


class GuardedServer(Server):
    """aiohttp's protocol factory, making ``GuardedRequestHandler``s."""

    def __init__(self, guard: ConnectionGuard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self, admitted: str | None = None) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, self.guard, admitted, loop=self._loop, **self._kwargs)


def client_address(transport: asyncio.BaseTransport) -> str:
    """The peer's address, as the guard counts it ("" if the transport cannot say)."""
    return peer_address(transport.get_extra_info("peername"))


def peer_address(peer: object) -> str:
    """The address of a socket address (``peername``, ``accept()``'s), as the guard
    counts it: "" for what is not an IP socket's."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections go through a ``ConnectionGuard``."""

    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        return GuardedServer(
            self._guard,
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
