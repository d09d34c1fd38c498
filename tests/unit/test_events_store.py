"""The store's events API: writes as operations (one transaction, group commit), the
dispatcher's queries, the API's queries, purge, and a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import relay_server.commits as commits_module
import relay_server.store as store_module
from relay_server.commits import GroupCommitter
from relay_server.errors import NoRoomForEvents, StoreError, StoreFull
from relay_server.store import DB_FILE, MIGRATIONS, Delivery, Event, Store
from relay_server.tokens import Claims

ANY = "agent:*"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def _event(
    event_id: str,
    tunnel: str = "alice",
    user: str = "alice",
    body: bytes = b'{"n":1}',
    received_at: float = 1000.0,
) -> Event:
    return Event(
        0,
        event_id,
        tunnel,
        user,
        received_at,
        "POST",
        b"/hook?x=1",
        ((b"Content-Type", b"application/json"), (b"X-Raw", b"caf\xe9")),
        "203.0.113.7",
        body,
    )


def _queued(tunnel: str = "alice", destination: str = ANY, due: float = 0.0) -> Delivery:
    return Delivery(0, tunnel, destination, "pending", 0, due)


def _insert(store: Store, event: Event, *deliveries: Delivery) -> int:
    [seq] = store.transaction([Store.insert_event_op(event, list(deliveries) or [_queued(event.tunnel)])])
    return int(seq)


def _set(store: Store, seq: int, destination: str = ANY, **fields: Any) -> None:
    [current] = [d for d in store.deliveries(seq) if d.destination == destination]
    store.transaction([Store.update_delivery_op(Delivery(**{**current.__dict__, **fields}))])


def _count(tmp_path: Path, table: str) -> int:
    db = sqlite3.connect(tmp_path / DB_FILE)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


# -- writes --------------------------------------------------------------------------------


def test_a_deliverys_history_keeps_its_newest_attempts(store: Store) -> None:
    # Attempts that spend no step of the schedule (early passes) had no bound but
    # --max-age: a review filled the store with one agent's TARGET_UP flood.
    seq = _insert(store, _event("evt_many"))
    for attempt in range(1, store_module.MAX_ATTEMPTS_KEPT + 21):
        _set(store, seq, status="retrying", attempts=attempt, last_status=503)
    kept = [a.attempt for a in store.attempts(seq)]
    assert kept == list(range(21, store_module.MAX_ATTEMPTS_KEPT + 21))


def test_insert_event_op_stores_the_request_byte_for_byte(store: Store) -> None:
    event = _event("evt_1", body=b"\x00\xff binary \r\n")
    seq = _insert(store, event, _queued(due=5.0), _queued(destination="agent:laptop", due=7.0))
    assert seq >= 1
    found = store.find_event("alice", "evt_1", with_body=True)
    assert found is not None
    stored, deliveries = found
    assert stored.seq == seq
    assert stored.body == b"\x00\xff binary \r\n"
    assert stored.headers == event.headers  # non-ASCII header bytes survive
    assert (stored.method, stored.target, stored.client, stored.received_at) == (
        "POST",
        b"/hook?x=1",
        "203.0.113.7",
        1000.0,
    )
    assert [(d.destination, d.status, d.attempts, d.next_attempt_at) for d in deliveries] == [
        (ANY, "pending", 0, 5.0),
        ("agent:laptop", "pending", 0, 7.0),
    ]


def test_a_transaction_returns_each_ops_result_in_order(store: Store) -> None:
    seqs = store.transaction([Store.insert_event_op(_event(f"evt_{i}"), [_queued()]) for i in range(3)])
    assert len(seqs) == 3
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 3


def test_a_failing_op_rolls_back_the_whole_transaction(store: Store, tmp_path: Path) -> None:
    _insert(store, _event("evt_dup"))
    ops = [
        Store.insert_event_op(_event("evt_new"), [_queued()]),
        Store.insert_event_op(_event("evt_dup"), [_queued()]),  # UNIQUE id: fails
    ]
    with pytest.raises(StoreError):
        store.transaction(ops)
    assert store.find_event("alice", "evt_new") is None
    assert _count(tmp_path, "events") == 1
    assert _count(tmp_path, "deliveries") == 1


def _count_batches(store: Store) -> list[int]:
    """From now on, the size of every transaction ``store`` commits, in order (on the
    event loop or in a thread)."""
    batches: list[int] = []
    real, real_now = store.transaction, store.transaction_now

    def counting(ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        batches.append(len(ops))
        return real(ops)

    def counting_now(ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any] | None:
        results = real_now(ops)
        if results is not None:
            batches.append(len(ops))
        return results

    store.transaction = counting  # type: ignore[method-assign]
    store.transaction_now = counting_now  # type: ignore[method-assign]
    return batches


def _commits_in_a_thread(store: Store) -> None:
    """Every group commit goes to a thread (where a test can hold one, as a slow fsync)."""
    store.transaction_now = lambda ops: None  # type: ignore[method-assign]


async def test_group_commit_batches_concurrent_writes(store: Store) -> None:
    batches = _count_batches(store)
    commits = GroupCommitter(store)
    commits.start()
    try:
        writes = 200
        seqs = await asyncio.wait_for(
            asyncio.gather(
                *(
                    commits.write(Store.insert_event_op(_event(f"evt_{i}"), [_queued()]))
                    for i in range(writes)
                )
            ),
            10,
        )
    finally:
        await commits.stop()
    assert sum(batches) == writes
    # Written together, they share transactions: far fewer commits (fsyncs) than writes.
    assert len(batches) <= writes // 10, batches
    assert len(set(seqs)) == writes
    assert len(store.find_events("alice", None, None, 1000)) == writes


async def test_writes_arriving_during_a_commit_share_the_next_one(store: Store) -> None:
    batches: list[int] = []
    committing = threading.Event()
    release = threading.Event()
    real = store.transaction

    def slow(ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        batches.append(len(ops))
        committing.set()
        release.wait(5)  # an fsync that takes its time
        return real(ops)

    store.transaction = slow  # type: ignore[method-assign]
    _commits_in_a_thread(store)
    commits = GroupCommitter(store)
    commits.start()
    try:
        first = asyncio.ensure_future(commits.write(Store.insert_event_op(_event("evt_first"), [_queued()])))
        assert await asyncio.to_thread(committing.wait, 5)
        rest = [
            asyncio.ensure_future(commits.write(Store.insert_event_op(_event(f"evt_{i}"), [_queued()])))
            for i in range(50)
        ]
        await asyncio.sleep(0.05)
        assert not first.done()  # not acknowledged before its commit is over
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    finally:
        release.set()
        await commits.stop()
    assert batches == [1, 50]


def _where(where: list[str]) -> Callable[[sqlite3.Connection], None]:
    """An operation that notes which thread ran it."""

    def op(db: sqlite3.Connection) -> None:
        where.append("loop" if threading.current_thread() is threading.main_thread() else "thread")

    return op


async def test_a_quick_commit_runs_on_the_event_loop(store: Store) -> None:
    # No thread hand-off: it cost 4-5 ms of GIL turns under load, ten times the commit.
    commits = GroupCommitter(store)
    commits.start()
    where: list[str] = []
    try:
        await asyncio.wait_for(commits.write(_where(where), size=0), 10)
        seq = await asyncio.wait_for(
            commits.write(Store.insert_event_op(_event("evt_1"), [_queued()]), size=7), 10
        )
    finally:
        await commits.stop()
    assert where == ["loop"]
    assert store.find_event("alice", "evt_1") is not None and seq > 0


async def test_big_batches_and_writes_of_unknown_cost_commit_in_a_thread(store: Store) -> None:
    # A burst of 10 MiB webhooks (1.5 s to write and sync) or a scan over the whole store
    # (the recount) would hold every tunnel's streams: the loop never runs them.
    commits = GroupCommitter(store)
    commits.start()
    where: list[str] = []
    big = commits_module.LOOP_BATCH_BYTES // 4
    try:
        await asyncio.wait_for(commits.write(_where(where)), 10)  # no size: a scan, a purge
        await asyncio.wait_for(commits.write(_where(where), size=commits_module.LOOP_BATCH_BYTES), 10)
        await asyncio.wait_for(commits.write(_where(where), size=big), 10)
        writes = [commits.write(_where(where), size=big) for _ in range(4)]  # one batch: too big
        await asyncio.wait_for(asyncio.gather(*writes), 10)
        together = [commits.write(_where(where), size=0), commits.write(_where(where))]  # one unknown
        await asyncio.wait_for(asyncio.gather(*together), 10)
    finally:
        await commits.stop()
    assert where == ["thread", "thread", "loop", *["thread"] * 4, "thread", "thread"]


def test_a_failure_after_begin_leaves_no_transaction_open(store: Store) -> None:
    # The busy timeout failing to come back after BEGIN IMMEDIATE: the writer connection
    # must not stay in a transaction (every later commit would fail, the lock held).
    real = store._db

    class Failing:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("PRAGMA busy_timeout = 1"):
                raise sqlite3.OperationalError("injected")
            return real.execute(sql, *args)

    store._db = Failing()  # type: ignore[assignment]
    try:
        with pytest.raises(StoreError, match="injected"):
            store.transaction_now([Store.insert_event_op(_event("evt_lost"), [_queued()])])
    finally:
        store._db = real
    assert not real.in_transaction
    assert store.transaction_now([Store.insert_event_op(_event("evt_1"), [_queued()])]) is not None
    assert store.find_event("alice", "evt_lost") is None and store.find_event("alice", "evt_1")


async def test_a_commit_goes_to_a_thread_while_a_thread_holds_the_store(store: Store) -> None:
    # The event loop never waits for the writer connection: a long write in a worker
    # thread (a purge, a sweep) would stall every tunnel.
    holding, release = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        holding.set()
        release.wait(10)

    holder = asyncio.ensure_future(asyncio.to_thread(store.transaction, [hold]))
    commits = GroupCommitter(store)
    commits.start()
    where: list[str] = []
    try:
        assert await asyncio.to_thread(holding.wait, 10)
        write = asyncio.ensure_future(commits.write(_where(where), size=0))
        for _ in range(20):
            await asyncio.sleep(0)  # the loop goes on: it is not waiting for the store
        assert not write.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, write), 10)
    finally:
        release.set()
        await commits.stop()
    assert where == ["thread"]


async def test_a_commit_goes_to_a_thread_while_another_process_holds_the_write_lock(
    store: Store, tmp_path: Path
) -> None:
    # The admin CLI (another process) writing: the loop does not sit out SQLite's busy timeout.
    other = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    commits = GroupCommitter(store)
    commits.start()
    where: list[str] = []
    try:
        write = asyncio.ensure_future(commits.write(_where(where), size=0))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not write.done()
        other.execute("COMMIT")
        await asyncio.wait_for(write, 10)
    finally:
        other.close()
        await commits.stop()
    assert where == ["thread"]


async def test_slow_commits_send_the_next_ones_to_a_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk slow to fsync must not hold the loop commit after commit; after
    # LOOP_COMMIT_PAUSE the loop tries again, and a pause soon after the last is twice as
    # long. One slow commit among quick ones (a WAL checkpoint, the first commit on a cold
    # cache, which sent a whole bench run to the thread) tips the average only if it is
    # very slow. The committer's clock is the test's: each operation says how long its
    # commit took.
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(commits_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    commits = GroupCommitter(store)
    commits.start()
    where: list[str] = []
    limit = commits_module.LOOP_COMMIT_MAX

    async def write(seconds: float = 0.0) -> None:
        def op(db: sqlite3.Connection) -> None:
            _where(where)(db)
            clock.now += seconds

        await asyncio.wait_for(commits.write(op, size=0), 10)

    try:
        await write(2 * limit)  # one slow commit (a checkpoint, a cold cache)
        await write()
        assert where == ["loop", "loop"]
        for _ in range(50):  # a disk that stays slow
            await write(2 * limit)
            if where[-1] == "thread":
                break
        assert 2 <= where.count("loop") - 2 < 50 and where[-1] == "thread", where
        await write()
        assert where[-1] == "thread"  # for LOOP_COMMIT_PAUSE
        clock.now += commits_module.LOOP_COMMIT_PAUSE
        await write()
        assert where[-1] == "loop"
        await write(20 * limit)  # one very slow commit tips it at once
        await write()
        assert where[-2:] == ["loop", "thread"]
        clock.now += commits_module.LOOP_COMMIT_PAUSE  # a pause that follows soon is twice as long
        await write()
        assert where[-1] == "thread"
        clock.now += commits_module.LOOP_COMMIT_PAUSE
        await write()
        assert where[-1] == "loop"
    finally:
        await commits.stop()


async def test_a_commit_never_checkpoints_the_wal_a_thread_does(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a long read (an online backup) the WAL had grown to hundreds of MB, and the
    # next small webhook, committed on the event loop, copied it all back into the
    # database there: every tunnel waited 1-2 s. Commits now only append to the WAL.
    db_file = tmp_path / DB_FILE
    monkeypatch.setattr(store_module, "WAL_KEPT_BYTES", 2**20)
    commits = GroupCommitter(store)
    commits.start()
    reader = sqlite3.connect(db_file)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM events").fetchone()  # a backup's snapshot
        big = [
            commits.write(Store.insert_event_op(_event(f"evt_{i}", body=b"b" * 2**20), [_queued()]))
            for i in range(6)
        ]
        await asyncio.wait_for(asyncio.gather(*big), 10)
        assert store.wal_backlog() >= commits_module.CHECKPOINT_BYTES
        if commits._checkpoint is not None:  # started, and stopped at the backup's snapshot
            await asyncio.wait_for(commits._checkpoint, 10)
        reader.execute("COMMIT")  # the backup is done: the WAL may go back now
        before = db_file.stat().st_size
        monkeypatch.setattr(commits, "_checkpoint_if_due", lambda: None)  # only the commit itself
        await asyncio.wait_for(
            commits.write(Store.insert_event_op(_event("evt_small"), [_queued()]), size=7), 10
        )
        assert db_file.stat().st_size == before  # nothing copied back by the commit
        monkeypatch.setattr(commits, "_checkpoint_if_due", GroupCommitter._checkpoint_if_due.__get__(commits))
        await asyncio.wait_for(
            commits.write(Store.insert_event_op(_event("evt_next"), [_queued()]), size=7), 10
        )
        assert commits._checkpoint is not None
        await asyncio.wait_for(commits._checkpoint, 10)  # a thread copies it back
        assert db_file.stat().st_size >= 6 * 2**20
        # and the next write starts the WAL over, cut back to WAL_KEPT_BYTES
        await asyncio.wait_for(
            commits.write(Store.insert_event_op(_event("evt_last"), [_queued()]), size=7), 10
        )
        assert (tmp_path / f"{DB_FILE}-wal").stat().st_size <= 2**20
    finally:
        reader.close()
        await commits.stop()
    assert store.find_event("alice", "evt_next") is not None


async def test_checkpoints_run_when_the_wal_fills_and_until_they_catch_up_then_stop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite writes an emptied WAL over from its start and keeps the file: measured by
    # the file's size, a WAL that once passed CHECKPOINT_BYTES started a checkpoint (and
    # a sync of the database) after every commit, a tenth of the server's CPU under load.
    checkpoints: list[int] = []  # the backlog each one found
    checkpoint = store.checkpoint

    def counted() -> None:
        checkpoints.append(store.wal_backlog())
        checkpoint()

    monkeypatch.setattr(store, "checkpoint", counted)
    commits = GroupCommitter(store)
    commits.start()

    async def write(name: str, size: int = 7) -> None:
        op = Store.insert_event_op(_event(name, body=b"b" * size), [_queued()])
        await asyncio.wait_for(commits.write(op, size=size), 10)

    async def checkpointed() -> None:
        while (task := commits._checkpoint) is not None and not task.done():
            await asyncio.wait_for(task, 10)

    try:
        for i in range(5):
            await write(f"evt_{i}", 2**20)
        await checkpointed()
        assert checkpoints and checkpoints[0] >= commits_module.CHECKPOINT_BYTES
        # Each commit that follows starts one more, until one has caught up: SQLite then
        # starts the WAL over (else the file grows without end under steady writes).
        for i in range(10):
            started = len(checkpoints)
            await write(f"evt_after_{i}")
            await checkpointed()
            if len(checkpoints) == started:
                break  # caught up: that commit started none
        else:
            pytest.fail("the checkpoints never caught up")
        for i in range(20):  # small webhooks, in the WAL file's reused space
            await write(f"evt_small_{i}")
        assert 0 < store.wal_backlog() < commits_module.CHECKPOINT_BYTES
        assert len(checkpoints) == started  # none until the WAL fills again
    finally:
        await commits.stop()


def test_the_wal_index_is_read_through_one_descriptor_closed_with_the_store(tmp_path: Path) -> None:
    # Closing a descriptor of the wal-index drops every POSIX lock this process holds on
    # it, SQLite's included: it is opened once, closed after the connections, never again.
    def opened() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
                count += os.readlink(f"/proc/self/fd/{fd}").endswith(f"{DB_FILE}-shm")
        return count

    store = Store(tmp_path)
    _insert(store, _event("evt_1"))
    sqlite_own = opened()
    assert store.wal_backlog() > 0
    assert store.wal_backlog() > 0
    assert opened() == sqlite_own + 1
    store.close()
    assert opened() == 0
    assert store.wal_backlog() == 0
    assert opened() == 0


def test_a_transaction_now_on_a_full_store_writes_nothing_and_leaves_the_purge_to_a_thread(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        ops = [Store.insert_event_op(_event(f"evt_big_{i}", body=b"b" * BIG), [_queued()]) for i in range(5)]
        assert store.transaction_now(ops) is None
        assert _count(tmp_path, "events") == 0
        assert store.transaction_now([Store.insert_event_op(_event("evt_small"), [_queued()])]) is not None
    finally:
        store.close()


async def test_a_write_that_may_wait_rides_with_the_next_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An inline attempt's outcome (write_soon) and the next webhook's insert: one
    # transaction, one fsync, and the insert never waits behind the outcome's commit.
    monkeypatch.setattr(commits_module, "SOON", 3600.0)  # only the next write sends it
    batches = _count_batches(store)
    commits = GroupCommitter(store)
    commits.start()
    try:
        first = await commits.write(Store.insert_event_op(_event("evt_first"), [_queued()]))
        delivered = Delivery(first, "alice", ANY, "delivered", 1, None, last_status=200)
        outcome = asyncio.ensure_future(commits.write_soon(Store.update_delivery_op(delivered)))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not outcome.done() and batches == [1]  # waiting for company
        await commits.write(Store.insert_event_op(_event("evt_next"), [_queued()]))
        await asyncio.wait_for(outcome, 10)
    finally:
        await commits.stop()
    assert batches == [1, 2]
    assert store.deliveries(first)[0].status == "delivered"


async def test_a_write_that_may_wait_goes_alone_after_a_while_or_at_stop(store: Store) -> None:
    commits = GroupCommitter(store)
    commits.start()
    seq = await commits.write(Store.insert_event_op(_event("evt_first"), [_queued()]))
    delivered = Delivery(seq, "alice", ANY, "delivered", 1, None, last_status=200)
    try:
        await asyncio.wait_for(commits.write_soon(Store.update_delivery_op(delivered)), 10)  # SOON later
        assert store.deliveries(seq)[0].status == "delivered"
        failed = replace(delivered, status="dead", dead_reason="test")
        pending = asyncio.ensure_future(commits.write_soon(Store.update_delivery_op(failed)))
        await asyncio.sleep(0)
    finally:
        await commits.stop()  # written before the committer stops
    assert pending.done() and pending.exception() is None
    assert store.deliveries(seq)[0].status == "dead"


async def test_group_commit_answers_each_caller_with_its_own_result(store: Store) -> None:
    commits = GroupCommitter(store)
    commits.start()
    try:
        seqs = await asyncio.gather(
            *(commits.write(Store.insert_event_op(_event(f"evt_{i}"), [_queued()])) for i in range(20))
        )
    finally:
        await commits.stop()
    for i, seq in enumerate(seqs):
        found = store.find_event("alice", f"evt_{i}")
        assert found is not None
        assert found[0].seq == seq


async def test_group_commit_failure_reaches_every_caller_of_the_batch(store: Store) -> None:
    _insert(store, _event("evt_dup"))
    commits = GroupCommitter(store)
    commits.start()
    try:
        results = await asyncio.gather(
            commits.write(Store.insert_event_op(_event("evt_a"), [_queued()])),
            commits.write(Store.insert_event_op(_event("evt_dup"), [_queued()])),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreError) for r in results), results
        # The committer goes on after a failed batch.
        seq = await asyncio.wait_for(commits.write(Store.insert_event_op(_event("evt_b"), [_queued()])), 5)
    finally:
        await commits.stop()
    assert store.find_event("alice", "evt_a") is None
    found = store.find_event("alice", "evt_b")
    assert found is not None and found[0].seq == seq


# -- the dispatcher's queries --------------------------------------------------------------


def test_due_is_in_arrival_order_whatever_the_due_times(store: Store) -> None:
    # Arrival order 1, 2, 3, 4; due times out of order; 4 is not due yet.
    seqs = [
        _insert(store, _event("evt_1"), _queued(due=30.0)),
        _insert(store, _event("evt_2"), _queued(due=10.0)),
        _insert(store, _event("evt_3"), _queued(due=20.0)),
        _insert(store, _event("evt_4"), _queued(due=99.0)),
    ]
    due = store.due("alice", ANY, now=50.0, after_seq=0, limit=100)
    assert [e.id for e, _ in due] == ["evt_1", "evt_2", "evt_3"]
    assert [e.seq for e, _ in due] == seqs[:3]
    event, delivery = due[0]
    assert event.body == b'{"n":1}'  # the dispatcher gets the body to deliver
    assert (delivery.event_seq, delivery.tunnel, delivery.destination, delivery.status) == (
        seqs[0],
        "alice",
        ANY,
        "pending",
    )
    assert store.due("alice", ANY, now=5.0, after_seq=0, limit=100) == []


def test_due_without_bodies_and_event_body(store: Store) -> None:
    seq = _insert(store, _event("evt_1", body=b"x" * 5000))
    [(event, delivery)] = store.due("alice", ANY, 1.0, 0, 100, with_body=False)
    assert (event.seq, event.id, event.body) == (seq, "evt_1", b"")
    assert event.headers == _event("evt_1").headers
    assert delivery.status == "pending"
    # The dispatcher loads the body when it makes the attempt.
    assert store.event_body(seq) == b"x" * 5000
    assert store.event_body(seq + 1000) == b""


def test_due_pages_with_a_cursor_and_a_limit(store: Store) -> None:
    seqs = [_insert(store, _event(f"evt_{i}")) for i in range(5)]
    first = store.due("alice", ANY, 1.0, after_seq=0, limit=2)
    assert [e.seq for e, _ in first] == seqs[:2]
    second = store.due("alice", ANY, 1.0, after_seq=first[-1][0].seq, limit=2)
    assert [e.seq for e, _ in second] == seqs[2:4]
    third = store.due("alice", ANY, 1.0, after_seq=second[-1][0].seq, limit=2)
    assert [e.seq for e, _ in third] == seqs[4:]
    assert store.due("alice", ANY, 1.0, after_seq=seqs[-1], limit=2) == []


def test_due_is_per_tunnel_and_destination_and_only_pending(store: Store) -> None:
    a = _insert(store, _event("evt_a"), _queued(), _queued(destination="agent:laptop"))
    _insert(store, _event("evt_other", tunnel="alice-dev"), _queued(tunnel="alice-dev"))
    b = _insert(store, _event("evt_b"))
    c = _insert(store, _event("evt_c"))
    _set(store, b, status="delivered", attempts=1, next_attempt_at=None, last_status=200)
    _set(store, c, status="retrying", attempts=1, next_attempt_at=2.0, last_status=503)
    assert [e.id for e, _ in store.due("alice", ANY, 10.0, 0, 100)] == ["evt_a", "evt_c"]
    assert [e.id for e, _ in store.due("alice", "agent:laptop", 10.0, 0, 100)] == ["evt_a"]
    assert [e.id for e, _ in store.due("alice-dev", ANY, 10.0, 0, 100)] == ["evt_other"]
    [(_, failed)] = [(e, d) for e, d in store.due("alice", ANY, 10.0, 0, 100) if e.seq == c]
    assert (failed.status, failed.attempts, failed.next_attempt_at, failed.last_status) == (
        "retrying",
        1,
        2.0,
        503,
    )
    assert a < b < c


def test_next_due_at(store: Store) -> None:
    assert store.next_due_at("alice", ANY) is None
    a = _insert(store, _event("evt_a"), _queued(due=300.0))
    _insert(store, _event("evt_b"), _queued(due=200.0))
    _insert(store, _event("evt_c"), _queued(destination="agent:laptop", due=100.0))
    assert store.next_due_at("alice", ANY) == 200.0
    assert store.next_due_at("alice", "agent:laptop") == 100.0
    assert store.next_due_at("bob", ANY) is None
    b = store.find_event("alice", "evt_b")
    assert b is not None
    _set(store, b[0].seq, status="delivered", attempts=1, next_attempt_at=None)
    assert store.next_due_at("alice", ANY) == 300.0
    _set(store, a, status="dead", attempts=11, next_attempt_at=None)
    assert store.next_due_at("alice", ANY) is None


def test_update_delivery_op_records_an_attempt(store: Store) -> None:
    seq = _insert(store, _event("evt_1"), _queued(due=1.0), _queued(destination="agent:laptop", due=1.0))
    store.transaction([Store.update_delivery_op(Delivery(seq, "alice", ANY, "retrying", 1, 35.0, 503, None))])
    by_destination = {d.destination: d for d in store.deliveries(seq)}
    assert by_destination[ANY] == Delivery(seq, "alice", ANY, "retrying", 1, 35.0, 503, None)
    # The other destination has its own state, untouched.
    assert by_destination["agent:laptop"] == Delivery(seq, "alice", "agent:laptop", "pending", 0, 1.0)
    store.transaction(
        [Store.update_delivery_op(Delivery(seq, "alice", ANY, "dead", 2, None, None, "agent: gone"))]
    )
    assert store.deliveries(seq)[0] == Delivery(seq, "alice", ANY, "dead", 2, None, None, "agent: gone")


async def test_what_follows_a_commit_happens_in_the_order_of_the_writes(store: Store) -> None:
    """Each write's ``then`` is called with its result when the batch is committed, in
    the order of the writes and before any writer resumes: the quota counts follow the
    store exactly, however the writers' tasks are scheduled (a recount used to be
    applied when its task resumed, after or before the inserts beside it)."""
    commits = GroupCommitter(store)
    commits.start()
    seen: list[object] = []
    resumed: list[str] = []

    async def insert(name: str) -> None:
        await asyncio.shield(commits.submit(Store.insert_event_op(_event(name), [_queued()]), seen.append))
        resumed.append(name)

    async def recount() -> None:
        await commits.write(Store.pending_totals_op(), seen.append)
        resumed.append("recount")

    try:
        await asyncio.wait_for(asyncio.gather(insert("evt_1"), recount(), insert("evt_2")), 10)
    finally:
        await commits.stop()
    first, second = (
        found[0].seq for found in (store.find_event("alice", n) for n in ("evt_1", "evt_2")) if found
    )
    assert seen == [first, {"alice": (1, 7)}, second]
    assert sorted(resumed) == ["evt_1", "evt_2", "recount"]


def test_an_outcome_says_whether_the_event_still_waits_anywhere(store: Store) -> None:
    seq = _insert(store, _event("evt_1"), _queued(), _queued(destination="agent:laptop"))
    retrying = Delivery(seq, "alice", ANY, "retrying", 1, 35.0, 503, None)
    assert store.transaction([Store.update_delivery_op(retrying)]) == [True]
    delivered = Delivery(seq, "alice", ANY, "delivered", 2, None, 200, None)
    assert store.transaction([Store.update_delivery_op(delivered)]) == [True]  # laptop's waits
    dead = Delivery(seq, "alice", "agent:laptop", "dead", 1, None, None, "agent: gone", dead_reason="x")
    # Both finish in one transaction: only the last one written says so (counted out once).
    delivered_again = replace(delivered, attempts=3)
    assert store.transaction([Store.update_delivery_op(d) for d in (delivered_again, dead)]) == [True, False]


def test_pending_totals(store: Store) -> None:
    assert store.pending_totals() == {}
    a = _insert(store, _event("evt_a", body=b"x" * 100))
    _insert(store, _event("evt_b", body=b"y" * 50))
    # One event fanned out to two destinations counts once.
    _insert(store, _event("evt_f", body=b"z" * 7), _queued(), _queued(destination="agent:laptop"))
    _insert(store, _event("evt_o", tunnel="alice-dev", body=b""), _queued(tunnel="alice-dev"))
    assert store.pending_totals() == {"alice": (3, 157), "alice-dev": (1, 0)}
    _set(store, a, status="delivered", attempts=1, next_attempt_at=None)
    assert store.pending_totals() == {"alice": (2, 57), "alice-dev": (1, 0)}
    f = store.find_event("alice", "evt_f")
    assert f is not None
    _set(store, f[0].seq, status="dead", attempts=11, next_attempt_at=None)
    # Still pending at its second destination.
    assert store.pending_totals()["alice"] == (2, 57)
    assert sorted(store.pending_destinations()) == [
        ("alice", ANY),
        ("alice", "agent:laptop"),
        ("alice-dev", ANY),
    ]


# -- the API's queries ---------------------------------------------------------------------


def test_find_events_is_per_user_newest_first_without_bodies(store: Store) -> None:
    _insert(store, _event("evt_1"))
    _insert(store, _event("evt_2", tunnel="alice-dev"), _queued(tunnel="alice-dev"))
    _insert(store, _event("evt_bob", tunnel="bob", user="bob"), _queued(tunnel="bob"))
    _insert(store, _event("evt_3"))
    found = store.find_events("alice", None, None, 100)
    assert [e.id for e, _ in found] == ["evt_3", "evt_2", "evt_1"]
    assert all(e.body == b"" for e, _ in found)
    assert all(e.user == "alice" for e, _ in found)
    assert [[d.destination for d in ds] for _, ds in found] == [[ANY], [ANY], [ANY]]
    assert [e.id for e, _ in store.find_events("bob", None, None, 100)] == ["evt_bob"]
    assert store.find_events("carol", None, None, 100) == []
    assert [e.id for e, _ in store.find_events("alice", None, None, 2)] == ["evt_3", "evt_2"]


def test_find_events_filters_by_tunnel_and_status(store: Store) -> None:
    one = _insert(store, _event("evt_1"))
    _insert(store, _event("evt_2", tunnel="alice-dev"), _queued(tunnel="alice-dev"))
    three = _insert(store, _event("evt_3"), _queued(), _queued(destination="agent:laptop"))
    _set(store, one, status="delivered", attempts=1, next_attempt_at=None)
    _set(store, three, destination="agent:laptop", status="dead", attempts=3, next_attempt_at=None)

    def ids(tunnel: str | None, status: str | None) -> list[str]:
        return [e.id for e, _ in store.find_events("alice", tunnel, status, 100)]

    assert ids("alice", None) == ["evt_3", "evt_1"]
    assert ids("alice-dev", None) == ["evt_2"]
    assert ids(None, "pending") == ["evt_3", "evt_2"]  # evt_3 is still queued at agent:*
    assert ids(None, "delivered") == ["evt_1"]
    assert ids(None, "dead") == ["evt_3"]
    assert ids(None, "retrying") == []
    assert ids("alice-dev", "delivered") == []
    # The tunnel filter does not reach another user's tunnel of the same name.
    _insert(store, _event("evt_bob", tunnel="alice", user="bob"))
    assert ids("alice", None) == ["evt_3", "evt_1"]


def test_find_event_with_and_without_body(store: Store) -> None:
    seq = _insert(store, _event("evt_1", body=b"payload"))
    with_body = store.find_event("alice", "evt_1", with_body=True)
    without_body = store.find_event("alice", "evt_1")
    assert with_body is not None and without_body is not None
    assert with_body[0].body == b"payload"
    assert without_body[0].body == b""
    assert with_body[0].seq == without_body[0].seq == seq
    assert with_body[1] == [Delivery(seq, "alice", ANY, "pending", 0, 0.0)]
    # Someone else's event is not found, as if it did not exist.
    assert store.find_event("bob", "evt_1", with_body=True) is None
    assert store.find_event("alice", "evt_nope") is None


# -- purge ------------------------------------------------------------------------------------


class FakeTime:
    """Stands in for the ``time`` module inside ``relay_server.store``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_purge_deletes_only_finished_events_older_than_the_cut_off(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTime(1000.0)
    monkeypatch.setattr(store_module, "time", clock)
    old_done = _insert(store, _event("evt_old_done"))
    old_dead = _insert(store, _event("evt_old_dead"))
    old_pending = _insert(store, _event("evt_old_pending"))
    half_done = _insert(store, _event("evt_half"), _queued(), _queued(destination="agent:laptop"))
    _set(store, old_done, status="delivered", attempts=1, next_attempt_at=None)
    _set(store, old_dead, status="dead", attempts=11, next_attempt_at=None)
    _set(store, old_pending, status="retrying", attempts=3, next_attempt_at=5000.0)
    _set(store, half_done, status="delivered", attempts=1, next_attempt_at=None)
    clock.now = 2000.0
    new_done = _insert(store, _event("evt_new_done"))
    _set(store, new_done, status="delivered", attempts=1, next_attempt_at=None)

    assert store.purge(before=500.0) == 0
    assert store.purge(before=1500.0) == 2
    left = sorted(e.id for e, _ in store.find_events("alice", None, None, 100))
    assert left == ["evt_half", "evt_new_done", "evt_old_pending"]
    # Their deliveries went with them.
    assert store.deliveries(old_done) == []
    assert store.deliveries(old_dead) == []
    assert _count(tmp_path, "deliveries") == 4
    assert store.purge(before=2500.0) == 1
    assert sorted(e.id for e, _ in store.find_events("alice", None, None, 100)) == [
        "evt_half",
        "evt_old_pending",
    ]


def test_purge_of_recent_events_keeps_them(store: Store) -> None:
    seq = _insert(store, _event("evt_1"))
    _set(store, seq, status="delivered", attempts=1, next_attempt_at=None)
    assert store.purge(before=time.time() - 7 * 86400) == 0
    assert store.find_event("alice", "evt_1") is not None
    assert store.purge(before=time.time() + 1) == 1
    assert store.find_event("alice", "evt_1") is None


# -- a full disk -----------------------------------------------------------------------------

#: The capped store: 256 KiB, of which the schema takes a few pages.
SMALL_STORE = 256 * 1024
BIG = 100 * 1024


def test_a_batch_too_big_for_the_store_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        kept = _insert(store, _event("evt_small", body=b"s" * 1000))
        ops = [Store.insert_event_op(_event(f"evt_big_{i}", body=b"b" * BIG), [_queued()]) for i in range(5)]
        with pytest.raises(StoreError):
            store.transaction(ops)
        # Not one of the five, not one delivery row: the batch is all or nothing.
        assert [e.id for e, _ in store.find_events("alice", None, None, 100)] == ["evt_small"]
        assert store.pending_totals() == {"alice": (1, 1000)}
        assert _count(tmp_path, "events") == 1
        assert _count(tmp_path, "deliveries") == 1
        assert store.deliveries(kept)[0].status == "pending"
        # What fits is still written.
        _insert(store, _event("evt_fits", body=b"f" * BIG))
        assert store.find_event("alice", "evt_fits") is not None
    finally:
        store.close()


def test_a_full_store_says_it_is_full(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        ops = [Store.insert_event_op(_event(f"evt_big_{i}", body=b"b" * BIG), [_queued()]) for i in range(5)]
        with pytest.raises(StoreError, match="full"):
            store.transaction(ops)
    finally:
        store.close()


def test_a_full_store_recovers_after_a_purge(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        written = []
        for i in range(100):
            try:
                written.append(_insert(store, _event(f"evt_{i}", body=b"x" * (30 * 1024))))
            except StoreError:
                break
        else:
            pytest.fail("a 256 KiB store took 100 bodies of 30 KiB")
        assert 2 <= len(written) < 9
        with pytest.raises(StoreError):
            _insert(store, _event("evt_refused", body=b"x" * (30 * 1024)))
        assert store.find_event("alice", "evt_refused") is None
        # Delivered: under pressure the store purges finished events, oldest first,
        # before their retention, so new webhooks fit again without any purge by hand.
        for seq in written:
            _set(store, seq, status="delivered", attempts=1, next_attempt_at=None)
        for i in range(len(written)):
            _insert(store, _event(f"evt_again_{i}", body=b"x" * (30 * 1024)))
        left = [e.id for e, _ in store.find_events("alice", None, None, 100)]
        assert set(left) >= {f"evt_again_{i}" for i in range(len(written))}
        # The oldest went first: whatever is left of the first round is its newest.
        first_round = sorted((i for i in left if not i.startswith("evt_again")), key=lambda i: int(i[4:]))
        assert first_round == [f"evt_{i}" for i in range(len(written) - len(first_round), len(written))]
    finally:
        store.close()


async def test_a_full_store_fails_the_group_commit_and_recovers(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    commits = GroupCommitter(store)
    commits.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    commits.write(Store.insert_event_op(_event(f"evt_{i}", body=b"b" * BIG), [_queued()]))
                    for i in range(5)
                ),
                return_exceptions=True,
            ),
            10,
        )
        failed = [r for r in results if isinstance(r, StoreError)]
        stored = [r for r in results if isinstance(r, int)]
        assert failed, results
        assert len(failed) + len(stored) == 5
        ids = {e.id for e, _ in store.find_events("alice", None, None, 100)}
        # Exactly the writes that were acknowledged are there: never a false success.
        assert len(ids) == len(stored)
        assert {found[0].seq for i in ids if (found := store.find_event("alice", i))} == set(stored)
        store.purge(before=time.time() + 1)  # nothing finished: nothing purged
        for seq in stored:
            _set(store, seq, status="delivered", attempts=1, next_attempt_at=None)
        store.purge(before=time.time() + 1)
        seq = await asyncio.wait_for(
            commits.write(Store.insert_event_op(_event("evt_after", body=b"a" * BIG), [_queued()])), 5
        )
        found = store.find_event("alice", "evt_after", with_body=True)
        assert found is not None and found[0].seq == seq and found[0].body == b"a" * BIG
    finally:
        await commits.stop()
        store.close()


def test_writes_from_many_threads_all_land(store: Store) -> None:
    def writer(n: int) -> None:
        for i in range(20):
            _insert(store, _event(f"evt_{n}_{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    found = store.find_events("alice", None, None, 1000)
    assert len(found) == 80
    assert [e.seq for e, _ in found] == sorted((e.seq for e, _ in found), reverse=True)


# -- issue 7: the v3 schema, expiry by max age, room made under pressure -------------------------


def test_v2_stores_migrate_to_the_readable_states(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("BEGIN")
    for statement in (MIGRATIONS[0] + MIGRATIONS[1]).split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute(
        "INSERT INTO events (id, tunnel, user, received_at, method, target, headers, client, body)"
        " VALUES ('evt_1', 'alice', 'alice', 1.0, 'POST', '/', '[]', '', x''),"
        " ('evt_2', 'alice', 'alice', 2.0, 'POST', '/', '[]', '', x'')"
    )
    db.execute(
        "INSERT INTO deliveries (event_seq, tunnel, destination, status, attempts, next_attempt_at,"
        " updated_at) VALUES (1, 'alice', 'agent:*', 'queued', 0, 5.0, 1.0),"
        " (2, 'alice', 'agent:*', 'failed', 3, 9.0, 1.0)"
    )
    db.execute("COMMIT")
    db.close()
    store = Store(tmp_path)
    try:
        assert store.deliveries(1)[0].status == "pending"
        retrying = store.deliveries(2)[0]
        # The schedule steps spent so far are kept: each old attempt counted as a failure.
        assert (retrying.status, retrying.attempts, retrying.failures) == ("retrying", 3, 3)
    finally:
        store.close()


def test_expire_kills_only_waiting_deliveries_past_their_max_age(store: Store) -> None:
    old = _insert(store, _event("evt_old", received_at=1000.0))
    old_done = _insert(store, _event("evt_old_done", received_at=1000.0))
    _set(store, old_done, status="delivered", attempts=1, next_attempt_at=None)
    replayed = _insert(store, _event("evt_replayed", received_at=1000.0))
    _set(store, replayed, since=5000.0)  # a replay restarted its clock
    young = _insert(store, _event("evt_young", received_at=4000.0))
    assert store.expire(3000.0, "not delivered within the max age") == 1
    dead = store.deliveries(old)[0]
    assert (dead.status, dead.dead_reason, dead.next_attempt_at) == (
        "dead",
        "not delivered within the max age",
        None,
    )
    assert store.deliveries(old_done)[0].status == "delivered"
    assert store.deliveries(replayed)[0].status == "pending"
    assert store.deliveries(young)[0].status == "pending"
    assert store.pending_totals() == {"alice": (2, 2 * len(b'{"n":1}'))}


def _fill_with_waiting(store: Store, size: int = 2048) -> list[int]:
    """Insert waiting events of ``size`` bytes until the store refuses one; their seqs."""
    waiting: list[int] = []
    with pytest.raises(NoRoomForEvents):
        for i in range(10_000):
            waiting.append(_insert(store, _event(f"evt_{i}", body=b"x" * size)))
    return waiting


def _failed(store: Store, seq: int, attempt: int) -> Callable[[sqlite3.Connection], bool]:
    """The write of attempt number ``attempt`` of ``seq`` failing (503: retried)."""
    [current] = store.deliveries(seq)
    return Store.update_delivery_op(
        replace(
            current,
            status="retrying",
            attempts=attempt,
            failures=attempt,
            last_status=503,
            next_attempt_at=5.0,
        )
    )


def test_a_store_full_of_waiting_events_still_records_every_outcome(tmp_path: Path) -> None:
    # Found by a review: new events filled a capped store to its last page, so the
    # outcome of their next attempt (a row update and a history row) could not be
    # written; recording stopped every dispatcher, for every tenant, across restarts.
    # New events now leave RECORD_RESERVE to outcomes, and once that is spent too the
    # oldest history goes, never an outcome.
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        waiting = _fill_with_waiting(store)
        assert len(waiting) >= 20
        rounds = 30  # 30 history rows per event: far more than the reserve holds
        for attempt in range(1, rounds + 1):
            assert store.transaction([_failed(store, seq, attempt) for seq in waiting]) == [True] * len(
                waiting
            )
        for seq in waiting:
            [delivery] = store.deliveries(seq)
            assert (delivery.status, delivery.attempts, delivery.last_status) == ("retrying", rounds, 503)
            assert store.attempts(seq)[-1].attempt == rounds  # the newest history is kept
        # And the event that comes next is refused still: the room is the outcomes'.
        with pytest.raises(NoRoomForEvents):
            _insert(store, _event("evt_refused", body=b"x" * 2048))
        # Delivered, the events make room again.
        store.transaction(
            [
                Store.update_delivery_op(
                    replace(
                        store.deliveries(seq)[0],
                        status="delivered",
                        next_attempt_at=None,
                        attempts=rounds + 1,
                        last_status=200,
                    )
                )
                for seq in waiting
            ]
        )
        _insert(store, _event("evt_after", body=b"x" * 2048))
    finally:
        store.close()


@pytest.mark.parametrize(("size", "destinations"), [(50, 1), (300, 4)])
def test_a_store_full_of_small_events_records_each_ones_first_outcome(
    tmp_path: Path, size: int, destinations: int
) -> None:
    # Found by a second review: an outcome grows its delivery's row (an error of up to
    # 200 characters where there was none), which no reserve of a share of the cap held
    # for thousands of small events: 2,645 of 4,773 first outcomes found no room, with the
    # history already trimmed to nothing. Each waiting row now holds that room itself.
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        targets = [ANY, *(f"https://hooks.example.com/{i}" for i in range(destinations - 1))]
        waiting: list[int] = []
        with pytest.raises(NoRoomForEvents):
            for i in range(100_000):
                event = _event(f"evt_{i}", body=b"x" * size)
                waiting.append(_insert(store, event, *(_queued(destination=d) for d in targets)))
        assert len(waiting) >= 50
        error = "agent: " + "e" * 193  # as long as an error is kept (states.MAX_ERROR)
        ops = [
            Store.update_delivery_op(
                replace(d, status="retrying", attempts=1, failures=1, last_error=error, next_attempt_at=5.0)
            )
            for seq in waiting
            for d in store.deliveries(seq)
        ]
        for op in ops:  # one by one, as outcomes come: none may fail
            store.transaction([op])
        assert all(d.last_error == error for seq in waiting for d in store.deliveries(seq))
    finally:
        store.close()


def test_a_full_store_whose_rows_hold_no_room_grows_past_its_cap_for_their_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a third review: waiting deliveries stored before schema v5 hold no room
    # (nor does a fan-out delivery's dead reason fit in it); upgraded full, such a store
    # delivered nothing. Outcomes of what a store accepted now go past its cap (up to
    # RECORD_OVERSHOOT of it, with a warning); new events never do.
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        store.claim_name("alice", "alice")
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "_room", lambda delivery: None)  # as a v4 store's rows
            waiting = _fill_with_waiting(store, size=50)
        error = "agent: " + "e" * 193
        for seq in waiting:
            [delivery] = store.deliveries(seq)
            failed = replace(
                delivery, status="retrying", attempts=1, failures=1, last_error=error, next_attempt_at=5.0
            )
            store.transaction([Store.update_delivery_op(failed)])
        assert all(store.deliveries(seq)[0].last_error == error for seq in waiting)
        size = os.path.getsize(tmp_path / DB_FILE)
        assert SMALL_STORE < size <= SMALL_STORE * (1 + store_module.RECORD_OVERSHOOT) + 64 * 1024
        with pytest.raises(NoRoomForEvents):
            _insert(store, _event("evt_refused", body=b"x" * 50))
        # The room grown is the outcomes' alone: a new name or token is refused as an event
        # (a fourth review saw settings and names take it), a name held needs no write.
        with pytest.raises(NoRoomForEvents):
            store.claim_name("bob", "bob")
        with pytest.raises(NoRoomForEvents):
            store.record_token(Claims("carol", ["carol"], "token-carol", 2_000_000_000))
        assert store.claim_name("alice", "alice") == "alice"
    finally:
        store.close()


def test_an_outcome_of_an_event_no_longer_stored_is_left_alone(tmp_path: Path, store: Store) -> None:
    # A kept outcome (written again after a store failure) whose event was purged in the
    # meantime (its name released, then the store full) failed on the history's foreign
    # key, and with it every outcome written beside it, for good: the dispatchers of
    # every tenant wait for those writes.
    gone = _insert(store, _event("evt_gone"))
    kept = _insert(store, _event("evt_kept"))
    [delivery_gone] = store.deliveries(gone)
    [delivery_kept] = store.deliveries(kept)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_FILE)) as db, db:
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM events WHERE seq = ?", (gone,))
    delivered = {"status": "delivered", "attempts": 1, "last_status": 200, "next_attempt_at": None}
    results = store.transaction(
        [Store.update_delivery_op(replace(d, **delivered)) for d in (delivery_gone, delivery_kept)]
    )
    assert results == [False, False]
    assert store.deliveries(kept)[0].status == "delivered"
    assert store.deliveries(gone) == [] and store.attempts(gone) == []


async def test_a_full_store_refuses_the_new_events_of_a_batch_not_the_outcomes_beside_them(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    waiting = _fill_with_waiting(store)
    commits = GroupCommitter(store)
    commits.start()
    try:
        outcome = asyncio.ensure_future(commits.write(_failed(store, waiting[0], 1)))
        new = asyncio.ensure_future(commits.write(Store.insert_event_op(_event("evt_new"), [_queued()])))
        await asyncio.wait_for(asyncio.wait((outcome, new)), 10)
        assert outcome.result() is True
        assert isinstance(new.exception(), NoRoomForEvents)
        assert store.deliveries(waiting[0])[0].attempts == 1
        assert store.find_event("alice", "evt_new") is None
    finally:
        await commits.stop()
        store.close()


def test_a_full_store_never_purges_a_waiting_event(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=SMALL_STORE)
    try:
        waiting = []
        with pytest.raises(StoreFull):
            for i in range(100):
                waiting.append(_insert(store, _event(f"evt_{i}", body=b"x" * (30 * 1024))))
        assert len(waiting) >= 2
        # Nothing finished to purge: every waiting event is still there, with its body.
        for i, seq in enumerate(waiting):
            found = store.find_event("alice", f"evt_{i}", with_body=True)
            assert found is not None and found[0].seq == seq and len(found[0].body) == 30 * 1024
    finally:
        store.close()
