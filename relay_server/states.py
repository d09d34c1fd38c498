"""Delivery states: what one attempt's outcome does to a delivery, and how users see it.

A delivery is ``pending`` (waiting for its first attempt, or for an agent),
``retrying`` (the destination failed; the next attempt is scheduled), ``delivered``
or ``dead`` (given up, with the reason). ``settle`` is the one transition function,
pure so that it is tested on a fake clock: the retry schedule advances only on a
failure *at the destination* of an attempt the schedule asked for. An attempt that
never reached the destination (no agent, the agent's connection lost mid-attempt),
or one made early because an agent connected or reported its app up again, spends no
step: an event dies by the clock (its schedule and ``--max-age``), never because an
agent or the server restarted N times.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .retry import RetryPolicy, next_attempt_at
from .store import Attempt, Delivery, Event, changed

#: Seconds before an attempt that never reached its destination is made again (unless
#: an agent connects first): short, since it spends no step of the schedule, yet not a
#: busy loop while, say, the agent refuses new streams.
NOT_REACHED_DELAY = 1.0
#: Bytes (UTF-8) of an outcome's error kept in a delivery's record: its row holds room
#: for that much (``store.OUTCOME_ROOM``). A review saw errors of 1 KiB from an agent's
#: RESET reason (64 KiB from a custom agent) and of 200 emoji, four bytes each.
MAX_ERROR = 200


def clip_error(error: str | None) -> str | None:
    """``error`` cut to at most ``MAX_ERROR`` bytes of UTF-8, on a character boundary."""
    if error is None or len(error) * 4 <= MAX_ERROR:
        return error
    return error.encode()[:MAX_ERROR].decode(errors="ignore")


#: The order in which an event's overall state is the least advanced of its destinations'.
_SUMMARY_ORDER = ("retrying", "pending", "dead", "delivered")


@dataclass(frozen=True)
class Outcome:
    """What one attempt found: the destination's status, or the error that kept it from answering.

    ``reached`` is False when the request never got to the destination's app: no
    agent was connected, the agent refused the stream, or its connection was lost
    before an answer came. ``final`` is True when no attempt can ever succeed (the
    stored request cannot be forwarded): the delivery is dead at once, ``error`` why.
    ``answered_in`` is the seconds from sending the request to the answer's head (None
    without an answer): what an ``auto`` tunnel's delivery slots go by (concurrency.py).
    """

    status: int | None
    error: str | None = None
    retry_after: float | None = None
    reached: bool = True
    final: bool = False
    answered_in: float | None = None


def settle(
    delivery: Delivery,
    outcome: Outcome,
    *,
    scheduled: bool,
    policy: RetryPolicy,
    retry_on: tuple[int, ...],
    since: float,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Delivery:
    """The delivery after one more attempt with ``outcome``.

    ``scheduled`` is False for an attempt made before the delivery's next attempt was
    due (an agent connected, or reported its app up again): its failure keeps the
    schedule where it was. ``since`` is when the schedule and the max age started (the
    event's arrival, or its last replay). A ``Retry-After`` from the destination sets the
    next attempt.
    """
    error = clip_error(outcome.error)

    def after(**changes: Any) -> Delivery:  # one copy per attempt: each costs microseconds
        return changed(
            delivery, attempts=delivery.attempts + 1, last_status=outcome.status, last_error=error, **changes
        )

    if outcome.status is not None and outcome.status not in retry_on:
        if outcome.status == 410:  # 410 Gone: the destination wants no more of it
            return after(status="dead", next_attempt_at=None, dead_reason="the destination answered 410 Gone")
        return after(status="delivered", next_attempt_at=None)
    if outcome.final:
        return after(status="dead", next_attempt_at=None, dead_reason=error)
    failures = delivery.failures
    last = outcome.status or error or "no answer"
    if not outcome.reached:
        when: float | None = max(delivery.next_attempt_at or now, now + NOT_REACHED_DELAY)
    elif not scheduled:
        when = max(delivery.next_attempt_at or now, now + (outcome.retry_after or 0.0))
    else:
        failures += 1
        when = next_attempt_at(policy, failures, since, now, outcome.retry_after, rand)
        if when is None and failures > len(policy.schedule):
            why = f"gave up after {failures} failed attempts; the last: {last}"
            return after(status="dead", failures=failures, next_attempt_at=None, dead_reason=why)
    if when is None or when > since + policy.max_age:
        why = f"not delivered within the max age; the last attempt: {last}"
        return after(status="dead", failures=failures, next_attempt_at=None, dead_reason=why)
    return after(status="retrying" if failures else "pending", failures=failures, next_attempt_at=when)


def received_at_text(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_json(
    event: Event, deliveries: list[Delivery], with_body: bool = False, attempts: list[Attempt] | None = None
) -> dict[str, Any]:
    """The API's view of an event; with ``attempts`` (``Store.attempts``), each delivery
    lists every attempt: ``{"attempt": N, "at": TIME, "status": CODE|null, "error": TEXT|null}``."""
    data: dict[str, Any] = {
        "id": event.id,
        "tunnel": event.tunnel,
        "received_at": received_at_text(event.received_at),
        "method": event.method,
        "target": event.target.decode("utf-8", "replace"),
        "client": event.client,
        "status": summary_status(deliveries),
        "deliveries": [
            {
                "destination": d.destination,
                "status": d.status,
                "attempts": d.attempts,
                "next_attempt_at": received_at_text(d.next_attempt_at)
                if d.next_attempt_at and d.waiting
                else None,
                "last_status": d.last_status,
                "last_error": d.last_error,
                "dead_reason": d.dead_reason,
            }
            for d in deliveries
        ],
    }
    if attempts is not None:
        for shown in data["deliveries"]:
            shown["history"] = [
                {"attempt": a.attempt, "at": received_at_text(a.at), "status": a.status, "error": a.error}
                for a in attempts
                if a.destination == shown["destination"]
            ]
    if with_body:
        data["headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers]
        try:
            data["body"] = event.body.decode("utf-8")
            data["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            data["body"] = base64.b64encode(event.body).decode()
            data["body_encoding"] = "base64"
    return data


def summary_status(deliveries: list[Delivery]) -> str:
    """One word for an event: the least advanced state among its destinations."""
    states = {d.status for d in deliveries}
    return next((s for s in _SUMMARY_ORDER if s in states), "pending")
