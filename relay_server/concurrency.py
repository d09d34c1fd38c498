"""How many deliveries one destination gets at once when its tunnel leaves it to the relay.

A tunnel with ``--max-concurrency N`` gets N, always: a number a user set is a promise to
the app (a database pool, a single worker). A tunnel left at ``auto`` (the default) starts
with ``AUTO_MIN`` delivery slots and gets more while its app answers as fast with more in
flight as it did with fewer: the idea of TCP Vegas (Brakmo and Peterson, "TCP Vegas: End
to End Congestion Avoidance on a Global Internet", IEEE JSAC 13(8), 1995), applied to
requests as Envoy's adaptive concurrency filter and Netflix's concurrency-limits do. Only
agent destinations grow: attempts at an ``http(s)://`` destination carry no answer time
(they share the server's one connection pool with every tenant's), so theirs stay at
``AUTO_MIN``.

- An answer time is the time from an attempt's OPEN to its answer's head, in seconds.
- Answer times are taken in rounds of ``limit`` answers. A round whose median is within
  ``2 x fastest + GRACE`` adds one slot, up to ``AUTO_MAX``, if the limit held a delivery
  back during the round (without a queue, more slots would prove nothing); a round whose
  median is over it takes a quarter of the slots away, down to ``AUTO_MIN``.
- An answer of 429 or 503 (the app says it is overloaded: RFC 6585 4, RFC 9110 15.6.4)
  takes a quarter away at once; an attempt that reached the app but got no answer (it
  timed out, or the app is unreachable) takes the limit back to ``AUTO_MIN``.
- ``fastest`` is the fastest answer since the limit started (TCP Vegas' BaseRTT): the
  first answer of a burst to an idle app is its service time alone. It is never forgotten
  by count: had it been (a window of answers), a single worker kept busy for a few seconds
  at 8 would have made its 8-deep queueing time "the fastest", and grown (a review found
  it at 53 slots). It is forgotten only after ``IDLE_FORGET`` seconds with nothing in
  flight, when the next burst's first answer comes from an app our traffic left idle; an
  agent arriving, or the app reported up again, takes the limit back to ``AUTO_MIN`` and
  keeps it (a slower app behind it then only grows less).

An app that answers one request at a time answers the n-th of a burst in n service times:
its medians are far over twice the first answer, and its tunnel stays at ``AUTO_MIN``, as
with the fixed default before. One that answers in well under a millisecond may go a
little over it (the ``GRACE``: 0.5 ms a request reached 14-17), each request then
waiting a few milliseconds more: no timeout is near.

What the rule cannot see: a first answer that was slow for another reason (a cold start)
while answers queue behind it. ``fastest`` is then at most the 8-deep queueing time, and
a single worker grows to about 17 (``2 x 8`` plus the grace) until the next idle time:
each request then waits at most 17 of its service times (a review measured 17-18 for a
10 ms app whose first answer took 300 ms).

Measured on the bench's node app (docs/performance.md, "Counting without locks"): the
median answer rose from 2.2 ms at 8 slots to 3.1-3.4 at 32 and 10.9-11.7 at 64, so the
limit settles between them.
"""

from __future__ import annotations

import math
import statistics

#: Delivery slots of an ``auto`` tunnel to start with, and the fewest it goes down to:
#: the fixed default before (protects a development server from a burst: README, "Bursts").
AUTO_MIN = 8
#: The most an ``auto`` tunnel grows to: beyond it a burst is a denial of service on the
#: app rather than a drain, and the bench's queue mode gained nothing past 64.
AUTO_MAX = 64
#: Seconds an answer may take over twice the fastest and still count as "as fast": the
#: relay's own queueing under load (a loop pass, a commit) is a few milliseconds and must
#: not read as the app's.
GRACE = 0.005
#: Seconds without a delivery in flight after which a destination's limit starts anew
#: (from ``AUTO_MIN``, its fastest answer forgotten): the burst is over, and the app may
#: be another by the next one (restarted, redeployed, another agent's).
IDLE_FORGET = 60.0
#: Statuses that say the app is overloaded.
OVERLOADED = frozenset({429, 503})


class AdaptiveLimit:
    """The delivery slots of one ``auto`` destination (see the module's docstring).

    ``limit`` is how many deliveries may be in flight now, ``AUTO_MIN`` to ``AUTO_MAX``.
    Call ``held_back`` when a delivery had to wait for a slot, ``answered`` with each
    answer time and status (it returns True when the limit went up: whoever waits for a
    slot should look again), ``restart`` when an attempt reached the app but no answer.
    """

    def __init__(self) -> None:
        self.limit = AUTO_MIN
        #: The fastest answer since the limit started, in seconds (``inf`` before the first).
        self.fastest = math.inf
        self._round: list[float] = []
        self._held_back = False

    def held_back(self) -> None:
        """A delivery waited for a slot: the limit is what bounds the work now."""
        self._held_back = True

    def answered(self, seconds: float, status: int) -> bool:
        """The app answered ``status`` after ``seconds``."""
        if status in OVERLOADED:  # a rate limiter's quick refusal is no service time
            self._decrease()
            return False
        self.fastest = min(self.fastest, seconds)
        self._round.append(seconds)
        if len(self._round) < self.limit:
            return False
        median = statistics.median(self._round)
        grow = self._held_back and median <= 2 * self.fastest + GRACE
        shrink = median > 2 * self.fastest + GRACE
        self._round.clear()
        self._held_back = False
        if grow and self.limit < AUTO_MAX:
            self.limit += 1
            return True
        if shrink:
            self._decrease()
        return False

    def restart(self) -> None:
        """Back to ``AUTO_MIN``, the fastest answer kept: an attempt reached the app but got
        no answer (timed out, unreachable), or another agent came, or the app is back up
        (most often the same app: had the fastest been forgotten, answers queued behind
        the burst still in flight would have become "the fastest", and a single worker
        would have grown: a second review found 18 slots)."""
        self.limit = AUTO_MIN
        self._round.clear()
        self._held_back = False

    def _decrease(self) -> None:
        self.limit = max(AUTO_MIN, self.limit - max(1, self.limit // 4))
        self._round.clear()
        self._held_back = False
