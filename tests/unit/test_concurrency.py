"""An ``auto`` tunnel's delivery slots (relay_server/concurrency.py): they grow while the
app answers as fast with more in flight, and stay at the floor for an app that does not.

Answer times are given, not measured: no verdict here depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from relay_server.concurrency import AUTO_MAX, AUTO_MIN, GRACE, IDLE_FORGET, AdaptiveLimit
from relay_server.delivery import Deliveries
from relay_server.dispatcher import Dispatcher
from relay_server.settings import ANY_AGENT, TunnelSettings
from relay_server.states import Outcome

#: Seconds any wait may take before the test fails instead of hanging.
WAIT = 10.0


def _round(limit: AdaptiveLimit, seconds: float, *, held_back: bool = True, status: int = 200) -> bool:
    """One round of ``limit.limit`` answers of ``seconds`` each; True if the limit went up."""
    if held_back:
        limit.held_back()
    return any([limit.answered(seconds, status) for _ in range(limit.limit)])


def test_a_fast_app_that_keeps_up_gets_one_more_slot_a_round_up_to_the_most() -> None:
    limit = AdaptiveLimit()
    assert limit.limit == AUTO_MIN
    assert _round(limit, 0.002) is True
    assert limit.limit == AUTO_MIN + 1
    while _round(limit, 0.002):
        pass
    assert limit.limit == AUTO_MAX
    assert _round(limit, 0.002) is False and limit.limit == AUTO_MAX


def test_without_a_delivery_held_back_the_limit_does_not_grow() -> None:
    # Fast answers with slots to spare prove nothing about more slots.
    limit = AdaptiveLimit()
    for _ in range(10):
        assert _round(limit, 0.001, held_back=False) is False
    assert limit.limit == AUTO_MIN


def test_an_app_that_answers_one_at_a_time_stays_at_the_floor() -> None:
    # A burst of 200 to a single worker that takes 0.1 s a request: eight in flight, the
    # n-th answer of each round after n service times.
    limit = AdaptiveLimit()
    for _ in range(25):
        limit.held_back()
        for position in range(1, limit.limit + 1):
            limit.answered(0.1 * position, 200)
        assert limit.limit == AUTO_MIN


def test_answers_slower_than_twice_the_fastest_take_a_quarter_away() -> None:
    limit = AdaptiveLimit()
    while limit.limit < 40:
        _round(limit, 0.002)
    slow = 2 * limit.fastest + GRACE + 0.001
    _round(limit, slow)
    assert limit.limit == 30
    while limit.limit > AUTO_MIN:
        _round(limit, slow)
    assert limit.limit == AUTO_MIN  # never under the floor


@pytest.mark.parametrize("status", [429, 503])
def test_an_overloaded_answer_takes_a_quarter_away_at_once(status: int) -> None:
    limit = AdaptiveLimit()
    while limit.limit < 40:
        _round(limit, 0.002)
    assert limit.answered(0.002, status) is False
    assert limit.limit == 30


def test_an_attempt_without_an_answer_starts_again_at_the_floor() -> None:
    limit = AdaptiveLimit()
    while limit.limit < 20:
        _round(limit, 0.002)
    limit.restart()
    assert limit.limit == AUTO_MIN


@pytest.mark.parametrize("service", [0.005, 0.01, 0.05, 0.1])
def test_a_single_worker_kept_busy_for_a_long_burst_stays_at_the_floor(service: float) -> None:
    # The n-th answer of a burst takes n service times; once the queue is full, every
    # answer takes ``limit`` of them. A fastest answer forgotten by count would, after a
    # few hundred answers, be that queueing time itself, and the limit would grow round
    # after round (a review saw a 10 ms single worker at 53 slots).
    limit = AdaptiveLimit()
    for answered in range(5000):
        if answered % limit.limit == 0:
            limit.held_back()  # a long burst: deliveries always wait
        limit.answered(min(answered + 1, limit.limit) * service, 200)
        assert limit.limit == AUTO_MIN
    assert limit.fastest == service


def test_a_quick_refusal_is_not_taken_for_the_fastest_answer() -> None:
    limit = AdaptiveLimit()
    limit.answered(0.0001, 429)  # a rate limiter's instant 429
    assert limit.fastest > 1
    limit.answered(0.002, 200)
    assert limit.fastest == 0.002


def _dispatcher() -> Dispatcher:
    # take_slot, release and attempt_ended never touch the deliveries.
    return Dispatcher(cast(Deliveries, None), "alice", ANY_AGENT)


async def test_an_auto_tunnel_gives_a_slot_it_adds_to_whoever_waited_longest() -> None:
    dispatcher, auto = _dispatcher(), TunnelSettings()
    for i in range(AUTO_MIN):
        assert await dispatcher.take_slot(f"e{i}", auto, 0)
    assert await dispatcher.take_slot("late", auto, 0) is False  # eight in flight: full
    waiting = [asyncio.create_task(dispatcher.take_slot(f"w{i}", auto, WAIT)) for i in range(3)]
    while len(dispatcher._slot_line) < 3:
        await asyncio.sleep(0)
    # A round of fast answers from attempts that keep their slots (still being recorded).
    for _ in range(AUTO_MIN):
        dispatcher.attempt_ended(Outcome(200, answered_in=0.002))
    assert dispatcher.slots == AUTO_MIN + 1
    assert await asyncio.wait_for(waiting[0], WAIT) is True
    assert not waiting[1].done() and not waiting[2].done()
    assert len(dispatcher.in_flight) == AUTO_MIN + 1
    for task in waiting[1:]:
        task.cancel()
    await asyncio.gather(*waiting[1:], return_exceptions=True)


async def test_a_number_the_tunnel_set_is_kept_whatever_the_answers() -> None:
    dispatcher, fixed = _dispatcher(), TunnelSettings(max_concurrency=2)
    for i in range(2):
        assert await dispatcher.take_slot(f"e{i}", fixed, 0)
    assert await dispatcher.take_slot("late", fixed, 0) is False
    for _ in range(10 * AUTO_MAX):
        dispatcher.attempt_ended(Outcome(200, answered_in=0.001))
    assert dispatcher.slots == 2
    assert await dispatcher.take_slot("late", fixed, 0) is False


async def test_outcomes_without_an_answer_send_an_auto_tunnel_back_to_the_floor() -> None:
    dispatcher, auto = _dispatcher(), TunnelSettings()
    assert await dispatcher.take_slot("e", auto, 0)
    dispatcher.adaptive.limit = 20
    dispatcher.attempt_ended(Outcome(None, "the stored request cannot be forwarded", final=True))
    assert dispatcher.slots == 20  # the request's fault, not the app's
    dispatcher.attempt_ended(Outcome(None, "the relay could not read the event", reached=False))
    dispatcher.attempt_ended(Outcome(None, "no agent connected", reached=False))
    assert dispatcher.slots == 20  # the relay's or the agent's, not the app's
    dispatcher.attempt_ended(Outcome(None, "no answer within 30s"))
    assert dispatcher.slots == AUTO_MIN


async def test_a_destination_idle_for_long_starts_again_from_the_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("relay_server.dispatcher.time.monotonic", lambda: clock[0])
    dispatcher, auto = _dispatcher(), TunnelSettings()
    assert await dispatcher.take_slot("a", auto, 0)
    dispatcher.adaptive.limit, dispatcher.adaptive.fastest = 40, 0.001
    dispatcher.release("a")
    clock[0] += IDLE_FORGET / 2  # a pause within a burst: what was learnt holds
    assert await dispatcher.take_slot("b", auto, 0)
    assert dispatcher.slots == 40
    dispatcher.release("b")
    clock[0] += IDLE_FORGET + 1  # the burst is long over: the next one starts low
    assert dispatcher.idle_for_long()  # what the tunnel API shows as its slots (8) meanwhile
    assert await dispatcher.take_slot("c", auto, 0)
    assert dispatcher.slots == AUTO_MIN and dispatcher.adaptive.fastest > 1


async def test_a_settings_change_is_not_undone_by_an_older_copy() -> None:
    # The dispatcher's loop reads the settings once per batch of 100 and the ingress
    # before a body: their copy may be older than a change (a review saw a tunnel set to
    # 1 keep 8 in flight until its batch ended).
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("a", TunnelSettings(), 0)  # auto, the first word
    dispatcher.slots_changed(TunnelSettings(max_concurrency=1))  # tunnel set --max-concurrency 1
    assert await dispatcher.take_slot("b", TunnelSettings(), 0) is False  # an older copy
    assert dispatcher.slots == 1


@pytest.mark.parametrize("value", ["auto", "AUTO", "1", "256", " 8 "])
def test_the_agent_takes_auto_or_a_number_for_max_concurrency(value: str) -> None:
    from relay_agent.cli import ConcurrencyType

    expected = "auto" if value.lower() == "auto" else int(value)
    assert ConcurrencyType().convert(value, None, None) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", "not between 1 and 256"),
        ("257", "not between"),
        ("1_0", "not auto or a number"),
        ("8.5", "not auto or a number"),
        ("\u0668", "not auto or a number"),
        ("", "not auto or a number"),
    ],
)
def test_anything_else_is_a_usage_error_naming_the_value(value: str, why: str) -> None:
    from click.testing import CliRunner

    from relay_agent.cli import main

    result = CliRunner().invoke(main, ["tunnel", "set", "alice", "--max-concurrency", value])
    assert result.exit_code == 2
    assert "--max-concurrency" in result.output and why in result.output


async def test_a_tunnel_set_back_to_auto_starts_again_from_the_floor() -> None:
    dispatcher = _dispatcher()
    dispatcher.slots_changed(TunnelSettings())
    dispatcher.adaptive.limit = 30  # learnt while auto
    dispatcher.slots_changed(TunnelSettings(max_concurrency=2))
    assert dispatcher.slots == 2
    for _ in range(10 * AUTO_MAX):  # answers with 2 in flight say nothing of more: not learnt
        dispatcher.attempt_ended(Outcome(200, answered_in=0.001))
    dispatcher.slots_changed(TunnelSettings())  # tunnel set --max-concurrency auto
    assert dispatcher.slots == AUTO_MIN


def test_a_restart_keeps_the_fastest_answer_so_a_busy_single_worker_stays_at_the_floor() -> None:
    # A second agent joins mid-burst (a zero-downtime restart) or the app is reported up
    # again: the limit goes back to 8, but answers queued behind the burst still in
    # flight must not become "the fastest" (a review saw a 10 ms single worker at 18).
    service, limit = 0.01, AdaptiveLimit()
    limit.answered(service, 200)  # the first answer, from an idle app
    for _ in range(500):
        limit.held_back()
        limit.answered(limit.limit * service, 200)
    limit.restart()
    assert limit.limit == AUTO_MIN and limit.fastest == service
    for _ in range(5000):
        limit.held_back()
        limit.answered(limit.limit * service, 200)
        assert limit.limit == AUTO_MIN


def test_a_slow_first_answer_lets_a_busy_single_worker_grow_to_about_twice_the_floor_at_most() -> None:
    # What the rule cannot see (concurrency.py): a cold start's slow first answer while
    # the rest queue behind it. The fastest is then at most the 8-deep queueing time.
    service, limit = 0.01, AdaptiveLimit()
    limit.answered(0.3, 200)
    most = 0
    for _ in range(5000):
        limit.held_back()
        limit.answered(limit.limit * service, 200)
        most = max(most, limit.limit)
    assert AUTO_MIN < most <= 2 * AUTO_MIN + 1


async def test_an_answer_without_an_answer_time_changes_nothing() -> None:
    # A URL destination's attempts carry none (their slots stay at the floor): a success
    # there is not an attempt without an answer.
    dispatcher = _dispatcher()
    dispatcher.slots_changed(TunnelSettings())
    dispatcher.adaptive.limit = 12
    dispatcher.attempt_ended(Outcome(200))
    assert dispatcher.slots == 12
