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

import socket
import ssl

from aiohttp import web

#: Connections waiting to be accepted, per listening socket: asyncio's and aiohttp's default.
BACKLOG = 128


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


async def start_sites(
    runner: web.BaseRunner, host: str | None, port: int, ssl_context: ssl.SSLContext | None = None
) -> list[web.SockSite]:
    """Serve ``runner`` on ``listening_sockets(host, port)``, one ``SockSite`` each; the
    sites. Raises ``OSError`` as ``listening_sockets`` does; the sites started before a
    failure stay the runner's (its ``cleanup`` stops them), the other sockets are closed."""
    sockets = listening_sockets(host, port)
    sites = []
    for index, sock in enumerate(sockets):
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            for rest in sockets[index:]:
                rest.close()
            raise
        sites.append(site)
    return sites
