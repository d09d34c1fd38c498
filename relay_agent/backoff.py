"""Reconnect policy: a pure backoff generator and the one "retry or give up" rule."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from relay_protocol.frames import FINAL_CLOSE_CODES

#: First delay before reconnecting, in seconds.
BACKOFF_BASE = 0.5
#: Longest delay between attempts: a laptop back online reconnects within 30 s.
BACKOFF_CAP = 30.0

#: Close codes after which reconnecting cannot help (docs/protocol.md): the
#: protocol's final codes, 4001 bad/expired/revoked token, 4003 name refused,
#: 4005 protocol version.
FATAL_CLOSE_CODES = FINAL_CLOSE_CODES


def backoff(
    base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP, rand: Callable[[], float] = random.random
) -> Iterator[float]:
    """Delays for successive attempts: exponential, capped, with "equal jitter"
    (half fixed, half random) so that agents cut off together do not return together."""
    attempt = 0
    while True:
        ceiling = min(cap, base * 2**attempt)
        yield ceiling / 2 + rand() * ceiling / 2
        attempt += 1


def should_retry(close_code: int | None) -> bool:
    """Retry network failures and server restarts; never authentication or naming refusals."""
    return close_code not in FATAL_CLOSE_CODES
