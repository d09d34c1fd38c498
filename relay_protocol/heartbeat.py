"""When to send a heartbeat and when to declare the peer dead: pure, the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import HEARTBEAT_INTERVAL, HEARTBEAT_MISSES


@dataclass(frozen=True)
class Beat:
    dead: bool  # drop the connection
    ping: bool  # send a PING now
    wait: float  # seconds until the next check
    # Dead because a send waited the timeout: the peer does not read, so abort
    # the transport (a close handshake could not complete).
    stuck: bool = False


class Heartbeat:
    """Tracks the last frame received and the next PING due on one connection.

    A PING goes out every ``interval`` seconds of quiet; ``timeout`` (``HEARTBEAT_MISSES``
    intervals, 30 s by default: ``limits.HEARTBEAT_TIMEOUT``) is both how long the peer
    may stay silent and how long a frame may wait to be sent (``limits.SEND_TIMEOUT``).
    Checks run at the next PING or the next deadline, whichever is first, so a
    silent peer is noticed exactly ``timeout`` after its last frame, and a peer
    that stops reading exactly ``timeout`` after the oldest frame still waiting
    to be sent was queued, however many frames it sends.
    """

    def __init__(self, now: float, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.timeout = HEARTBEAT_MISSES * interval
        self.last_seen = now
        self._next_ping = now + interval

    def seen(self, now: float) -> None:
        """A frame arrived."""
        self.last_seen = now

    def check(self, now: float, oldest_send: float | None = None) -> Beat:
        """What to do at ``now``. ``oldest_send``: when the oldest frame not yet
        taken by the peer was queued, None if nothing waits to be sent.

        While something waits to be sent no PING is due: one would only queue
        behind it, and the frame on its way already tells the peer we live.
        """
        deadline = self.last_seen + self.timeout
        if now >= deadline:
            return Beat(dead=True, ping=False, wait=0.0)
        if oldest_send is not None:
            send_deadline = oldest_send + self.timeout
            if now >= send_deadline:
                return Beat(dead=True, ping=False, wait=0.0, stuck=True)
            deadline = min(deadline, send_deadline)
        ping = now >= self._next_ping and oldest_send is None
        if now >= self._next_ping:
            self._next_ping = now + self.interval
        return Beat(dead=False, ping=ping, wait=min(self._next_ping, deadline) - now)
