"""The agent's pooled connections to the local service: which addresses a name means,
which pooled connections are still alive, how TLS to the local service is checked, and
what a failed connect says.

- **Names.** ``localhost`` and ``*.localhost`` are the loopback addresses of both families,
  ``::1`` then ``127.0.0.1``, whatever ``/etc/hosts`` says (RFC 6761 section 6.3; curl and
  the browsers do the same): Node.js 17+ and other dev servers bind ``localhost`` to ``::1``
  alone, while many systems map the name to ``127.0.0.1`` alone. Any other name means every
  address ``getaddrinfo`` gives, without ``AI_ADDRCONFIG`` (which drops ``::1`` on a host with
  no global IPv6 address). The connector tries them all, IPv6 and IPv4 interleaved, a new
  attempt every 250 ms or at once when one fails (happy eyeballs, RFC 8305).
- **Stale keep-alive connections.** A local service closes idle connections on its own
  clock (gunicorn after 2 s, Node and uvicorn 5 s, some apps 1 s); a request written on a
  connection at the moment the service closes it fails though the service is up, and
  whether the service read it cannot be known. So the agent never keeps a connection
  idle for ``REUSE_IDLE`` seconds: it closes it first, before any common service would,
  and the next request opens a new one (on loopback, a fraction of a millisecond). A
  connection that carries steady traffic is reused as long as it lives. The idle timeout a
  service advertises (``Keep-Alive: timeout=5``: Node, Apache) is not followed, on
  purpose: kept that long, a connection can be written to just as the service's timer is
  due, and a service stalled then (a breakpoint, a long handler) closes it unread on
  resuming: a live webhook lost (502) for a gain of under a millisecond per webhook
  (tried, docs/performance.md). A new connection waits in the listen queue instead.
  And before a pooled connection is handed to a request its socket is peeked: end of
  file, a reset, or bytes nobody asked for (a ``408`` before the close, a TLS alert) mean
  the service has closed it, and the next pooled one or a new connection is taken
  instead; nothing was written on it, so nothing can reach the service twice.
- **TLS.** The local hop is the user's own machine: by default the local service's
  certificate is not verified (as ngrok does for local upstreams: dev servers use
  self-signed and dev-CA certificates), and ``connect`` says so once; ``--forward-ca FILE``
  verifies against that CA, ``--forward-verify`` against the system's store.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import select
import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.tracing import Trace

from .target import Target

#: The loopback addresses ``localhost`` means, IPv6 first as getaddrinfo orders them
#: (RFC 6761 6.3: "localhost" names resolve to loopback addresses, never the network).
LOOPBACK = ("::1", "127.0.0.1")
#: Seconds between the start of two connection attempts to the addresses of one name
#: (RFC 8305 section 5's recommended "Connection Attempt Delay").
HAPPY_EYEBALLS_DELAY = 0.25
#: Seconds a connection to the local service may stay idle and still be reused: below
#: the shortest idle timeouts of common servers (gunicorn's 2 s, Node's and uvicorn's 5 s)
#: and of apps that set 1 s, so the agent closes an idle connection before they do.
REUSE_IDLE = 0.5
#: First byte of a TLS handshake record: a session ticket a TLS 1.3 server may send after
#: the handshake is no sign that the connection was closed (RFC 8446 5.1, content type 22).
_TLS_HANDSHAKE = 0x16


def is_localhost(host: str) -> bool:
    """True for ``localhost`` and its subdomains, in any case, with or without the final dot."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class LocalResolver(AbstractResolver):
    """Every address of a name, both families; ``localhost`` is always ``::1`` and ``127.0.0.1``."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        if is_localhost(host):
            return [_result(host, address, port) for address in LOOPBACK]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        results: list[ResolveResult] = []
        for info_family, _, _, _, sockaddr in infos:
            address = str(sockaddr[0])
            if info_family == socket.AF_INET6 and len(sockaddr) > 3 and sockaddr[3]:
                address = f"{address}%{sockaddr[3]}"  # a link-local address keeps its scope
            result = _result(host, address, port)
            if result not in results:
                results.append(result)
        return results

    async def close(self) -> None:
        pass


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(
        hostname=host, host=address, port=port, family=family, proto=0, flags=socket.AI_NUMERICHOST
    )


async def addresses(host: str, port: int) -> list[tuple[str, int]]:
    """The (address, port) pairs a connect to ``host:port`` tries, in order. Raises
    ``OSError`` (``socket.gaierror``) if the name does not resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return [(r["host"], r["port"]) for r in await LocalResolver().resolve(host, port)]
    return [(host, port)]


