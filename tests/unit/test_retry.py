"""The retry schedule, on a fake clock: ``next_attempt_at`` and the header and option parsers."""

from __future__ import annotations

import email.utils
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server.retry import (
    DEFAULT_MAX_AGE,
    DEFAULT_SCHEDULE,
    JITTER,
    MAX_RETRY_AFTER,
    RetryPolicy,
    next_attempt_at,
    parse_retry_after,
    parse_schedule,
)

#: The fake clock's "now": an arbitrary fixed instant (2023-11-14 22:13:20 UTC).
T0 = 1_700_000_000.0
#: Delays before attempts 2..11, as issue 4 spells them out.
ISSUE_SCHEDULE = [5, 30, 2 * 60, 10 * 60, 30 * 60, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600]


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the delay exactly as scheduled


def lowest() -> float:
    return 0.0


def highest() -> float:
    return 1.0


# -- the schedule -------------------------------------------------------------------------


def test_the_default_schedule_is_the_one_of_the_issue() -> None:
    assert list(DEFAULT_SCHEDULE) == ISSUE_SCHEDULE
    assert DEFAULT_MAX_AGE == 3 * 86400
    assert RetryPolicy() == RetryPolicy(DEFAULT_SCHEDULE, DEFAULT_MAX_AGE)


@pytest.mark.parametrize(("attempts", "delay"), list(enumerate(ISSUE_SCHEDULE, start=1)))
def test_without_jitter_each_failure_waits_its_scheduled_delay(attempts: int, delay: float) -> None:
    when = next_attempt_at(RetryPolicy(), attempts, received_at=T0, now=T0 + 100, rand=no_jitter)
    assert when == T0 + 100 + delay


def test_after_the_last_scheduled_retry_the_event_is_dead() -> None:
    policy = RetryPolicy()
    assert next_attempt_at(policy, 10, T0, T0, rand=no_jitter) == T0 + 86400
    assert next_attempt_at(policy, 11, T0, T0, rand=no_jitter) is None
    assert next_attempt_at(policy, 50, T0, T0, rand=no_jitter) is None


@pytest.mark.parametrize(("attempts", "delay"), list(enumerate(ISSUE_SCHEDULE, start=1)))
def test_jitter_is_at_most_ten_percent_either_way(attempts: int, delay: float) -> None:
    policy = RetryPolicy()
    early = next_attempt_at(policy, attempts, T0, T0, rand=lowest)
    late = next_attempt_at(policy, attempts, T0, T0, rand=highest)
    assert JITTER == 0.1
    assert early == pytest.approx(T0 + delay * 0.9)
    assert late == pytest.approx(T0 + delay * 1.1)


@given(
    attempts=st.integers(min_value=1, max_value=len(DEFAULT_SCHEDULE)),
    r=st.floats(min_value=0.0, max_value=1.0),
)
def test_any_jitter_stays_within_bounds(attempts: int, r: float) -> None:
    when = next_attempt_at(RetryPolicy(), attempts, T0, T0, rand=lambda: r)
    assert when is not None
    delay = when - T0
    scheduled = DEFAULT_SCHEDULE[attempts - 1]
    assert scheduled * 0.9 - 1e-6 <= delay <= scheduled * 1.1 + 1e-6


def test_jitter_spreads_events_that_failed_together() -> None:
    values = iter([0.1, 0.9])
    first = next_attempt_at(RetryPolicy(), 3, T0, T0, rand=lambda: next(values))
    second = next_attempt_at(RetryPolicy(), 3, T0, T0, rand=lambda: next(values))
    assert first is not None and second is not None
    assert second - first == pytest.approx(120 * 0.16)


# -- max age --------------------------------------------------------------------------


def test_an_event_received_three_days_ago_is_dead() -> None:
    received = T0 - 3 * 86400
    assert next_attempt_at(RetryPolicy(), 1, received, T0, rand=no_jitter) is None
    # Even a short Retry-After does not bring it back.
    assert next_attempt_at(RetryPolicy(), 1, received, T0, retry_after=1, rand=no_jitter) is None


def test_max_age_is_a_cut_off_on_the_next_attempt_time() -> None:
    policy = RetryPolicy()
    # Received 3 days minus 5 s ago: a retry in exactly 5 s is still in time ...
    received = T0 - (3 * 86400 - 5)
    assert next_attempt_at(policy, 1, received, T0, rand=no_jitter) == T0 + 5
    # ... 6 s short of it, not any more.
    assert next_attempt_at(policy, 1, received - 1, T0, rand=no_jitter) is None


def test_a_custom_max_age_ends_the_schedule_early() -> None:
    policy = RetryPolicy(schedule=(10.0, 10.0, 10.0), max_age=25.0)
    assert next_attempt_at(policy, 1, T0, T0 + 1, rand=no_jitter) == T0 + 11
    assert next_attempt_at(policy, 2, T0, T0 + 11, rand=no_jitter) == T0 + 21
    assert next_attempt_at(policy, 3, T0, T0 + 21, rand=no_jitter) is None


# -- Retry-After ------------------------------------------------------------------------


def test_retry_after_replaces_the_schedule_without_jitter() -> None:
    # After the first failure the schedule says 5 s; the destination asks for 2 min.
    when = next_attempt_at(RetryPolicy(), 1, T0, T0, retry_after=120, rand=lowest)
    assert when == T0 + 120
    # Shorter than the schedule is honoured too.
    assert next_attempt_at(RetryPolicy(), 6, T0, T0, retry_after=3, rand=highest) == T0 + 3


