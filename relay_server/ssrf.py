"""What a URL destination may reach: the SSRF guard of the server's one HTTP client for
URL destinations (``--allow-private`` turns it off).

A module of its own, and never compiled (setup.py): ``PrivateAddress`` extends
``OSError`` and ``PublicOnlyResolver`` aiohttp's resolver, which mypyc compiles only as
classes of the interpreter's.
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class PrivateAddress(OSError):
    """A URL destination resolved to an address the admin did not allow."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses loopback, private,
    link-local and other non-public addresses: checked at connect time, so DNS
    rebinding cannot get around it."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_public(result["host"]):
                raise PrivateAddress(f"{host} resolves to the non-public address {result['host']}")
        return results

    async def close(self) -> None:
        await self._inner.close()


#: IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits, which a
#: translator on the server's network would reach: NAT64 (RFC 6052 2.1, RFC 8215),
#: IPv4-translated (SIIT, RFC 2765 2.1) and IPv4-compatible (RFC 4291 2.5.5.1). Mapped,
#: 6to4 and Teredo addresses are read by ``ipaddress`` itself.
CARRIES_IPV4 = tuple(
    ipaddress.ip_network(prefix) for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")
)


def is_public(address: str) -> bool:
    """True if ``address`` (IPv4 or IPv6, a zone allowed) is globally reachable, and so
    is any IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64): a review
    reached 127.0.0.1 past the check as ``[64:ff9b::7f00:1]`` and ``[2002:7f00:1::]``.
    A translator on another prefix (an operator's own NAT64 prefix) cannot be told."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        carried = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in network for network in CARRIES_IPV4):
            carried.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public(str(v4)) for v4 in carried if v4 is not None)
    return True


def url_client(allow_private: bool) -> aiohttp.ClientSession:
    """The one client session for URL destinations (SSRF-guarded unless ``allow_private``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=None if allow_private else PublicOnlyResolver(), limit=100),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )
