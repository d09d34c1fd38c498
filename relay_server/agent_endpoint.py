"""``/_relay/agent``: where agents connect, authenticate and claim their names."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from aiohttp import WSMsgType, web

from relay_protocol import PROTOCOL_VERSION, Hello, ProtocolError, Welcome
from relay_protocol.frames import (
    CLOSE_FORBIDDEN,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_MANY_AGENTS,
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION,
    FEATURE_BATCH,
    FEATURE_INLINE_BODY,
    FEATURE_TARGET_UP,
)
from relay_protocol.limits import (
    HEARTBEAT_INTERVAL,
    INITIAL_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_DATA_SIZE,
    MAX_FRAME_SIZE,
)

from . import tokens
from .budget import FrameBudget
from .config import DEFAULT_MAX_AGENTS_PER_USER, DEFAULT_MAX_NAMES_PER_USER, Network
from .connections import client_of
from .delivery import Deliveries
from .errors import AuthError, ConfigError, NameRefused
from .fragments import refuse_fragments
from .names import PublicOrigin, is_valid_name, name_allowed, too_many_names
from .public_errors import relay_error
from .registry import InFlight, Registry
from .session import AgentSession
from .settings import is_valid_label
from .store import Store

log = logging.getLogger("relay.server")

#: Seconds an agent has to send HELLO after the upgrade: a connection that
#: says nothing must not hold a socket and a task for ever.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a close waits for the agent's own close frame, reading (and dropping) what
#: comes before it: a relay-agent answers at once; a flooder's frames read meanwhile
#: escape the frame budget, so not aiohttp's 10 s (a review: 5 s of them, from a
#: client without a token, slowed every tenant to 116 ms).
CLOSE_TIMEOUT = 1.0


class AgentEndpoint:
    def __init__(
        self,
        *,
        secret: bytes,
        store: Store,
        registry: Registry,
        origin: PublicOrigin,
        deliveries: Deliveries,
        inflight: InFlight,
        trusted_proxies: tuple[Network, ...] = (),
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        max_agents_per_user: int = DEFAULT_MAX_AGENTS_PER_USER,
        max_names_per_user: int = DEFAULT_MAX_NAMES_PER_USER,
    ):
        self.inflight = inflight
        self.heartbeat_interval = heartbeat_interval
        self.max_agents_per_user = max_agents_per_user
        self.max_names_per_user = max_names_per_user
        #: Agent connections past authentication, by user (none left at 0).
        self._agents: collections.Counter[str] = collections.Counter()
        #: Each user's frame budget (``budget.FrameBudget``), by user: one small object per
        #: user that ever connected, kept, so that reconnecting buys no fresh burst.
        self._budgets: dict[str, FrameBudget] = {}
        self.trusted_proxies = trusted_proxies
        self.secret = secret
        self.store = store
        self.registry = registry
        self.origin = origin
        self.deliveries = deliveries

    def _authenticate(self, header: str | None) -> tokens.Claims:
        claims = tokens.verify(self.secret, tokens.bearer(header))
        if self.store.is_revoked(claims.token_id):
            raise AuthError("token revoked")
        return claims

    def _grant(self, claims: tokens.Claims, hello: Hello) -> list[str]:
        """The names this agent gets; raises ``NameRefused`` naming the first bad one."""
        names = [str(t["name"]) for t in hello.tunnels] or [claims.user]
        for name in names:
            if not is_valid_name(name):
                raise NameRefused(f"invalid tunnel name {name[:64]!r}: use a DNS label")
            if not name_allowed(name, claims.names):
                raise NameRefused(f"token does not allow the name {name!r}")
            owner = self.store.name_owner(name)
            if owner is not None and owner != claims.user:
                raise NameRefused(f"name {name!r} belongs to another user")
            if owner is None and (refused := self.store.claim_refused(name, claims.user, claims.names)):
                raise NameRefused(refused)
        for name in names:
            owner = self.store.claim_name(name, claims.user, self.max_names_per_user)
            if owner is None:
                raise NameRefused(too_many_names(claims.user, self.max_names_per_user))
            if owner != claims.user:
                raise NameRefused(f"name {name!r} belongs to another user")
        return list(dict.fromkeys(names))

    def _claimed(self, user: str, names: list[str]) -> None:
        """Tell the registry before anything reads the names' settings: a name that
        changed hands (released by the admin a moment ago) drops what was cached for
        its previous owner."""
        for name in names:
            self.registry.claimed(name, user)

    async def _apply_settings(self, user: str, hello: Hello) -> None:
        """``relay-agent connect --mode/--max-concurrency``: stored, so they hold when it leaves."""
        for tunnel in hello.tunnels:
            changes: dict[str, Any] = {k: tunnel[k] for k in ("mode", "max_concurrency") if k in tunnel}
            if changes:
                name = str(tunnel["name"])
                settings = (await self.deliveries.settings(name)).updated(changes)
                await self.deliveries.save_settings(name, user, settings)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # aiohttp refuses a message whose size equals max_msg_size: hence the + 1. Websocket
        # pings are not answered by aiohttp (autoping) but by the session, within the
        # user's frame budget, and none is taken before HELLO: a review's ping flood,
        # answered below the budget, took the server's core from every tenant (1.5 s
        # answers), and each ping restarted the 10 s wait for HELLO.
        ws = web.WebSocketResponse(
            max_msg_size=MAX_FRAME_SIZE + 1,
            autoping=False,
            timeout=CLOSE_TIMEOUT,
            compress=False,  # no permessage-deflate: 70 bytes on the wire inflated to 64 KiB (a review)
        )
        if self.inflight.draining:  # its agents are being closed: come back to the next server
            return relay_error("not-ready", "the relay server is shutting down")
        if not ws.can_prepare(request).ok:
            return relay_error("bad-request", "this endpoint takes a websocket upgrade from relay-agent")
        peer = client_of(request, self.trusted_proxies)
        if not refuse_fragments(
            request, lambda: log.info("agent from %s refused: a fragmented websocket message", peer)
        ):
            return relay_error("bad-request", "websocket frames came before the upgrade was answered")
        await ws.prepare(request)
        session = AgentSession(
            ws, "", [], transport=request.transport, heartbeat_interval=self.heartbeat_interval
        )
        session.remote = peer
        try:
            claims = await asyncio.to_thread(self._authenticate, request.headers.get("Authorization"))
        except AuthError as exc:
            log.info("agent from %s refused: %s", peer, exc)
            await session.close(CLOSE_UNAUTHORIZED, str(exc))
            return ws
        user = claims.user
        if self._agents[user] >= self.max_agents_per_user:
            log.info("agent from %s (user %s) refused: %d agents connected", peer, user, self._agents[user])
            reason = f"too many agents: {self.max_agents_per_user} connected for this user"
            await session.close(CLOSE_TOO_MANY_AGENTS, reason)
            return ws
        self._agents[user] += 1
        try:
            await self._serve(session, claims)
        finally:
            self._agents[user] -= 1
            if not self._agents[user]:
                del self._agents[user]
        return ws

    async def _serve(self, session: AgentSession, claims: tokens.Claims) -> None:
        """The rest of ``handle`` for an authenticated agent with room under its user's cap:
        the handshake, then the session until it ends."""
        ws, peer = session.ws, session.remote
        try:
            msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT)
            if msg.type is not WSMsgType.BINARY:
                raise ProtocolError("expected a binary HELLO frame")
            hello = session.receive_handshake(msg.data)
        except (TimeoutError, ProtocolError) as exc:
            why = str(exc) or f"no HELLO within {HANDSHAKE_TIMEOUT:g}s"
            await session.close(CLOSE_PROTOCOL_ERROR, f"bad handshake: {why}")
            return
        if hello.version != PROTOCOL_VERSION:
            await session.close(
                CLOSE_VERSION,
                f"protocol version {hello.version} unsupported; server speaks {PROTOCOL_VERSION}",
            )
            return
        try:
            names = await asyncio.to_thread(self._grant, claims, hello)
        except NameRefused as refused:
            log.info("agent %s (user %s) refused: %s", peer, claims.user, refused)
            await session.close(CLOSE_FORBIDDEN, str(refused))
            return
        self._claimed(claims.user, names)
        try:
            await self._apply_settings(claims.user, hello)
        except ConfigError as config_error:
            await session.close(CLOSE_FORBIDDEN, f"invalid tunnel setting: {config_error}")
            return
        session.user, session.names = claims.user, names
        session.label = hello.label if is_valid_label(hello.label) else ""
        # One frame budget per user, shared by its connections and kept when they close.
        session.budget = self._budgets.setdefault(claims.user, session.budget)
        await session.welcome(
            Welcome(
                PROTOCOL_VERSION,
                session.id,
                tuple({"name": n, "urls": self.origin.urls(n)} for n in names),
                {
                    "max_streams": MAX_CONCURRENT_STREAMS,
                    "initial_window": INITIAL_WINDOW,
                    "max_data": MAX_DATA_SIZE,
                },
                features=(FEATURE_TARGET_UP, FEATURE_BATCH, FEATURE_INLINE_BODY),
            )
        )
        session.on_target_up = lambda: self.registry.target_up(session)
        # With its token: the watch loop closes the session when the token is revoked
        # or expires while it is connected.
        self.registry.add(session, claims.token_id, claims.expires_at)
        log.info(
            "session %s: agent %s connected, user %s, names %s",
            session.id,
            peer,
            claims.user,
            ",".join(names),
        )
        try:
            await session.run()
        finally:
            self.registry.remove(session)
            log.info("session %s: agent disconnected", session.id)