def test_retry_after_is_capped_at_one_day() -> None:
    assert MAX_RETRY_AFTER == 86400
    when = next_attempt_at(RetryPolicy(), 1, T0, T0, retry_after=30 * 86400, rand=no_jitter)
    assert when == T0 + 86400


def test_a_negative_retry_after_means_now() -> None:
    assert next_attempt_at(RetryPolicy(), 1, T0, T0, retry_after=-10, rand=no_jitter) == T0


def test_retry_after_does_not_extend_the_schedule_or_the_max_age() -> None:
    policy = RetryPolicy()
    assert next_attempt_at(policy, 11, T0, T0, retry_after=1, rand=no_jitter) is None
    # Received 2.5 days ago: a full day's wait would pass the 3-day age.
    received = T0 - 2.5 * 86400
    assert next_attempt_at(policy, 2, received, T0, retry_after=86400, rand=no_jitter) is None
    assert next_attempt_at(policy, 2, received, T0, retry_after=3600, rand=no_jitter) == T0 + 3600


# -- parse_retry_after ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("120", 120.0), (" 30 ", 30.0), ("86400000", 86400000.0)],
)
def test_retry_after_in_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, T0) == seconds


def test_retry_after_as_an_http_date_is_relative_to_now() -> None:
    in_90s = email.utils.formatdate(T0 + 90, usegmt=True)
    assert in_90s.endswith(" GMT")
    assert parse_retry_after(in_90s, T0) == pytest.approx(90.0)
    assert parse_retry_after(in_90s, T0 + 60) == pytest.approx(30.0)


def test_retry_after_as_a_fixed_http_date() -> None:
    # RFC 9110's example date, one hour after the fake clock's now.
    now = 1445412480.0 - 3600  # Wed, 21 Oct 2015 07:28:00 GMT minus an hour
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == pytest.approx(3600.0)


def test_a_retry_after_date_in_the_past_means_now() -> None:
    yesterday = email.utils.formatdate(T0 - 86400, usegmt=True)
    assert parse_retry_after(yesterday, T0) == 0.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1.5", "5s", "Wed, 32 Foo 2015", "0x10"])
def test_a_garbage_retry_after_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, T0) is None


def test_a_superscript_digit_retry_after_is_ignored() -> None:
    # attempt_agent decodes header bytes as latin-1, so b"Retry-After: \xb2" from a local
    # service arrives here as "²".
    assert parse_retry_after("\xb2", T0) is None


# -- parse_schedule --------------------------------------------------------------------------


def test_parse_schedule() -> None:
    assert parse_schedule("1s,2m") == (1.0, 120.0)
    assert parse_schedule(" 5s , 30s ,2m,1h,1d") == (5.0, 30.0, 120.0, 3600.0, 86400.0)
    assert parse_schedule("5s,30s,2m,10m,30m,1h,3h,6h,12h,24h") == DEFAULT_SCHEDULE


@pytest.mark.parametrize("text", ["", ",", " , ", "1x", "1s,soon", "0s", "-1s", "1.5s", "1s;2m"])
def test_a_bad_schedule_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_an_empty_schedule_says_why() -> None:
    with pytest.raises(ValueError, match="at least one delay"):
        parse_schedule(" , ")


# -- a whole life on a fake clock ---------------------------------------------------------


def _life(policy: RetryPolicy, rand: float, retry_after: dict[int, float] | None = None) -> list[float]:
    """Attempt times of an event whose every attempt fails, from its arrival until it is dead."""
    received = now = T0
    times = [now]  # the first attempt is made on arrival
    attempts = 0
    while True:
        attempts += 1
        when = next_attempt_at(
            policy, attempts, received, now, (retry_after or {}).get(attempts), rand=lambda: rand
        )
        if when is None:
            return times
        assert when >= now, "the clock never goes back"
        now = when
        times.append(now)
        assert len(times) < 100, "an event that always fails must die"


def test_a_failing_event_lives_exactly_the_schedule() -> None:
    times = _life(RetryPolicy(), 0.5)
    assert len(times) == 1 + len(ISSUE_SCHEDULE)  # the first attempt and ten retries
    assert [b - a for a, b in itertools.pairwise(times)] == ISSUE_SCHEDULE
    assert times[-1] - T0 == sum(ISSUE_SCHEDULE) == 168_155  # 46 h 42 min 35 s, under 3 days


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.9), (1.0, 1.1)])
def test_a_jittered_life_spans_the_schedule_sum_within_ten_percent(rand: float, factor: float) -> None:
    times = _life(RetryPolicy(), rand)
    assert len(times) == 11
    assert times[-1] - T0 == pytest.approx(sum(ISSUE_SCHEDULE) * factor)


def test_a_life_with_a_retry_after() -> None:
    # The third failure answers Retry-After: 1 h; the rest follows the schedule.
    times = _life(RetryPolicy(), 0.5, retry_after={3: 3600.0})
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == [*ISSUE_SCHEDULE[:2], 3600, *ISSUE_SCHEDULE[3:]]


def test_a_short_max_age_ends_a_life_before_the_schedule() -> None:
    times = _life(RetryPolicy(max_age=3600.0), 0.5)
    # 5 + 30 + 120 + 600 + 1800 = 2555 s fits in an hour; 2555 + 3600 does not.
    assert [b - a for a, b in itertools.pairwise(times)] == ISSUE_SCHEDULE[:5]
    assert times[-1] - T0 == 2555
