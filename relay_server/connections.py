"""What a stranger's connection may cost: caps on open connections, a head-read timeout,
and no log flood when the process runs out of file descriptors.

aiohttp keeps a connection that never completes its request head for its keep-alive
timeout (an hour by default) and accepts connections until ``accept()`` fails with
EMFILE, logging a traceback each time. ``GuardedAppRunner`` serves the application
through ``GuardedRequestHandler``, which is admitted by a ``ConnectionGuard`` (total
and per client address) and closed when its head does not arrive in time.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import resource
import typing
from collections.abc import Iterable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .config import (
    Network,
)

log = logging.getLogger("relay.server")

#: Descriptors kept free below RLIMIT_NOFILE for what is not a public connection: the
#: store, its WAL, logs, and the socket accepted only to be refused.
FD_RESERVE = 64
#: Seconds between two log lines about ``accept()`` failing for lack of descriptors:
#: one line with a count per interval, never a traceback per failure.
ACCEPT_LOG_INTERVAL = 30.0

_BUSY_TEXT = b"the relay server has too many connections; try again later\n"
#: Sent (then the connection is closed) to a connection over a cap; not via aiohttp,
#: as no request was read yet.
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_BUSY_TEXT)).encode() + b"\r\n"
    b"X-Relay-Error: too-many-connections\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" + _BUSY_TEXT
)


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


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trusts(networks: Iterable[Network], address: str) -> bool:
    """True if ``address`` (a peer's IP, as text) lies in one of ``networks``."""
    parsed = parse_address(address)
    return parsed is not None and any(parsed in network for network in networks)


def forwarded_client(trusted: Iterable[Network], peer: str, chain: Iterable[bytes]) -> str:
    """The client a request is from: ``peer``, or, when ``peer`` is a trusted proxy, the
    rightmost entry of its X-Forwarded-For ``chain`` (the header values, in order) that is
    not itself a trusted proxy (entries left of it could be forged). Returns text as
    ``request.remote`` gives it."""
    networks = tuple(trusted)
    if not trusts(networks, peer):
        return peer
    client = peer
    for entry in reversed([item for value in chain for item in value.split(b",")]):
        address = parse_address(entry.decode("latin-1"))
        if address is None:
            break
        client = str(address)
        if not trusts(networks, client):
            break
    return client


def forwarded_for(raw_headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The values of every X-Forwarded-For header, in order."""
    return [value for name, value in raw_headers if name.lower() == b"x-forwarded-for"]


def client_of(request: web.BaseRequest, trusted: Iterable[Network]) -> str:
    """``forwarded_client`` of ``request``."""
    return forwarded_client(trusted, request.remote or "", forwarded_for(request.raw_headers))


#: Headers that say a request was relayed for someone else (lower case).
_FORWARDING = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


def is_local(request: web.BaseRequest, trusted: Iterable[Network]) -> bool:
    """True if ``request`` was made by this host or by a trusted proxy itself, for no one
    else: its peer is a loopback address or in ``trusted``, and it carries no forwarding
    header (``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP``). Who may read /metrics,
    the status and the TLS ask endpoint. A client behind the proxy is never local, whatever
    its address (a proxy's gateway address, a forged or unparsable chain): the proxy
    marks every request it relays, and asks (Caddy's on-demand TLS) without a mark."""
    peer = parse_address(request.remote or "")
    if peer is None or not (peer.is_loopback or trusts(tuple(trusted), str(peer))):
        return False
    return not any(name.lower() in _FORWARDING for name, _ in request.raw_headers)


class ConnectionGuard:
    """Counts open connections, total and per client address, against their caps."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_client: int,
        head_timeout: float,
        exempt: Iterable[Network] = (),
    ) -> None:
        self.max_connections = effective_max_connections(max_connections)
        self.max_per_client = max_per_client
        self.head_timeout = head_timeout
        self.exempt = tuple(exempt)
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.refused = 0

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``; False (nothing counted) if over a cap."""
        if self.total >= self.max_connections:
            self.refused += 1
            return False
        if self.per_client[client] >= self.max_per_client and not trusts(self.exempt, client):
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


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, admitted by a guard and bounded in head-read time."""

    def __init__(self, manager: Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._client: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_body: StreamReader | None = None  # the body of the last request parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._guard.admit(client):
            log.debug("refused a connection from %s: over the connection caps", client)
            # A stream transport (uvloop's is not an asyncio.WriteTransport subclass).
            typing.cast(asyncio.WriteTransport, transport).write(BUSY_RESPONSE)
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

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self.guard, loop=self._loop, **self._kwargs)


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


class AcceptErrorLog:
    """A loop exception handler: "accept() out of system resource" is logged once per
    ``ACCEPT_LOG_INTERVAL`` with a count and no traceback; anything else as asyncio would."""

    def __init__(self, clock: Any = None) -> None:
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept() out of system resource" not in message:
            loop.default_exception_handler(context)
            return
        now = (self._clock or loop.time)()
        if self._last is not None and now - self._last < ACCEPT_LOG_INTERVAL:
            self.suppressed += 1
            return
        exc = context.get("exception")
        log.warning(
            "accept() failed: out of file descriptors (%s); %d more such failures since the last line",
            exc,
            self.suppressed,
        )
        self._last = now
        self.suppressed = 0
