"""Delivery slots are handed out first come, first served (``Dispatcher.take_slot``).

Before, every release woke every waiter and whoever ran first took the slot, a sender
arriving just then included: at 64 senders and 8 slots some webhooks waited seconds
(p99 1.8 s, some answered 202 after the 2 s inline wait) behind later ones. The first
two tests failed there.
"""

from __future__ import annotations

import asyncio
from typing import cast

from relay_server.delivery import Deliveries
from relay_server.dispatcher import Dispatcher
from relay_server.settings import ANY_AGENT, TunnelSettings

ONE = TunnelSettings(max_concurrency=1)
#: Seconds any wait may take before the test fails instead of hanging.
WAIT = 10.0


def _dispatcher() -> Dispatcher:
    # take_slot and release never touch the deliveries (only the dispatcher's loop does).
    return Dispatcher(cast(Deliveries, None), "alice", ANY_AGENT)


async def _line_up(dispatcher: Dispatcher, count: int) -> None:
    while len(dispatcher._slot_line) < count:
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_whoever_waited_longest_not_to_a_newcomer() -> None:
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("first", ONE, 0)
    served: list[str] = []

    async def wait_and_serve(event_id: str) -> None:
        assert await dispatcher.take_slot(event_id, ONE, WAIT)
        served.append(event_id)
        await asyncio.sleep(0)  # the attempt
        dispatcher.release(event_id)

    waiting = [asyncio.create_task(wait_and_serve(f"w{i}")) for i in range(5)]
    await _line_up(dispatcher, 5)
    dispatcher.release("first")
    # The slot is w0's already: a sender arriving now queues behind the five.
    newcomer = asyncio.create_task(wait_and_serve("newcomer"))
    await asyncio.wait_for(asyncio.gather(*waiting, newcomer), WAIT)
    assert served == ["w0", "w1", "w2", "w3", "w4", "newcomer"]
    assert dispatcher.in_flight == set()
    assert not dispatcher._slot_line


async def test_a_release_wakes_one_waiter_not_all() -> None:
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("first", ONE, 0)
    waiting = [asyncio.create_task(dispatcher.take_slot(f"w{i}", ONE, WAIT)) for i in range(3)]
    await _line_up(dispatcher, 3)
    dispatcher.release("first")
    assert [waiter.woken.done() for waiter in dispatcher._slot_line] == [True, False, False]
    assert await asyncio.wait_for(waiting[0], WAIT)
    assert dispatcher.in_flight == {"w0"}
    for task in waiting[1:]:
        task.cancel()
    await asyncio.gather(*waiting[1:], return_exceptions=True)
    assert not dispatcher._slot_line


async def test_a_waiter_woken_then_cancelled_passes_the_slot_on() -> None:
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("first", ONE, 0)
    gone = asyncio.create_task(dispatcher.take_slot("gone", ONE, WAIT))
    next_one = asyncio.create_task(dispatcher.take_slot("next", ONE, WAIT))
    await _line_up(dispatcher, 2)
    dispatcher.release("first")  # wakes "gone"...
    gone.cancel()  # ...whose sender hangs up before it runs
    assert await asyncio.wait_for(next_one, WAIT)
    assert dispatcher.in_flight == {"next"}
    assert gone.cancelled()


async def test_no_slot_within_the_wait_is_false_and_leaves_the_line() -> None:
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("first", ONE, 0)
    assert not await dispatcher.take_slot("late", ONE, 0)
    assert dispatcher.in_flight == {"first"}
    assert not dispatcher._slot_line


async def test_a_higher_limit_lets_waiters_in_without_a_release() -> None:
    dispatcher = _dispatcher()
    assert await dispatcher.take_slot("first", ONE, 0)
    waiting = [asyncio.create_task(dispatcher.take_slot(f"w{i}", ONE, WAIT)) for i in range(3)]
    await _line_up(dispatcher, 3)
    dispatcher.slots_changed(TunnelSettings(max_concurrency=3))  # PATCH max_concurrency=3
    assert await asyncio.wait_for(asyncio.gather(waiting[0], waiting[1]), WAIT) == [True, True]
    assert dispatcher.in_flight == {"first", "w0", "w1"}
    assert not waiting[2].done()  # the third waits, in its place, for a release
    dispatcher.release("first")
    assert await asyncio.wait_for(waiting[2], WAIT)
    assert dispatcher.in_flight == {"w0", "w1", "w2"}
