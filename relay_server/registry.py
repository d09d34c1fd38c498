"""Who serves what right now: live agent sessions by tunnel name, and in-flight requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from .session import AgentSession


class Registry:
    """Live sessions by name. Several sessions of one user may serve one name:
    requests alternate between them, so an agent restarts without downtime."""

    def __init__(self) -> None:
        self._by_name: dict[str, list[AgentSession]] = {}
        self._turn: dict[str, int] = {}
        #: Called with each session once it serves its names (queued deliveries wait on it).
        self.on_connect: list[Callable[[AgentSession], None]] = []
        #: Called with a session whose agent says its local service is reachable
        #: again (TARGET_UP): what waits for that service may be delivered now.
        self.on_target_up: list[Callable[[AgentSession], None]] = []

    def add(self, session: AgentSession) -> None:
        for name in session.names:
            self._by_name.setdefault(name, []).append(session)
        for callback in self.on_connect:
            callback(session)

    def target_up(self, session: AgentSession) -> None:
        """``session``'s agent can reach its local service again."""
        for callback in self.on_target_up:
            callback(session)

    def remove(self, session: AgentSession) -> None:
        for name in session.names:
            sessions = self._by_name.get(name, [])
            if session in sessions:
                sessions.remove(session)
            if not sessions:
                self._by_name.pop(name, None)
                self._turn.pop(name, None)

    def pick(self, name: str, label: str = "*") -> AgentSession | None:
        """The next live session for ``name`` (with ``label``, unless "*") in turn, or None."""
        live = [s for s in self._by_name.get(name, ()) if not s.closed and label in ("*", s.label)]
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
