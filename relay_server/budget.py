"""How fast the server reads an agent's frames: one token bucket per user, shared by all of
that user's agent connections (and kept when they close, so neither many connections nor
reconnecting buys a fresh burst).

Every frame costs the server's one event loop its decoding, whatever the frame carries,
and an agent holding a valid token could send frames that carry nothing (PINGs, frames
for streams already gone) as fast as its link allows: a review measured BATCH messages of
6,000 PINGs, about 400,000 frames a second, taking the server's core and slowing every
other tenant's requests from 3 ms to a second. A user over its budget has its agents read
more slowly (a websocket is not read until the budget refills, and TCP backpressure does
the rest): it slows down itself, and nothing is dropped. A BATCH message is read
``FRAMES_PER_TURN`` frames at a time, with the rest of the loop let in between: one
message of up to about 6,500 frames (some 20 ms of decoding) no longer holds every other
tenant's requests up while it is decoded.

Bytes are not budgeted, on purpose: a 64 KiB DATA frame for a stream already gone costs
the loop about 60 µs (the websocket layer's unmasking and a copy), so the budget lets
through about 1.2 GB/s of them, more than an agent's link carries; and anyone may push
bytes at link speed into the public side, as webhook bodies, at the same cost per byte.
That holds because a websocket frame from an agent costs what its bytes say: no
compression is negotiated, and fragments (frames that make no message) are refused
below aiohttp (``relay_server.fragments``).
"""

from __future__ import annotations

#: Frames one user's agent connections may have read per second, on average, together:
#: about twice what the bench's busiest live tunnel sends (3,500 requests a second, about
#: three frames each), and a twentieth of what the server's core decodes.
MAX_FRAMES_PER_SECOND = 20_000
#: Frames read at full speed before the rate applies: a burst of a second's worth.
FRAME_BURST = MAX_FRAMES_PER_SECOND
#: Frames of one message decoded before the other tasks of the loop get a turn (and the
#: budget is asked again): about 0.75 ms of decoding PINGs on the bench machine (2.9 µs
#: each), against 20 ms for a whole BATCH of the smallest frames. The agent's own BATCHes
#: rarely carry this many, so it costs them nothing.
FRAMES_PER_TURN = 256


class FrameBudget:
    """A token bucket of frames: ``rate`` a second, at most ``burst`` saved up.

    ``now`` is the caller's clock (seconds); the bucket starts full."""

    def __init__(self, now: float, rate: float = MAX_FRAMES_PER_SECOND, burst: float = FRAME_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def spend(self, frames: int, now: float) -> None:
        """Take ``frames`` just read at ``now`` (the budget may go overdrawn: ``due``)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - frames
        self._at = now

    def due(self, now: float) -> float:
        """Seconds from ``now`` until the budget is no longer overdrawn (0.0: read now)."""
        tokens = self._tokens + (now - self._at) * self.rate
        return 0.0 if tokens >= 0 else -tokens / self.rate
