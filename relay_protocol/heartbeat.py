"""When to send a heartbeat and when to declare the peer dead: pure, the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import HEARTBEAT_INTERVAL, HEARTBEAT_MISSES, SEND_TIMEOUT


@dataclass(frozen=True)
class Beat:
    dead: bool  # drop the connection
    ping: bool  # send a PING now
    wait: float  # seconds until the next check
    # Dead because a send waited SEND_TIMEOUT: the peer does not read, so abort
    # the transport (a close handshake could not complete).
    stuck: bool = False


class Heartbeat:
    """Tracks the last frame received and the next PING due on one connection.

    A PING goes out every ``interval`` seconds while nothing of ours waits to be sent.
    The peer is dead when ``silence_timeout`` seconds (``HEARTBEAT_MISSES`` intervals:
    ``HEARTBEAT_TIMEOUT``, 30 s, at the default interval) pass without a frame from it,
    or when a frame of ours has waited ``SEND_TIMEOUT`` (30 s, whatever the interval) to
    be sent: it does not read. While frames of ours wait, the send deadline alone
    decides and silence is not counted (its clock starts again once they are sent): a
    slow link can hold them longer than a short interval, and with our PINGs held back
    the peer has nothing to answer. Checks run at the next PING or the next deadline,
    whichever is first, so each death is noticed exactly at its deadline.
    """

    def __init__(self, now: float, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.silence_timeout = HEARTBEAT_MISSES * interval
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
        due = now >= self._next_ping
        if due:
            self._next_ping = now + self.interval
        if oldest_send is not None:
            send_deadline = oldest_send + SEND_TIMEOUT
            if now >= send_deadline:
                return Beat(dead=True, ping=False, wait=0.0, stuck=True)
            self.last_seen = max(self.last_seen, now)
            return Beat(dead=False, ping=False, wait=min(self._next_ping, send_deadline) - now)
        deadline = self.last_seen + self.silence_timeout
        if now >= deadline:
            return Beat(dead=True, ping=False, wait=0.0)
        return Beat(dead=False, ping=due, wait=min(self._next_ping, deadline) - now)
