"""Who serves what right now: live agent sessions by tunnel name, and in-flight requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator

from .session import AgentSession

log = logging.getLogger("relay.server")

#: Seconds between two TARGET_UPs of one user's agents acted on: an agent sends one when
#: its local service comes back (its probe runs every second), so a real one waits at
#: most this long; more often than this, they are one agent's flood.
TARGET_UP_INTERVAL = 5.0


class Registry:
    """Live sessions by name. Several sessions of one user may serve one name:
    requests alternate between them, so an agent restarts without downtime.

    It also knows each name's current owner (loaded from the store at start, set on
    every claim in this process, and refreshed by the watch loop for what the admin CLI
    changes from another process): ``pick`` never returns a session of anyone else,
    even in the moment between a name changing hands and the old owner's sessions
    being closed.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, list[AgentSession]] = {}
        self._turn: dict[str, int] = {}
        #: Name -> owner; None until loaded (then nothing is filtered).
        self._owners: dict[str, str] | None = None
        #: Names seen released (free now, held before): their old events must not retry.
        self._released: set[str] = set()
        #: Claims made in this process, numbered, that a store read may predate.
        self._version = 0
        self._recent: dict[str, tuple[int, str]] = {}
        #: Session -> (token id, expiry as a Unix time) of the token it connected with.
        self._tokens: dict[AgentSession, tuple[str, float]] = {}
        #: Called with each session once it serves its names (queued deliveries wait on it).
        self.on_connect: list[Callable[[AgentSession], None]] = []
        #: Called with a session whose agent says its local service is reachable
        #: again (TARGET_UP): what waits for that service may be delivered now.
        self.on_target_up: list[Callable[[AgentSession], None]] = []
        #: When each user's last TARGET_UP was acted on (loop time), and the one deferred.
        self._target_up_at: dict[str, float] = {}
        self._target_up_later: dict[str, asyncio.TimerHandle] = {}
        #: Called with a name whose owner changed (released, or claimed by another
        #: user): what was cached for the old owner must go.
        self.on_owner_change: list[Callable[[str], None]] = []

    def add(self, session: AgentSession, token_id: str = "", expires_at: float = math.inf) -> None:
        """``session`` serves its names from now on; it connected with the token
        ``token_id`` that expires at ``expires_at`` (closed by the watch loop then)."""
        self._tokens[session] = (token_id, expires_at)
        for name in session.names:
            self._by_name.setdefault(name, []).append(session)
        for callback in self.on_connect:
            callback(session)

    def target_up(self, session: AgentSession) -> None:
        """``session``'s agent can reach its local service again: acted on at once, or, within
        ``TARGET_UP_INTERVAL`` of the last one of its user's, once at the interval's end
        (never lost, never more often). Each starts an early pass over every waiting
        webhook of the user's tunnels: a review saw 2,000 TARGET_UPs a second from one
        agent drive hundreds of attempts a second and fill the store for every tenant."""
        loop = asyncio.get_running_loop()
        user = session.user
        if user in self._target_up_later:
            return  # one is already due at the interval's end
        wait = self._target_up_at.get(user, -math.inf) + TARGET_UP_INTERVAL - loop.time()
        if wait > 0:
            self._target_up_later[user] = loop.call_later(wait, self._target_up_now, session)
            return
        self._target_up_now(session)

    def _target_up_now(self, session: AgentSession) -> None:
        self._target_up_later.pop(session.user, None)
        self._target_up_at[session.user] = asyncio.get_running_loop().time()
        if session.closed:
            return
        for callback in self.on_target_up:
            try:
                callback(session)
            except Exception:  # run by the loop when deferred: log it here, and go on
                log.exception("session %s: target-up callback failed", session.id)

    def remove(self, session: AgentSession) -> None:
        self._tokens.pop(session, None)
        for name in session.names:
            sessions = self._by_name.get(name, [])
            if session in sessions:
                sessions.remove(session)
            if not sessions:
                self._by_name.pop(name, None)
                self._turn.pop(name, None)

    def token_of(self, session: AgentSession) -> tuple[str, float] | None:
        """The (token id, expiry) ``session`` connected with; None if it is not added."""
        return self._tokens.get(session)

    # -- owners ----------------------------------------------------------------------

    @property
    def owners_version(self) -> int:
        """Take it before reading the store's owners, and give it to ``set_owners``."""
        return self._version

    def set_owners(self, owners: dict[str, str], read_at: int | None = None) -> set[str]:
        """Replace what is known of every name's owner with the store's view, read after
        ``owners_version`` was ``read_at`` (claims made here since then are newer than
        the read and kept); returns the names that changed hands (released, or held by
        another user), after calling ``on_owner_change`` for each. A free name being
        claimed changes no hands: what was cached for its previous owner went when it
        was released."""
        owners = dict(owners)
        if read_at is not None:
            for name, (version, user) in list(self._recent.items()):
                if version > read_at:
                    owners[name] = user
                else:
                    del self._recent[name]  # the read saw it
        previous = self._owners
        self._owners = owners
        if previous is None:
            return set()
        changed = {n for n, user in previous.items() if owners.get(n) != user}
        self._released = (self._released | {n for n in changed if n not in owners}) - owners.keys()
        for name in sorted(changed):
            self._owner_changed(name)
        return changed

    def claimed(self, name: str, user: str) -> None:
        """``user`` holds ``name`` now (it was claimed in this process)."""
        if self._owners is None:
            return
        previous = self._owners.get(name)
        self._owners[name] = user
        self._released.discard(name)
        self._version += 1
        self._recent[name] = (self._version, user)
        if previous is not None and previous != user:  # released, and the watch has not seen it yet
            self._owner_changed(name)

    def _owner_changed(self, name: str) -> None:
        for callback in self.on_owner_change:
            callback(name)

    def owners(self) -> dict[str, str]:
        """Every name's owner as known now (a copy)."""
        return dict(self._owners or {})

    def owner(self, name: str) -> str | None:
        """``name``'s owner as last known (None: free, or not loaded yet)."""
        return None if self._owners is None else self._owners.get(name)

    def owner_changed(self, name: str, user: str) -> bool:
        """True if ``name`` is known to have left ``user``: released, or held by another."""
        if self._owners is None:
            return False
        owner = self._owners.get(name)
        return name in self._released if owner is None else owner != user

    def _serves(self, session: AgentSession, name: str) -> bool:
        return self._owners is None or self._owners.get(name) == session.user

    def pick(self, name: str, label: str = "*", owner: str | None = None) -> AgentSession | None:
        """The next live session for ``name`` (with ``label``, unless "*"; of ``owner``,
        if given) in turn, or None. Never a session of a user who no longer owns ``name``."""
        live = [
            s
            for s in self._by_name.get(name, ())
            if not s.closed
            and label in ("*", s.label)
            and self._serves(s, name)
            and (owner is None or s.user == owner)
        ]
        if not live:
            return None
        turn = self._turn.get(name, 0)
        self._turn[name] = turn + 1
        return live[turn % len(live)]

    def sessions(self) -> list[AgentSession]:
        return list({id(s): s for group in self._by_name.values() for s in group}.values())


class InFlight:
    """Counts public requests being served, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
