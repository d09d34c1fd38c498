"""What operators and front proxies ask the server: ``/healthz``, ``/readyz`` and
``/_relay/tls-ask`` (Caddy's on-demand TLS ``ask``).

``/healthz`` answers while the process runs; ``/readyz`` only while it accepts tunnel
requests and its store takes writes; ``/_relay/tls-ask`` says whether a certificate may
be obtained for a domain, so nobody can make the front proxy request certificates for
random names (https://caddyserver.com/docs/automatic-https#on-demand-tls).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relay_protocol import RelayError

from .access import ASKED
from .config import Network
from .connections import is_local
from .names import BadHost, PublicOrigin, is_valid_name, normalize_host
from .public_errors import relay_error
from .registry import InFlight
from .store import Store

log = logging.getLogger("relay.server")

#: Seconds ``/readyz`` waits for the store's write lock before it says not ready: a
#: group commit holds it for one fsync (milliseconds); a stuck disk holds it for ever.
READY_STORE_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    """200 ``ok``: the process is alive and its event loop answers."""
    return web.Response(text="ok\n")


class Probes:
    """``/readyz`` and ``/_relay/tls-ask`` for one server."""

    def __init__(
        self, *, origin: PublicOrigin, store: Store, inflight: InFlight, trusted_proxies: tuple[Network, ...]
    ) -> None:
        self.origin = origin
        self.store = store
        self.inflight = inflight
        self.trusted_proxies = trusted_proxies

    async def readyz(self, request: web.Request) -> web.Response:
        """200 ``ready``; 503 ``not-ready`` while draining (SIGTERM) or when the store
        cannot take a write lock within ``READY_STORE_TIMEOUT`` (read-only disk, I/O error)."""
        if self.inflight.draining:
            return relay_error("not-ready", "the relay server is shutting down")
        try:
            async with asyncio.timeout(READY_STORE_TIMEOUT):
                await asyncio.to_thread(self.store.check_writable)
        except TimeoutError:
            return relay_error("not-ready", f"the store took no write lock within {READY_STORE_TIMEOUT:g}s")
        except RelayError as exc:
            return relay_error("not-ready", str(exc))
        return web.Response(text="ready\n")

    async def tls_ask(self, request: web.Request) -> web.Response:
        """``GET /_relay/tls-ask?domain=HOST``: 200 for the apex and for ``NAME.<apex>``
        when NAME is claimed; 404 ``unknown-tunnel`` for any other domain, 400 without
        one, 403 unless the request comes from this host or a trusted proxy itself."""
        if not is_local(request, self.trusted_proxies):
            return relay_error("forbidden", "only the front proxy may ask")
        if request.method not in ("GET", "HEAD"):
            return relay_error("method-not-allowed", "ask with GET /_relay/tls-ask?domain=HOST")
        domain = request.query.get("domain", "")
        try:
            host = normalize_host(domain)
        except BadHost as exc:
            return relay_error("bad-request", f"domain: {exc}")
        if not host:
            return relay_error("bad-request", "give the domain: /_relay/tls-ask?domain=HOST")
        request[ASKED] = host
        # A certificate is for a name alone: Caddy asks with the bare server name (SNI).
        if domain != domain.strip() or ":" in domain:
            return relay_error("bad-request", "domain: a bare host name, without port or spaces")
        if host == self.origin.host:
            return web.Response(text="ok\n")
        name = self.origin.subdomain_of(host)
        if name is None or not is_valid_name(name):
            return relay_error("unknown-tunnel", f"{host[:64]!r} is not a tunnel of this relay")
        if await asyncio.to_thread(self.store.name_owner, name) is None:
            return relay_error("unknown-tunnel", f"no tunnel is named {name!r}")
        return web.Response(text="ok\n")
