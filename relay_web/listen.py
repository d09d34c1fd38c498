"""Listening sockets made here, not by the event loop: a port that cannot be listened
on is an ``OSError`` raised at once, whatever the loop.

uvloop's ``create_server`` reports a ``listen()`` that fails after ``bind()`` succeeded
to the loop's exception handler, and returns a server whose socket is already closed;
aiohttp's ``TCPSite.start`` then fails with ``AttributeError`` (its ``sockets[0]`` is
None). That happens when another process binds the same port between the two calls,
both with ``SO_REUSEADDR``: seen with several agents started at once, each trying the
inspector's first port, and the agent died at start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any

from aiohttp import web

from .guard import GuardedRequestHandler, GuardedServer, peer_address

log = logging.getLogger("relay.web")

#: Connections waiting to be accepted, per listening socket: asyncio's and aiohttp's default.
BACKLOG = 128


def authority(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (RFC 3986 3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_sockets(host: str | None, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Non-blocking sockets listening on ``port`` at every address ``host`` resolves to
    (None or "": every interface), as ``loop.create_server`` makes them: ``SO_REUSEADDR``,
    IPv6 sockets IPv6 only. Port 0: the kernel picks one for the first address and the
    others listen on the same (tried ``PORT_PICKS`` times if it is taken there). Raises
    ``OSError`` (``socket.gaierror`` for a name that does not resolve, ``EADDRINUSE``,
    ``EACCES``...) with every socket made so far closed."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    infos: list[_AddressInfo] = list(dict.fromkeys(found))
    for attempt in range(1, PORT_PICKS + 1):
        try:
            return _listen(infos, port, backlog)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == PORT_PICKS:
                raise
    raise AssertionError("unreachable")


#: What ``socket.getaddrinfo`` gives for each address.
_AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
#: Times a port picked by the kernel (port 0) is tried on every address before giving up.
PORT_PICKS = 8


def _listen(infos: list[_AddressInfo], port: int, backlog: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # the port the kernel picked for the first
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Site(web.SockSite):
    """aiohttp's ``SockSite``, with bounds on the TLS handshake and shutdown (see
    ``start_sites``); behind a connection guard, TLS connections are accepted by
    ``_TlsAccept``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        ssl_context: ssl.SSLContext | None,
        handshake: float,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self.handshake = handshake

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        if self._ssl_context is not None and isinstance(server, GuardedServer):
            self._server = _TlsAccept(self._sock, server, self._ssl_context, self.handshake)  # type: ignore[assignment]
            return
        self._server = await asyncio.get_running_loop().create_server(
            server,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self.handshake if self._ssl_context is not None else None,
            ssl_shutdown_timeout=self.handshake if self._ssl_context is not None else None,
        )


class _TlsAccept:
    """Accepts TLS connections on a listening socket for a guarded server, counting each
    against the guard as it is accepted, before its handshake. (The loop's own TLS accept
    makes the application's protocol, the guard's count, only once the handshake is done:
    connections that never finish one went uncounted, bounded in time but not in number.)
    A connection over a cap is closed at once (no HTTP answer can be read before TLS); a
    handshake that fails or takes over ``handshake`` seconds gives its count back.

    Has what aiohttp's runner uses of an ``asyncio.Server``: ``sockets`` and ``close``."""

    def __init__(
        self, sock: socket.socket, server: GuardedServer, context: ssl.SSLContext, handshake: float
    ) -> None:
        self.sockets = [sock]
        self._server = server
        self._context = context
        self._handshake = handshake
        self._handshakes: set[asyncio.Task[None]] = set()  # held until done (the loop's are weak)
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket. Handshakes under way go on, as
        with the loop's own server (each is bounded by ``handshake`` seconds)."""
        sock = self.sockets[0]
        if self._paused is not None:
            self._paused.cancel()
        elif sock.fileno() != -1:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def _accept(self) -> None:
        """One connection per loop pass while the listening socket is readable (as uvloop's
        server takes them; asyncio's takes the whole backlog, each counted before any
        handshake or client's close could give a count back): counted, then its
        handshake started."""
        sock = self.sockets[0]
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # none waiting, or it failed before it was accepted
        except OSError as exc:
            if exc.errno in _PENDING_ERRORS:
                return  # that connection's own network error; the next one
            # Out of descriptors or memory (asyncio reports it so, and pauses), or the
            # listening socket broken: say so, pause, try again (never a busy loop).
            message = (
                "accept() out of system resource" if exc.errno in _OUT_OF_RESOURCES else "accept() failed"
            )
            self._loop.call_exception_handler({"message": message, "exception": exc, "socket": sock})
            self._loop.remove_reader(sock.fileno())
            self._paused = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
            return
        conn.setblocking(False)
        client = peer_address(address)
        if not self._server.guard.admit(client):
            log.debug("refused a TLS connection from %s: over the connection caps", client)
            conn.close()
            return
        task = self._loop.create_task(self._start(conn, client))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self.sockets[0].fileno(), self._accept)

    async def _start(self, conn: socket.socket, client: str) -> None:
        """The handshake, then the connection is the guarded server's (counted already)."""
        handler: GuardedRequestHandler | None = None

        def handler_of_this_connection() -> GuardedRequestHandler:
            nonlocal handler
            handler = self._server(admitted=client)
            return handler

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                handler_of_this_connection,
                conn,
                ssl=self._context,
                ssl_handshake_timeout=self._handshake,
                ssl_shutdown_timeout=self._handshake,
            )
        except BaseException as exc:  # a failed or slow handshake, a reset, the loop stopping
            # The loop has closed the socket, or will once its TLS shutdown is done.
            if isinstance(exc, OSError | TimeoutError | asyncio.CancelledError):  # ssl.SSLError too
                log.debug("TLS handshake from %s failed: %r", client, exc)
            else:  # a bug here: every TLS connection would close without a word
                log.exception("TLS connection from %s failed", client)
            if handler is None or not handler.took_over:  # else the handler gives it back
                self._server.guard.release(client)
            if not isinstance(exc, Exception):
                raise


#: accept() errors that a pause may cure (asyncio's list, selector_events.py).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that belong to the connection being accepted (accept(2), Linux: a
#: network error already pending on it), not to the listening socket.
_PENDING_ERRORS = frozenset(
    {
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EPERM,
    }
)
#: Seconds between accept() attempts after an error that is not one connection's
#: (asyncio's constant for running out of descriptors).
ACCEPT_RETRY_DELAY = 1.0


async def start_sites(
    runner: web.BaseRunner,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 60.0,
    sockets: list[socket.socket] | None = None,
) -> list[web.SockSite]:
    """Serve ``runner`` on ``listening_sockets(host, port)`` (or on ``sockets``, made by
    it already), one site each; the sites. ``handshake_timeout``: seconds a TLS client
    has to finish its handshake, and to answer the server's close (close_notify) before
    its connection is dropped (asyncio's defaults: 60 and 30 s). Raises ``OSError`` as
    ``listening_sockets`` does; the sites started before a failure stay the runner's (its
    ``cleanup`` stops them), the other sockets are closed."""
    sockets = sockets or listening_sockets(host, port)
    sites: list[web.SockSite] = []
    for index, sock in enumerate(sockets):
        site = _Site(runner, sock, ssl_context, handshake_timeout)
        try:
            await site.start()
        except BaseException:
            for rest in sockets[index:]:
                rest.close()
            raise
        sites.append(site)
    return sites
