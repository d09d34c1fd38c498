"""When to try a failed delivery again: a pure schedule, testable on a fake clock."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from .durations import parse_duration

#: Default delays before attempts 2, 3, ... (seconds): 5 s, 30 s, 2 min, 10 min,
#: 30 min, 1 h, 3 h, 6 h, 12 h, 24 h; after the last one the event is dead.
DEFAULT_SCHEDULE = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0)
#: An event older than this is dead, whatever the schedule says: three days.
DEFAULT_MAX_AGE = 3 * 86400.0
#: Each delay is moved by up to this fraction either way, so events that failed
#: together are not all retried in the same instant.
JITTER = 0.1
#: Longest Retry-After honoured: a server asking for more gets the event back a day later.
MAX_RETRY_AFTER = 86400.0


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    max_age: float = DEFAULT_MAX_AGE


def next_attempt_at(
    policy: RetryPolicy,
    failures: int,
    received_at: float,
    now: float,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """When to try again after ``failures`` failed attempts, or None to give up (dead).

    ``retry_after`` (seconds, from the destination's Retry-After) replaces the
    scheduled delay; jitter applies to the schedule only.
    """
    if failures > len(policy.schedule):
        return None
    if retry_after is not None:
        delay = min(max(retry_after, 0.0), MAX_RETRY_AFTER)
    else:
        delay = policy.schedule[failures - 1] * (1 + JITTER * (2 * rand() - 1))
    when = now + delay
    if when > received_at + policy.max_age:
        return None
    return when


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²"
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def parse_schedule(text: str) -> tuple[float, ...]:
    """``5s,30s,2m`` -> (5.0, 30.0, 120.0); raises ValueError."""
    delays = tuple(float(parse_duration(part)) for part in text.split(",") if part.strip())
    if not delays:
        raise ValueError("the retry schedule needs at least one delay")
    return delays
