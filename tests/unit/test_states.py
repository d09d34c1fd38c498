"""Delivery states on a fake clock: ``settle`` (what one attempt's outcome does to a
delivery), and how the API shows the states (``summary_status``, ``event_json``)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from relay_server.retry import DEFAULT_SCHEDULE, RetryPolicy
from relay_server.states import MAX_ERROR, NOT_REACHED_DELAY, Outcome, event_json, settle, summary_status
from relay_server.store import Delivery, Event, Store

#: The fake clock's "now": an arbitrary fixed instant.
T0 = 1_700_000_000.0
RETRY_ON = (429, 502, 503, 504)
POLICY = RetryPolicy()
NOT_REACHED = Outcome(None, "no agent connected", reached=False)


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the delay exactly as scheduled


def _delivery(status: str = "pending", failures: int = 0, attempts: int = 0, due: float = T0) -> Delivery:
    return Delivery(1, "alice", "agent:*", status, attempts, due, failures=failures)


def _settle(
    delivery: Delivery,
    outcome: Outcome,
    *,
    now: float,
    scheduled: bool = True,
    policy: RetryPolicy = POLICY,
    retry_on: tuple[int, ...] = RETRY_ON,
    since: float = T0,
) -> Delivery:
    return settle(
        delivery,
        outcome,
        scheduled=scheduled,
        policy=policy,
        retry_on=retry_on,
        since=since,
        now=now,
        rand=no_jitter,
    )


# -- (a) a failure at the destination of a scheduled attempt ---------------------------------


@pytest.mark.parametrize("outcome", [Outcome(503), Outcome(None, "no answer within 30s")])
def test_a_scheduled_failure_at_the_destination_advances_the_schedule(outcome: Outcome) -> None:
    first = _settle(_delivery(), outcome, now=T0)
    assert (first.status, first.failures, first.attempts) == ("retrying", 1, 1)
    assert first.next_attempt_at == T0 + DEFAULT_SCHEDULE[0]
    assert (first.last_status, first.last_error) == (outcome.status, outcome.error)
    assert first.dead_reason is None
    now = T0 + DEFAULT_SCHEDULE[0]
    second = _settle(first, outcome, now=now)
    assert (second.status, second.failures, second.attempts) == ("retrying", 2, 2)
    assert second.next_attempt_at == now + DEFAULT_SCHEDULE[1]


def test_every_step_of_the_schedule_in_turn() -> None:
    delivery, now = _delivery(), T0
    for failures, delay in enumerate(DEFAULT_SCHEDULE, start=1):
        delivery = _settle(delivery, Outcome(502), now=now)
        assert (delivery.status, delivery.failures) == ("retrying", failures)
        assert delivery.next_attempt_at == now + delay
        now = delivery.next_attempt_at


# -- (b) an attempt that never reached the destination ----------------------------------------


@pytest.mark.parametrize(("status", "failures"), [("pending", 0), ("retrying", 3)])
def test_not_reached_keeps_failures_and_state_and_counts_the_attempt(status: str, failures: int) -> None:
    # Due now: it is due again NOT_REACHED_DELAY later.
    delivery = _delivery(status, failures=failures, attempts=5, due=T0 + 10)
    now = T0 + 20
    after = _settle(delivery, NOT_REACHED, now=now)
    assert (after.status, after.failures, after.attempts) == (status, failures, 6)
    assert after.next_attempt_at == now + NOT_REACHED_DELAY
    assert after.last_error == "no agent connected"
    assert after.last_status is None
    assert after.dead_reason is None


@pytest.mark.parametrize("scheduled", [True, False])
def test_not_reached_waits_for_its_scheduled_time_when_that_is_later(scheduled: bool) -> None:
    delivery = _delivery("retrying", failures=2, attempts=2, due=T0 + 600)
    after = _settle(delivery, NOT_REACHED, now=T0 + 100, scheduled=scheduled)
    assert (after.status, after.failures, after.attempts) == ("retrying", 2, 3)
    assert after.next_attempt_at == T0 + 600


def test_not_reached_just_before_the_scheduled_time_waits_the_delay() -> None:
    due = T0 + 100
    delivery = _delivery("retrying", failures=1, due=due)
    after = _settle(delivery, NOT_REACHED, now=due - NOT_REACHED_DELAY / 2)
    assert after.next_attempt_at == due - NOT_REACHED_DELAY / 2 + NOT_REACHED_DELAY


def test_not_reached_with_a_retry_after_spends_no_step() -> None:
    # Not reached means the app never answered: no Retry-After can come with it, but
    # even a stray one does not count as a failure.
    after = _settle(_delivery(), Outcome(None, "agent: refused", 3600.0, reached=False), now=T0)
    assert (after.status, after.failures) == ("pending", 0)


# -- (c) an early attempt (an agent came, or its app is up again) ----------------------------


@pytest.mark.parametrize("outcome", [Outcome(503), Outcome(None, "no answer within 30s")])
def test_an_early_failure_keeps_failures_and_the_scheduled_time(outcome: Outcome) -> None:
    delivery = _delivery("retrying", failures=4, attempts=4, due=T0 + 1800)
    after = _settle(delivery, outcome, now=T0 + 60, scheduled=False)
    assert (after.status, after.failures, after.attempts) == ("retrying", 4, 5)
    assert after.next_attempt_at == T0 + 1800
    assert after.last_status == outcome.status


def test_an_early_failure_of_a_pending_delivery_stays_pending() -> None:
    after = _settle(_delivery("pending", due=T0 + 50), Outcome(503), now=T0 + 1, scheduled=False)
    assert (after.status, after.failures, after.next_attempt_at) == ("pending", 0, T0 + 50)


def test_an_early_failure_honours_a_later_retry_after() -> None:
    delivery = _delivery("retrying", failures=1, due=T0 + 30)
    after = _settle(delivery, Outcome(503, None, 120.0), now=T0 + 10, scheduled=False)
    assert (after.failures, after.next_attempt_at) == (1, T0 + 130)


# -- (d) an event dies by the clock, never by agents coming and going ---------------------------


def test_a_thousand_unreached_or_early_failures_never_kill_a_delivery() -> None:
    policy = RetryPolicy(schedule=(5.0, 10.0), max_age=86400.0)
    delivery = _settle(_delivery(), Outcome(503), now=T0, policy=policy)  # one reached failure
    assert (delivery.status, delivery.failures) == ("retrying", 1)
    now = T0
    kinds = itertools.cycle(
        [
            (NOT_REACHED, True),
            (NOT_REACHED, False),
            (Outcome(503), False),  # early, the app still down
            (Outcome(None, "no answer within 30s"), False),
            (Outcome(None, "agent: connection lost", reached=False), True),
        ]
    )
    for _, (outcome, scheduled) in zip(range(1000), kinds, strict=False):
        now += 1.0  # 1,000 s: well within the max age
        delivery = _settle(delivery, outcome, now=now, scheduled=scheduled, policy=policy)
        assert (delivery.status, delivery.failures) == ("retrying", 1)
        assert delivery.dead_reason is None
        assert delivery.next_attempt_at is not None
    assert delivery.attempts == 1001
    # The clock does: two more scheduled failures at the destination pass the schedule.
    delivery = _settle(delivery, Outcome(503), now=now, policy=policy)
    assert (delivery.status, delivery.failures) == ("retrying", 2)
    delivery = _settle(delivery, Outcome(504), now=now + 10, policy=policy)
    assert (delivery.status, delivery.failures) == ("dead", 3)
    assert delivery.next_attempt_at is None
    assert delivery.dead_reason == "gave up after 3 failed attempts; the last: 504"


def test_not_reached_failures_in_between_do_not_shorten_the_schedule() -> None:
    policy = RetryPolicy(schedule=(5.0, 30.0, 120.0), max_age=86400.0)
    delivery, now = _delivery(), T0
    for step in range(len(policy.schedule)):
        delivery = _settle(delivery, Outcome(503), now=now, policy=policy)
        assert (delivery.status, delivery.failures) == ("retrying", step + 1)
        for _ in range(100):
            now += 0.5
            delivery = _settle(delivery, NOT_REACHED, now=now, policy=policy)
        now = max(now, delivery.next_attempt_at or now)
    delivery = _settle(delivery, Outcome(None, "no answer within 30s"), now=now, policy=policy)
    assert delivery.status == "dead"
    assert delivery.failures == len(policy.schedule) + 1
    assert delivery.attempts == len(policy.schedule) * 101 + 1
    assert delivery.dead_reason == "gave up after 4 failed attempts; the last: no answer within 30s"


def test_a_scheduled_failure_past_the_max_age_is_dead_by_the_max_age() -> None:
    policy = RetryPolicy(schedule=DEFAULT_SCHEDULE, max_age=3600.0)
    delivery = _settle(_delivery(), Outcome(503), now=T0, policy=policy)
    # Its next step (30 s) would fall after the max age: dead, and it says why.
    delivery = _settle(delivery, Outcome(503), now=T0 + 3590, policy=policy)
    assert (delivery.status, delivery.failures) == ("dead", 2)
    assert delivery.dead_reason == "not delivered within the max age; the last attempt: 503"


def test_the_next_attempt_is_never_after_the_max_age() -> None:
    policy = RetryPolicy(schedule=DEFAULT_SCHEDULE, max_age=3600.0)
    delivery = _delivery("retrying", failures=1, due=T0 + 3000)
    # Not reached so close to the max age that the next try would come after it: dead.
    after = _settle(delivery, NOT_REACHED, now=T0 + 3599.5, policy=policy)
    assert after.status == "dead"
    assert (after.dead_reason or "").startswith("not delivered within the max age")


def test_a_not_reached_attempt_after_the_max_age_is_not_due_again_at_once() -> None:
    policy = RetryPolicy(schedule=DEFAULT_SCHEDULE, max_age=3600.0)
    delivery = _delivery("retrying", failures=1, due=T0 + 3599)
    now = T0 + 3610  # the max age passed 10 s ago; the expiry sweep has not run yet
    after = _settle(delivery, NOT_REACHED, now=now, policy=policy)
    assert after.status == "dead"
    # The same for an early attempt past the max age.
    assert _settle(delivery, Outcome(503), now=now, policy=policy, scheduled=False).status == "dead"


def test_the_expiry_sweep_kills_by_the_max_age_whatever_the_attempts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        old = Event(0, "evt_old", "alice", "alice", T0, "POST", b"/", (), "", b"x")
        new = Event(0, "evt_new", "alice", "alice", T0 + 3000, "POST", b"/", (), "", b"x")
        replayed = Event(0, "evt_replayed", "alice", "alice", T0, "POST", b"/", (), "", b"x")
        seqs = store.transaction(
            [
                Store.insert_event_op(e, [Delivery(0, "alice", "agent:*", "pending", 0, T0)])
                for e in (old, new, replayed)
            ]
        )
        # 1,000 attempts that never reached the app: still waiting.
        [current] = store.deliveries(seqs[0])
        store.transaction([Store.update_delivery_op(replace(current, attempts=1000, status="pending"))])
        # A replay restarts the max age.
        [current] = store.deliveries(seqs[2])
        store.transaction([Store.update_delivery_op(replace(current, since=T0 + 3000))])
        now, max_age = T0 + 3601, 3600.0  # the sweep of Deliveries._maintain, one max age on
        assert store.expire(now - max_age, "not delivered within the max age") == 1
        [dead] = store.deliveries(seqs[0])
        assert (dead.status, dead.dead_reason, dead.next_attempt_at) == (
            "dead",
            "not delivered within the max age",
            None,
        )
        assert dead.attempts == 1000
        assert store.deliveries(seqs[1])[0].status == "pending"
        assert store.deliveries(seqs[2])[0].status == "pending"
    finally:
        store.close()


# -- (e) what the destination's status does ------------------------------------------------------


def test_410_gone_is_dead_with_a_reason() -> None:
    after = _settle(_delivery(), Outcome(410), now=T0)
    assert (after.status, after.failures, after.attempts, after.last_status) == ("dead", 0, 1, 410)
    assert after.next_attempt_at is None
    assert after.dead_reason == "the destination answered 410 Gone"


@pytest.mark.parametrize("status", [200, 201, 204, 299, 301, 400, 401, 404, 409, 422, 500, 501])
def test_a_status_outside_retry_on_is_delivered(status: int) -> None:
    for scheduled in (True, False):
        before = _delivery("retrying", failures=3, attempts=7, due=T0)
        after = _settle(before, Outcome(status), now=T0 + 1, scheduled=scheduled)
        assert (after.status, after.attempts, after.last_status) == ("delivered", 8, status)
        assert after.next_attempt_at is None
        assert after.dead_reason is None


@pytest.mark.parametrize("status", RETRY_ON)
def test_retry_on_statuses_retry(status: int) -> None:
    after = _settle(_delivery(), Outcome(status), now=T0)
    assert (after.status, after.failures, after.last_status) == ("retrying", 1, status)


def test_retry_on_is_the_tunnels_own() -> None:
    retry_on = (500,)
    assert _settle(_delivery(), Outcome(500), now=T0, retry_on=retry_on).status == "retrying"
    assert _settle(_delivery(), Outcome(503), now=T0, retry_on=retry_on).status == "delivered"
    # Listed in retry_on, even 410 is retried like the others.
    assert _settle(_delivery(), Outcome(410), now=T0, retry_on=(410,)).status == "retrying"


def test_retry_after_sets_the_next_attempt() -> None:
    after = _settle(_delivery(), Outcome(429, None, 120.0), now=T0)
    assert (after.status, after.failures, after.next_attempt_at) == ("retrying", 1, T0 + 120)
    shorter = _settle(_delivery(), Outcome(503, None, 0.0), now=T0)
    assert shorter.next_attempt_at == T0


def test_a_retry_after_beyond_the_max_age_is_dead() -> None:
    policy = RetryPolicy(max_age=600.0)
    after = _settle(_delivery(), Outcome(503, None, 3600.0), now=T0, policy=policy)
    assert after.status == "dead"
    assert after.dead_reason is not None and "max age" in after.dead_reason


def test_a_replay_restarts_the_max_age() -> None:
    policy = RetryPolicy(max_age=3600.0)
    now = T0 + 10 * 3600  # ten max ages after the event arrived
    stale = _settle(_delivery(due=now), Outcome(503), now=now, policy=policy, since=T0)
    assert stale.status == "dead"
    assert stale.dead_reason is not None and "max age" in stale.dead_reason
    replayed = _settle(_delivery(due=now), Outcome(503), now=now, policy=policy, since=now - 1)
    assert (replayed.status, replayed.next_attempt_at) == ("retrying", now + DEFAULT_SCHEDULE[0])


# -- how users see it ------------------------------------------------------------------------------


def _d(status: str, destination: str = "agent:*", **fields: object) -> Delivery:
    return replace(Delivery(1, "alice", destination, status), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("statuses", "summary"),
    [
        ([], "pending"),
        (["pending"], "pending"),
        (["retrying"], "retrying"),
        (["delivered"], "delivered"),
        (["dead"], "dead"),
        (["delivered", "dead"], "dead"),
        (["delivered", "pending"], "pending"),
        (["dead", "pending"], "pending"),
        (["pending", "retrying", "delivered"], "retrying"),
    ],
)
def test_summary_status_is_the_least_advanced(statuses: list[str], summary: str) -> None:
    deliveries = [_d(s, f"agent:a{i}") for i, s in enumerate(statuses)]
    assert summary_status(deliveries) == summary


def test_event_json_shows_states_and_dead_reasons() -> None:
    event = Event(1, "evt_1", "alice", "alice", T0, "POST", b"/hook", ((b"A", b"b"),), "1.2.3.4", b"{}")
    gone = _settle(_delivery(), Outcome(410), now=T0)
    waiting = _settle(_delivery(), Outcome(503), now=T0)
    unreached = _settle(_delivery(), NOT_REACHED, now=T0)
    delivered = _settle(_delivery(), Outcome(200), now=T0)
    deliveries = [
        replace(gone, destination="agent:a"),
        replace(waiting, destination="agent:b"),
        replace(unreached, destination="agent:c"),
        replace(delivered, destination="agent:d"),
    ]
    shown = event_json(event, deliveries, with_body=True)
    assert shown["status"] == "retrying"
    assert shown["received_at"] == "2023-11-14T22:13:20.000Z"
    assert (shown["body"], shown["body_encoding"]) == ("{}", "utf-8")
    by = {d["destination"]: d for d in shown["deliveries"]}
    assert by["agent:a"]["status"] == "dead"
    assert by["agent:a"]["dead_reason"] == "the destination answered 410 Gone"
    assert by["agent:a"]["next_attempt_at"] is None
    assert (by["agent:b"]["status"], by["agent:b"]["dead_reason"]) == ("retrying", None)
    assert by["agent:b"]["next_attempt_at"] == "2023-11-14T22:13:25.000Z"
    assert (by["agent:c"]["status"], by["agent:c"]["last_error"]) == ("pending", "no agent connected")
    assert by["agent:c"]["attempts"] == 1
    assert (by["agent:d"]["status"], by["agent:d"]["last_status"], by["agent:d"]["next_attempt_at"]) == (
        "delivered",
        200,
        None,
    )
    assert event_json(event, [deliveries[0]])["status"] == "dead"
    assert event_json(event, [deliveries[2]])["status"] == "pending"
    assert event_json(event, [deliveries[3]])["status"] == "delivered"
    assert "body" not in event_json(event, deliveries)


def test_a_final_outcome_is_dead_at_once_whatever_the_schedule() -> None:
    # A stored request that can no longer be forwarded (its head, with the X-Relay-*
    # headers, is over the protocol's limit): no attempt can ever succeed.
    why = "the stored request cannot be forwarded: head too large"
    for scheduled in (True, False):
        after = _settle(
            _delivery("retrying", failures=1, due=T0),
            Outcome(None, why, final=True),
            now=T0,
            scheduled=scheduled,
        )
        assert (after.status, after.dead_reason, after.next_attempt_at) == ("dead", why, None)


@pytest.mark.parametrize(
    "error",
    ["agent: " + "e" * 1017, "agent: " + "\u00e9" * 193, "agent: " + "\U0001f600" * 193],
    ids=["1 KiB", "latin", "emoji"],
)
def test_an_outcomes_error_is_kept_to_max_error_bytes(error: str) -> None:
    # Found by a third review: an agent's RESET reason (1 KiB, 64 KiB from a custom agent)
    # or 200 characters of four bytes each outgrew the room a delivery's row holds.
    after = _settle(_delivery(), Outcome(None, error), now=T0)
    assert after.last_error is not None
    assert len(after.last_error.encode()) <= MAX_ERROR
    assert error.startswith(after.last_error)