def closed_by_peer(transport: asyncio.BaseTransport | None) -> bool:
    """True if the peer has closed this idle connection (or said something unasked),
    read without consuming anything; False if it looks alive or cannot be told."""
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is None:
        return False  # not a socket: aiohttp's own check (the transport's state) stands
    # Asked first, as most are idle and open: poll(2) says so in 0.6 us, where the peek
    # below raises BlockingIOError and takes 4.2 us (once per reused connection: 6 % of
    # the agent's instructions per live request, docs/performance.md). poll, as select(2)
    # refuses descriptors over 1023, which an agent holding many tunnels reaches.
    readiness = select.poll()
    readiness.register(raw.fileno(), select.POLLIN)
    if not readiness.poll(0):
        return False  # nothing to read, no hang-up, no error: idle and open
    # A plain socket object over the transport's descriptor (asyncio's and uvloop's
    # wrappers have no recv), detached again so that it never closes the descriptor.
    # Family, type and protocol given: otherwise each is asked of the kernel (three
    # system calls per reused connection).
    probe = socket.socket(raw.family, raw.type, raw.proto, raw.fileno())
    try:
        data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: the connection is idle and open
    except OSError:
        return True  # reset by the peer
    finally:
        probe.detach()
    if not data:
        return True  # end of file: the peer closed it
    is_tls = transport is not None and transport.get_extra_info("sslcontext") is not None
    return not (is_tls and data[0] == _TLS_HANDSHAKE)


class LocalConnector(aiohttp.TCPConnector):
    """aiohttp's connector that never hands out a pooled connection the service closed.

    Overrides ``TCPConnector._get`` (private: pinned by tests/unit/test_pool.py), the one
    place a pooled connection is taken for reuse."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> aiohttp.connector.Connection | None:
        while (connection := await super()._get(key, traces)) is not None:
            if not closed_by_peer(connection.transport):
                return connection
            connection.close()  # force-closed, never back in the pool; try the next one
        return None


def connector(tls: ssl.SSLContext | bool, limit: int) -> LocalConnector:
    """The agent's one connector to the local service: ``tls`` is the context that checks
    an https:// service's certificate, or False to take any (the default for the local hop)."""
    return LocalConnector(
        limit=limit,
        limit_per_host=0,
        resolver=LocalResolver(),
        happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
        use_dns_cache=False,  # aiohttp's cache rotates the addresses: ::1 first, always
        keepalive_timeout=REUSE_IDLE,
        ssl=tls,
    )


# -- what a failed connect says ------------------------------------------------------------

# asyncio's message for a failed connect (``sock_connect``), one per address tried; several
# are joined by aiohappyeyeballs into one "Multiple exceptions: ..." message.
_CONNECT_FAILED = re.compile(r"\[Errno (\d+)\] Connect call failed \('([^']*)', (\d+)")


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def explain_connect_failure(error: OSError, target: Target) -> str:
    """One line naming what was tried and how each failed, e.g. ``connection refused on
    [::1]:8080 and 127.0.0.1:8080``, for the ``error`` a connect to ``target`` raised
    (``socket.gaierror``: the name does not resolve); no exception names or internals."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve {target.host}: {_strerror(error)}"
    failures: dict[str, list[str]] = {}
    for number, address, port in _CONNECT_FAILED.findall(str(error)):
        why = os.strerror(int(number)).lower()
        where = _where(address, int(port))
        if where not in failures.setdefault(why, []):
            failures[why].append(where)
    if not failures:
        return f"cannot connect to {target.base_url}: {_strerror(error)}"
    return "; ".join(f"{why} on {' and '.join(where)}" for why, where in failures.items())


def _strerror(error: OSError) -> str:
    if error.strerror:
        return error.strerror.lower()
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__
