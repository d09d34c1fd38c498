"""When to send a heartbeat and when to declare the peer dead: pure, the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT


@dataclass(frozen=True)
class Beat:
    dead: bool  # nothing received for HEARTBEAT_TIMEOUT: drop the connection
    ping: bool  # send a PING now
    wait: float  # seconds until the next check


class Heartbeat:
    """Tracks the last frame received and the next PING due on one connection.

    Checks run at the next PING or the death deadline, whichever is first, so
    a silent peer is noticed exactly ``HEARTBEAT_TIMEOUT`` after its last frame.
    """

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self._next_ping = now + HEARTBEAT_INTERVAL

    def seen(self, now: float) -> None:
        """A frame arrived."""
        self.last_seen = now

    def check(self, now: float) -> Beat:
        deadline = self.last_seen + HEARTBEAT_TIMEOUT
        if now >= deadline:
            return Beat(dead=True, ping=False, wait=0.0)
        ping = now >= self._next_ping
        if ping:
            self._next_ping = now + HEARTBEAT_INTERVAL
        return Beat(dead=False, ping=ping, wait=min(self._next_ping, deadline) - now)
