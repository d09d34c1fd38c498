"""Background tasks that are never silently dead (``Tasks``), and a group committer whose
every caller gets an answer, whatever fails (``GroupCommitter``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import relay_server.commits as commits_module
import relay_server.tasks as tasks_module
from relay_server.commits import GroupCommitter
from relay_server.errors import StoreError, StoreFull
from relay_server.store import Delivery, Event, Store
from relay_server.tasks import Tasks

#: Seconds any single wait may take before the test fails instead of hanging.
WAIT = 5.0


@pytest.fixture
async def unhandled() -> AsyncIterator[list[dict[str, Any]]]:
    """The calls of the running loop's exception handler ("Task exception was never
    retrieved" goes there when a failed task is collected)."""
    loop = asyncio.get_running_loop()
    calls: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: calls.append(context))
    yield calls
    loop.set_exception_handler(previous)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``predicate()`` holds (a bounded number of turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


# -- Tasks.spawn ------------------------------------------------------------------------------


async def test_an_exception_of_a_spawned_task_is_logged_and_retrieved(
    unhandled: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # The check itself works: a bare failed task, collected, is reported as never retrieved.
    async def fail() -> None:
        raise ValueError("boom")

    bare = asyncio.ensure_future(fail())
    await _until(bare.done, "the bare task to end")
    del bare
    gc.collect()
    assert [c["message"] for c in unhandled] == ["Task exception was never retrieved"]
    unhandled.clear()

    tasks = Tasks("unit")
    with caplog.at_level(logging.ERROR, logger="relay.server"):
        tasks.spawn(fail(), "the failing job")
        assert len(tasks) == 1
        await _until(lambda: len(tasks) == 0, "the task set to empty")
        gc.collect()
    assert unhandled == []
    [record] = [r for r in caplog.records if r.name == "relay.server"]
    assert record.getMessage() == "unit: the failing job failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_a_spawned_task_that_succeeds_or_is_cancelled_logs_nothing(
    unhandled: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    tasks = Tasks("unit")
    forever = asyncio.Event()
    with caplog.at_level(logging.DEBUG, logger="relay.server"):
        done = tasks.spawn(asyncio.sleep(0, "ok"), "a quick job")
        waiting = tasks.spawn(forever.wait(), "a waiting job")
        assert await done == "ok"
        waiting.cancel()
        await _until(lambda: len(tasks) == 0, "the task set to empty")
        gc.collect()
    assert unhandled == []
    assert [r for r in caplog.records if r.name == "relay.server"] == []


# -- Tasks.loop -------------------------------------------------------------------------------


async def test_a_loop_that_raises_is_restarted_and_each_failure_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, unhandled: list[dict[str, Any]]
) -> None:
    monkeypatch.setattr(tasks_module, "RESTART_FIRST", 0.01)
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"crash {runs}")

    tasks = Tasks("unit")
    with caplog.at_level(logging.ERROR, logger="relay.server"):
        task = tasks.loop(body, "the loop")
        await asyncio.wait_for(task, WAIT)
        await _until(lambda: len(tasks) == 0, "the task set to empty")
    assert runs == 3
    failures = [r for r in caplog.records if r.name == "relay.server"]
    assert [r.getMessage() for r in failures] == [
        "unit: the loop failed; restarting it in 0.01s",
        "unit: the loop failed; restarting it in 0.02s",  # the backoff doubles
    ]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["crash 1", "crash 2"]
    gc.collect()
    assert unhandled == []


async def test_a_cancelled_loop_is_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks_module, "RESTART_FIRST", 0.01)
    started = asyncio.Event()
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()

    tasks = Tasks("unit")
    task = tasks.loop(body, "the loop")
    await asyncio.wait_for(started.wait(), WAIT)
    await asyncio.wait_for(tasks.stop(), WAIT)
    assert task.cancelled()
    assert runs == 1
    assert len(tasks) == 0


# -- Tasks.stop --------------------------------------------------------------------------------


async def test_stop_returns_even_when_a_task_ignores_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks_module, "STOP_WAIT", 0.05)
    release = asyncio.Event()
    cancelled = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()  # ignores the cancellation: a SQLite call in a thread, say

    async def polite() -> None:
        await asyncio.Event().wait()

    tasks = Tasks("unit")
    stuck = tasks.spawn(stubborn(), "the stubborn job")
    ended = tasks.spawn(polite(), "the polite job")
    await asyncio.wait_for(running.wait(), WAIT)
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        await asyncio.wait_for(tasks.stop(), WAIT)  # returns: not stuck behind the task
    assert cancelled.is_set()
    assert ended.cancelled()
    assert not stuck.done()
    assert [r.getMessage() for r in caplog.records if r.name == "relay.server"] == [
        "unit: 1 tasks did not stop within 0.05s"
    ]
    release.set()
    await asyncio.wait_for(stuck, WAIT)
    assert len(tasks) == 0


