"""The JSON API under ``/_relay/api/``: tunnel settings and events, per user.

Every call carries the user's token (``Authorization: Bearer``, the same token
the agent uses). A user sees, changes and replays only what is theirs: another
user's event or tunnel answers 404, as if it did not exist.

::

    GET   /_relay/api/tunnels                      the user's tunnels and settings
    GET   /_relay/api/tunnels/NAME                 one tunnel
    PATCH /_relay/api/tunnels/NAME                 change settings (JSON object of fields)
    GET   /_relay/api/events?name=&status=&limit=&before=
                                                   events, newest first, a page at a time:
                                                   {"events": [...], "next": CURSOR or null}
    GET   /_relay/api/events/ID                    one event, with headers, body and every attempt
    POST  /_relay/api/events/ID/replay             deliver it again (same id, next attempt)

A revoked or expired token answers 401 on the next call (checked on every call, never
cached). A replay of an event whose name the user no longer holds (the admin released it)
answers 409 ``conflict``: it would reach the name's next owner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from . import tokens
from .config import DEFAULT_MAX_NAMES_PER_USER
from .delivery import Deliveries
from .errors import AuthError, ConfigError, StoreError
from .expect import send_continue
from .names import is_valid_name, name_allowed, too_many_names
from .public_errors import STATUS
from .registry import Registry
from .settings import TunnelSettings
from .ssrf import is_public
from .states import event_json
from .store import STATUSES, Store

#: Most events one list call returns (a page; ``next`` leads to the one after it).
MAX_LIST = 1000
#: Events one list call returns when it does not say.
DEFAULT_LIST = 100
#: Digits of a ``before`` cursor: a SQLite rowid has at most 19.
MAX_CURSOR = 19
#: Largest JSON body the API reads (settings are small).
MAX_API_BODY = 64 * 1024


def api_error(code: str, message: str) -> web.Response:
    response = web.json_response({"error": code, "message": message}, status=STATUS[code])
    response.headers["X-Relay-Error"] = code
    return response


class Api:
    def __init__(
        self,
        *,
        secret: bytes,
        store: Store,
        registry: Registry,
        deliveries: Deliveries,
        max_names_per_user: int = DEFAULT_MAX_NAMES_PER_USER,
    ) -> None:
        self.secret = secret
        self.store = store
        self.registry = registry
        self.deliveries = deliveries
        self.max_names_per_user = max_names_per_user

    def _claims(self, request: web.Request) -> tokens.Claims:
        claims = tokens.verify(self.secret, tokens.bearer(request.headers.get("Authorization")))
        if self.store.is_revoked(claims.token_id):
            raise AuthError("token revoked")
        return claims

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            claims = await asyncio.to_thread(self._claims, request)
        except AuthError as exc:
            return api_error("unauthorized", str(exc))
        except StoreError as exc:
            return api_error("store-unavailable", str(exc))
        parts = request.path[len("/_relay/api/") :].strip("/").split("/")
        try:
            return await self._route(request, claims, parts)
        except StoreError as exc:
            return api_error("store-unavailable", str(exc))

    async def _route(
        self, request: web.Request, claims: tokens.Claims, parts: list[str]
    ) -> web.StreamResponse:
        method = request.method
        if parts == ["tunnels"] and method == "GET":
            return await self._tunnels(claims)
        if len(parts) == 2 and parts[0] == "tunnels":
            if method == "GET":
                return await self._tunnel(claims, parts[1])
            if method == "PATCH":
                return await self._set_tunnel(request, claims, parts[1])
        if parts == ["events"] and method == "GET":
            return await self._events(request, claims)
        if len(parts) == 2 and parts[0] == "events" and method == "GET":
            return await self._event(claims, parts[1])
        if len(parts) == 3 and parts[0] == "events" and parts[2] == "replay" and method == "POST":
            return await self._replay(claims, parts[1])
        return api_error("not-found", f"no API call {method} {request.path}")

    # -- tunnels -------------------------------------------------------------------

    def _tunnel_json(self, name: str, settings: TunnelSettings) -> dict[str, Any]:
        agents = sum(1 for s in self.registry.sessions() if name in s.names and not s.closed)
        waiting = self.deliveries.waiting(name)
        return {
            "name": name,
            "agents": agents,
            "waiting": waiting,
            "settings": settings.to_json(),
            "slots": self.deliveries.slots(name, settings),
        }

    async def _tunnels(self, claims: tokens.Claims) -> web.Response:
        rows = await asyncio.to_thread(self.store.user_tunnels, claims.user)
        return web.json_response(
            {"tunnels": [self._tunnel_json(n, TunnelSettings.from_json(s)) for n, s in rows]}
        )

    async def _tunnel(self, claims: tokens.Claims, name: str) -> web.Response:
        if await asyncio.to_thread(self.store.name_owner, name) != claims.user:
            return api_error("not-found", f"you have no tunnel named {name[:64]!r}")
        return web.json_response(self._tunnel_json(name, await self.deliveries.settings(name)))

    async def _set_tunnel(self, request: web.Request, claims: tokens.Claims, name: str) -> web.Response:
        """PATCH a tunnel's settings. A free name the token allows is claimed, but only
        for changes that are valid: a bad request claims nothing."""
        await send_continue(request)  # authenticated: now the body is wanted
        try:
            changes = json.loads(await request.content.read(MAX_API_BODY + 1))
            if not isinstance(changes, dict):
                raise ValueError("not an object")
            owner = await asyncio.to_thread(self.store.name_owner, name)
            if owner is None and is_valid_name(name) and name_allowed(name, claims.names):
                await self._checked(TunnelSettings(), changes)  # what a free name's would be
                refused = await asyncio.to_thread(self.store.claim_refused, name, claims.user, claims.names)
                if refused is not None:
                    return api_error("conflict", refused)
                most = self.max_names_per_user
                owner = await asyncio.to_thread(self.store.claim_name, name, claims.user, most)
                if owner is None:
                    return api_error("conflict", too_many_names(claims.user, most))
            if owner != claims.user:
                return api_error("not-found", f"you have no tunnel named {name[:64]!r}")
            self.registry.claimed(name, claims.user)  # before the settings are read
            settings = await self._checked(await self.deliveries.settings(name), changes)
        except (ValueError, ConfigError) as exc:
            return api_error("bad-request", f"invalid settings: {exc}")
        await self.deliveries.save_settings(name, claims.user, settings)
        return web.json_response(self._tunnel_json(name, settings))

    async def _checked(self, settings: TunnelSettings, changes: dict[str, Any]) -> TunnelSettings:
        """``settings`` with ``changes``; raises ``ValueError`` or ``ConfigError`` (a URL
        destination that resolves to a private address, unless the server allows them)."""
        settings = settings.updated(changes)
        if not self.deliveries.config.allow_private:
            for destination in settings.destinations:
                await asyncio.to_thread(refuse_private, destination)
        return settings

    # -- events ---------------------------------------------------------------------

    async def _events(self, request: web.Request, claims: tokens.Claims) -> web.Response:
        status = request.query.get("status") or None
        if status is not None and status not in STATUSES:
            return api_error("bad-request", f"status must be one of {', '.join(STATUSES)}")
        try:
            limit = max(1, min(int(request.query.get("limit", str(DEFAULT_LIST))), MAX_LIST))
        except ValueError:
            return api_error("bad-request", "limit must be a number")
        try:
            before = parse_cursor(request.query.get("before") or None)
        except ValueError as exc:
            return api_error("bad-request", str(exc))
        # One more than a page: whether it exists says if there is a next page.
        found = await asyncio.to_thread(
            self.store.find_events, claims.user, request.query.get("name") or None, status, limit + 1, before
        )
        page = found[:limit]
        following = str(page[-1][0].seq) if len(found) > limit else None
        return web.json_response({"events": [event_json(e, d) for e, d in page], "next": following})

    async def _event(self, claims: tokens.Claims, event_id: str) -> web.Response:
        found = await asyncio.to_thread(self.store.find_event, claims.user, event_id, True)
        if found is None:
            return api_error("not-found", f"you have no event {event_id[:64]!r}")
        attempts = await asyncio.to_thread(self.store.attempts, found[0].seq)
        return web.json_response(event_json(*found, with_body=True, attempts=attempts))

    async def _replay(self, claims: tokens.Claims, event_id: str) -> web.Response:
        found = await asyncio.to_thread(self.store.find_event, claims.user, event_id, True)
        if found is None:
            return api_error("not-found", f"you have no event {event_id[:64]!r}")
        event, deliveries = found
        if await asyncio.to_thread(self.store.name_owner, event.tunnel) != claims.user:
            # The admin released the name since (its waiting events died "name released"):
            # a replay would go to whoever holds the name now, or to nobody. The event stays
            # readable; it can be replayed if the name is the user's again.
            return api_error(
                "conflict",
                f"{event_id} came to the name {event.tunnel!r}, which is no longer yours (released);"
                " claim the name again to replay it",
            )
        if self.deliveries.in_flight(event, deliveries):
            return api_error("conflict", f"an attempt of {event_id} is in flight; replay it once it ends")
        destinations = await self.deliveries.replay(event, deliveries)
        return web.json_response({"event": event.id, "replayed": destinations}, status=202)


def parse_cursor(text: str | None) -> int | None:
    """The seq a ``before`` cursor stands for (None without one). Raises ``ValueError``
    if it is not a cursor. Clients treat it as opaque: it is the seq of the last event
    of the previous page."""
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > MAX_CURSOR:
        raise ValueError("before must be the next cursor of an earlier answer")
    return int(text)


def refuse_private(destination: str) -> None:
    """Raise ``ConfigError`` if a URL destination resolves to a non-public address."""
    if destination.startswith("agent:"):
        return
    host = urlsplit(destination).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc}") from exc
    for address in addresses:
        if not is_public(str(address)):
            kind = "loopback" if ipaddress.ip_address(str(address)).is_loopback else "non-public"
            raise ConfigError(
                f"{host} resolves to the {kind} address {address}; the server admin must allow"
                " private destinations (--allow-private-destinations)"
            )
