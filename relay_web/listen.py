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
import socket
import ssl

from aiohttp import web

#: Connections waiting to be accepted, per listening socket: asyncio's and aiohttp's default.
BACKLOG = 128


def authority(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (RFC 3986 3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_sockets(host: str | None, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Non-blocking sockets listening on ``port`` at every address ``host`` resolves to
    (None or "": every interface), as ``loop.create_server`` makes them: ``SO_REUSEADDR``,
    IPv6 sockets IPv6 only. Raises ``OSError`` (``socket.gaierror`` for a name that does
    not resolve, ``EADDRINUSE``, ``EACCES``...) with every socket made so far closed."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Site(web.SockSite):
    """aiohttp's ``SockSite``, with a bound on the TLS handshake: asyncio's default is
    60 s, and a connection reaches the application's protocol (the connection guard,
    its head timeout) only once its handshake is done."""

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
        self._server = await asyncio.get_running_loop().create_server(
            server,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self.handshake if self._ssl_context is not None else None,
        )


async def start_sites(
    runner: web.BaseRunner,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 60.0,
) -> list[web.SockSite]:
    """Serve ``runner`` on ``listening_sockets(host, port)``, one site each; the sites.
    ``handshake_timeout``: seconds a TLS client has to finish its handshake. Raises
    ``OSError`` as ``listening_sockets`` does; the sites started before a failure stay
    the runner's (its ``cleanup`` stops them), the other sockets are closed."""
    sockets = listening_sockets(host, port)
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