async def test_stop_with_nothing_running_returns_at_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        await asyncio.wait_for(Tasks("unit").stop(), WAIT)
    assert caplog.records == []


# -- GroupCommitter ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def _event(event_id: str, body: bytes = b'{"n":1}') -> Event:
    return Event(0, event_id, "alice", "alice", 1000.0, "POST", b"/hook", (), "203.0.113.7", body)


def _insert_op(event_id: str, body: bytes = b'{"n":1}') -> Callable[[sqlite3.Connection], int]:
    return Store.insert_event_op(_event(event_id, body), [Delivery(0, "alice", "agent:*", "pending", 0, 0.0)])


def _ids(store: Store) -> set[str]:
    return {e.id for e, _ in store.find_events("alice", None, None, 1000)}


async def test_a_bug_in_one_operation_fails_only_that_caller(store: Store) -> None:
    def buggy(db: sqlite3.Connection) -> None:
        db.execute("SELECT 1")
        raise KeyError("a bug in an operation")

    commits = GroupCommitter(store)
    ops: list[Callable[[sqlite3.Connection], Any]] = [_insert_op(f"evt_{i}") for i in range(9)]
    ops.insert(4, buggy)
    writes = [asyncio.ensure_future(commits.write(op)) for op in ops]
    await _until(lambda: len(commits._pending) == 10, "the ten writes to wait")
    commits.start()  # all ten in one batch
    try:
        results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), WAIT)
        assert isinstance(results[4], KeyError)
        good = results[:4] + results[5:]
        assert all(isinstance(r, int) for r in good), results
        assert len(set(good)) == 9
        assert _ids(store) == {f"evt_{i}" for i in range(9)}
        for i, seq in enumerate(good):
            found = store.find_event("alice", f"evt_{i}")
            assert found is not None and found[0].seq == seq
        # And the committer goes on.
        seq = await asyncio.wait_for(commits.write(_insert_op("evt_after")), WAIT)
        assert isinstance(seq, int)
    finally:
        await commits.stop()


async def test_stop_with_a_hung_store_answers_every_waiting_caller(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commits_module, "STOP_WAIT", 0.05)
    monkeypatch.setattr(tasks_module, "STOP_WAIT", 0.05)
    entered = threading.Event()
    release = threading.Event()

    def hung(ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        entered.set()
        release.wait(30)  # an fsync on a dead disk
        return [None] * len(ops)

    monkeypatch.setattr(store, "transaction", hung)
    monkeypatch.setattr(store, "transaction_now", lambda ops: None)  # commits go to the thread
    commits = GroupCommitter(store)
    commits.start()
    try:
        first = asyncio.ensure_future(commits.write(_insert_op("evt_first")))
        assert await asyncio.to_thread(entered.wait, WAIT)
        waiting = [asyncio.ensure_future(commits.write(_insert_op(f"evt_{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.wait_for(commits.stop(), WAIT)  # returns, the store still hung
        assert not release.is_set()
        results = await asyncio.wait_for(asyncio.gather(first, *waiting, return_exceptions=True), WAIT)
        assert all(isinstance(r, StoreError) for r in results), results
    finally:
        release.set()


async def test_the_committer_serves_the_next_write_after_a_failed_batch(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=256 * 1024)
    commits = GroupCommitter(store)
    commits.start()
    try:
        with pytest.raises(StoreFull):
            await asyncio.wait_for(commits.write(_insert_op("evt_huge", b"h" * (400 * 1024))), WAIT)
        seq = await asyncio.wait_for(commits.write(_insert_op("evt_small")), WAIT)
        assert isinstance(seq, int)
        assert _ids(store) == {"evt_small"}
        # And again a failure, then a success: no state left behind by the first one.
        with pytest.raises(StoreError):
            await asyncio.wait_for(commits.write(_insert_op("evt_huge2", b"h" * (400 * 1024))), WAIT)
        await asyncio.wait_for(commits.write(_insert_op("evt_small2")), WAIT)
        assert _ids(store) == {"evt_small", "evt_small2"}
    finally:
        await commits.stop()
        store.close()
