"""Who a public connection is from (its address, the forwarded chain a trusted proxy
adds), what the server answers one over its caps (``relay_web.guard`` enforces them),
and no log flood when the process runs out of file descriptors: asyncio logs a
traceback each time ``accept()`` fails with EMFILE.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Collection, Iterable
from typing import Any

from aiohttp import web

from relay_web.guard import busy_response

from .config import Network

log = logging.getLogger("relay.server")

#: Seconds between two log lines about ``accept()`` failing for lack of descriptors:
#: one line with a count per interval, never a traceback per failure.
ACCEPT_LOG_INTERVAL = 30.0

#: Sent (then the connection is closed) to a connection over a cap.
BUSY_RESPONSE = busy_response(
    b"the relay server has too many connections; try again later\n",
    "text/plain; charset=utf-8",
    b"X-Relay-Error: too-many-connections",
)


#: Address texts whose parse is remembered (``ipaddress`` is 2 % of a relayed request's
#: CPU): a front proxy's and its busiest clients'.
PARSED_ADDRESSES = 1024


@functools.lru_cache(maxsize=PARSED_ADDRESSES)
def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` (an IP address, IPv6 maybe in brackets) parsed, an IPv4-mapped IPv6
    address as IPv4; None if it is not one."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trusts(networks: Collection[Network], address: str) -> bool:
    """True if ``address`` (a peer's IP, as text) lies in one of ``networks``."""
    if not networks:
        return False
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
