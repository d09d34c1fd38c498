"""The frame budget of one user's agent connections, on a fake clock (``relay_server.budget``)."""

import pytest

from relay_server.budget import FrameBudget


def test_within_the_rate_nothing_waits() -> None:
    budget = FrameBudget(now=0.0, rate=100, burst=100)
    for second in range(10):
        budget.spend(100, now=float(second))
        assert budget.due(now=float(second)) == 0.0


def test_a_burst_over_the_budget_waits_for_what_it_overdrew() -> None:
    budget = FrameBudget(now=0.0, rate=100, burst=100)
    budget.spend(100, now=0.0)  # the burst, at once
    assert budget.due(now=0.0) == 0.0
    budget.spend(50, now=0.0)  # 50 frames over: half a second at 100 a second
    assert budget.due(now=0.0) == pytest.approx(0.5)
    assert budget.due(now=0.25) == pytest.approx(0.25)
    # Waiting that long pays it back, and then the rate applies.
    assert budget.due(now=0.5) == pytest.approx(0.0)
    budget.spend(10, now=0.6)
    assert budget.due(now=0.6) == pytest.approx(0.0)
    budget.spend(10, now=0.6)
    assert budget.due(now=0.6) == pytest.approx(0.1)


def test_savings_are_capped_at_the_burst() -> None:
    budget = FrameBudget(now=0.0, rate=100, burst=100)
    budget.spend(0, now=3600.0)  # an hour idle saves no more than the burst
    budget.spend(150, now=3600.0)
    assert budget.due(now=3600.0) == pytest.approx(0.5)


def test_a_flood_is_read_at_the_rate() -> None:
    # 6,000-frame messages, each read once the budget is no longer overdrawn (as the
    # session does): the reader takes in the rate, whatever the sender pushes.
    budget = FrameBudget(now=0.0, rate=20_000, burst=20_000)
    now, read = 0.0, 0
    while (now := now + budget.due(now)) < 10.0:
        budget.spend(6000, now)
        read += 6000
    # Ten seconds at the rate, plus the burst, give or take the one message overdrawing it.
    assert 20_000 * 10 + 20_000 - 6000 <= read <= 20_000 * 10 + 20_000 + 6000
