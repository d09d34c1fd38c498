"""The watch loop: what the admin CLI changes from another process takes effect here.

``relay-server names release`` and ``relay-server token revoke`` run in their own
process and write only to the store. Every ``WATCH_INTERVAL`` the server reads what it
must act on and acts:

- a name that changed hands (released, or claimed by another user since): the registry
  learns its owner (``pick`` stops returning the old owner's sessions at once), the
  deliveries forget the tunnel's cached settings and dispatchers, the old owner's
  waiting events on it die (``NAME_RELEASED``), and every session of the old owner on
  the name is closed with 4003;
- a session whose token was revoked, or expired while it was connected, is closed with
  4001.

The agent prints the close reason and exits 1 (it never retries 4001 or 4003).
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay_protocol.frames import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED

from .delivery import Deliveries
from .errors import StoreError
from .registry import Registry
from .session import AgentSession
from .store import NAME_RELEASED, Store
from .tasks import Tasks

log = logging.getLogger("relay.server")

#: Seconds between two reads of names' owners and revoked tokens. The admin CLI runs in
#: another process and only writes the store, so this is how soon a release or a
#: revocation takes effect (the README promises within 5 s); one small query per tick.
WATCH_INTERVAL = 2.0


class Watch:
    """Closes what the store says must not serve any more; one per server application."""

    def __init__(self, *, store: Store, registry: Registry, deliveries: Deliveries) -> None:
        self.store = store
        self.registry = registry
        self.deliveries = deliveries
        self.tasks = Tasks("watch")
        # Also for claims made in this process: an agent that claims a name just
        # released must not find its previous owner's settings in the cache.
        registry.on_owner_change.append(deliveries.forget_tunnel)

    async def start(self) -> None:
        """Load every name's owner (before the first connection), then watch."""
        self.registry.set_owners(await asyncio.to_thread(self.store.name_owners))
        self.tasks.loop(self._run, "watch of names and tokens")

    async def stop(self) -> None:
        await self.tasks.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.check()
            except StoreError as exc:
                self.deliveries.store_trouble(exc)

    async def check(self, now: float | None = None) -> int:
        """One round: act on names that changed hands and on dead tokens; returns how many
        sessions it closed. Raises ``StoreError`` if the store cannot be read."""
        read_at = self.registry.owners_version
        stored = await asyncio.to_thread(self.store.name_owners)
        # The store's view, plus what agents claimed here while it was being read.
        changed = self.registry.set_owners(stored, read_at)
        owners = self.registry.owners()
        for name in sorted(changed):
            # An attempt in flight at the release may have written "retrying" over the
            # release's "dead": end those too (the registry now refuses new ones).
            owner = owners.get(name)
            died = await asyncio.to_thread(self.store.end_foreign_waiting, name, owner, NAME_RELEASED)
            log.info(
                "name %s changed hands: %s; %d more waiting events of its previous owner dead",
                name,
                f"held by {owner}" if owner else "free",
                died,
            )
        sessions = [s for s in self.registry.sessions() if not s.closed]
        token_ids = sorted({t[0] for s in sessions if (t := self.registry.token_of(s)) is not None})
        revoked = await asyncio.to_thread(self.store.revoked_tokens, token_ids)
        now = time.time() if now is None else now
        closing = []
        for session in sessions:
            reason = self._why_close(session, owners, revoked, now)
            if reason is not None:
                code, text = reason
                log.info("session %s: closed (%s %s)", session.id, code, text)
                closing.append(session.close(code, text))
        await asyncio.gather(*closing, return_exceptions=True)
        return len(closing)

    def _why_close(
        self, session: AgentSession, owners: dict[str, str], revoked: set[str], now: float
    ) -> tuple[int, str] | None:
        token = self.registry.token_of(session)
        if token is not None:
            token_id, expires_at = token
            if token_id in revoked:
                return CLOSE_UNAUTHORIZED, "token revoked"
            if expires_at <= now:
                return CLOSE_UNAUTHORIZED, "token expired"
        for name in session.names:
            owner = owners.get(name)
            if owner is None:
                return CLOSE_FORBIDDEN, f"name {name!r} was released by the server admin"
            if owner != session.user:
                return CLOSE_FORBIDDEN, f"name {name!r} belongs to another user"
        return None
