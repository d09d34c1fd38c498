"""Group commit: many writes from the event loop, one transaction and one fsync.

Callers ``await commits.write(op)``; a single worker takes every operation
waiting at that moment, runs them in one transaction, and answers them all.
Under load a commit carries hundreds of events; alone, a write waits for one
fsync as it would anyway. The worker is supervised: every caller gets an answer
(a result or an exception), whatever fails.

The transaction runs on the event loop itself while commits are quick, as Redis
syncs its append-only file in its event loop (``appendfsync always``), and in a
thread otherwise. Measured here (docs/performance.md): a batch of a few webhooks
commits, fsync included, in 0.2-0.4 ms, and handing it to a thread cost 4-5 ms,
most of it the two threads waiting for the GIL in turn while the loop is busy.
Only small batches of operations that say what they write (``size``: a webhook's
insert, an attempt's outcome) commit on the loop; any other batch (a burst of big
bodies, a scan such as the recount) goes to a thread, as does one that would wait
(a thread or another process holds the write lock, the store is full). Commits that
take longer than ``LOOP_COMMIT_MAX`` on average (a slow disk) go to a thread for a
while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import StoreError, StoreFull
from .store import NewEvent, Store
from .tasks import Tasks

T = TypeVar("T")

log = logging.getLogger("relay.server")

#: Most operations in one transaction: bounds how long one commit holds the
#: writer lock (and the latency of the first caller in a long queue).
MAX_BATCH = 1000
#: Seconds ``stop`` lets the writes already waiting be committed.
STOP_WAIT = 10.0
#: Seconds a write that may wait (``write_soon``) waits for a commit to ride with: an
#: inline attempt's outcome, written after its sender has the answer, then costs no
#: transaction and no fsync of its own, and the next webhook's insert never queues
#: behind it (one commit per webhook instead of two at one sender).
SOON = 0.005
#: Seconds commits may hold the event loop, on average (an exponentially weighted
#: one, weight ``LOOP_COMMIT_WEIGHT`` for the newest): every tunnel's streams wait
#: while the loop commits. Over it (a disk slow to fsync), commits go to a thread
#: for a pause of ``LOOP_COMMIT_PAUSE`` seconds, doubled at each pause that follows
#: within ``LOOP_COMMIT_PAUSE_MAX`` of the last (a disk that stays slow costs the loop
#: one commit every 30 s). A local SSD syncs in well under a millisecond; one slow
#: commit now and then (a WAL checkpoint, the first commits on a cold cache: 20 ms
#: here) moves the average without tipping it, one very slow commit tips it at once.
LOOP_COMMIT_MAX = 0.005
LOOP_COMMIT_WEIGHT = 0.1
LOOP_COMMIT_PAUSE = 1.0
LOOP_COMMIT_PAUSE_MAX = 30.0
#: Bytes one commit on the event loop may carry: what its operations say they write
#: (``size``: a webhook's body) plus ``LOOP_OP_BYTES`` for each one's rows and index
#: pages. A bigger batch goes to a thread from the start: one 10 MiB webhook took
#: 80 ms to write and sync here, 25 of them (the body budget's worth) 1.5 s.
LOOP_BATCH_BYTES = 256 * 1024
LOOP_OP_BYTES = 1024
#: WAL bytes not yet copied back (``Store.wal_backlog``) past which a checkpoint runs in
#: a thread (``Store.checkpoint``); commits never checkpoint themselves. SQLite's own
#: default: 1,000 pages of 4 KiB.
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: Seconds before a checkpoint that failed is tried again.
CHECKPOINT_RETRY = 1.0

#: Called with an operation's result as soon as its batch is committed, before the
#: next operation's: in-memory state that follows the store (the quota counts) changes
#: in the very order of the writes, whoever resumes first afterwards.
Then = Callable[[Any], None] | None
#: An operation waiting for a commit: the operation, its caller's future, its ``then``,
#: and the bytes it says it writes (None: it may run only in a thread).
Pending = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", Then, int | None]


class GroupCommitter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[Pending] = []
        #: ``write_soon`` operations: they join the next batch, or go alone after SOON.
        self._soon: list[Pending] = []
        self._soon_timer: asyncio.TimerHandle | None = None
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = Tasks("group commit")
        self._checkpoint: asyncio.Task[None] | None = None
        self._checkpoint_after = 0.0  # time.monotonic() before which none starts (one failed)
        #: Checkpoints follow each other until one leaves nothing behind (``_checkpoint_if_due``).
        self._catching_up = False
        #: The weighted average of the seconds commits took on the loop.
        self._loop_commit_time = 0.0
        #: ``time.monotonic()`` before which commits go to a thread (they were slow).
        self._thread_until = -LOOP_COMMIT_PAUSE_MAX
        self._pause = LOOP_COMMIT_PAUSE
        #: Told the size of every batch committed.
        self.on_batch: Callable[[int], None] = lambda size: None

    def start(self) -> None:
        self.store.checkpoint_apart()
        self._tasks.loop(self._run, "the group committer")

    async def stop(self) -> None:
        """Commit what is waiting (for at most ``STOP_WAIT`` seconds), then stop; a write
        still waiting then gets ``StoreError``."""
        self._flush_soon()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), STOP_WAIT)
        await self._tasks.stop()
        self._take_soon()
        self._fail(self._pending, StoreError("the relay server is stopping"))
        self._pending = []

    async def write(
        self, op: Callable[[sqlite3.Connection], T], then: Then = None, *, size: int | None = None
    ) -> T:
        """Run ``op`` in the next group commit; returns once it is durable. ``then`` is
        called with the result once committed, in the order of the writes (see ``Then``).
        ``size``: the bytes ``op`` writes, for a small indexed write (an insert, an
        update by key) that may run on the event loop; None (a scan, a purge, several
        writes): only in a thread.

        Raises ``StoreError`` (``StoreFull``) if the commit failed: nothing of it was written.
        """
        return await self.submit(op, then, size=size)

    def submit(
        self, op: Callable[[sqlite3.Connection], T], then: Then = None, *, size: int | None = None
    ) -> asyncio.Future[T]:
        """Queue ``op`` for the next group commit; the future is answered as ``write``
        returns or raises. (No task per write: the ingress awaits it shielded.)"""
        future = self._queue(self._pending, op, then, size)
        self._ready.set()
        return future

    async def write_soon(
        self, op: Callable[[sqlite3.Connection], T], then: Then = None, *, size: int | None = None
    ) -> T:
        """As ``write``, for an operation that may wait up to ``SOON`` seconds to share
        the next group commit (nobody waits on it but a background task)."""
        future = self._queue(self._soon, op, then, size)
        if self._soon_timer is None:
            self._soon_timer = asyncio.get_running_loop().call_later(SOON, self._flush_soon)
        return await future

    def _queue(
        self, queue: list[Pending], op: Callable[[sqlite3.Connection], T], then: Then, size: int | None
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        queue.append((op, future, then, size))
        self._idle.clear()
        return future

    def _flush_soon(self) -> None:
        """``SOON`` is up (or the committer stops): the waiting operations go now."""
        if self._soon:
            self._take_soon()
            self._ready.set()

    def _take_soon(self) -> None:
        if self._soon_timer is not None:
            self._soon_timer.cancel()
            self._soon_timer = None
        self._pending.extend(self._soon)
        self._soon = []

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            # One pass of the loop for the writes of the handlers woken with this one to
            # join: measured at 16 and 64 senders, 4.5 -> 7 writes per commit, 30 % fewer
            # commits (and fsyncs holding the loop); it costs a commit one loop pass.
            await asyncio.sleep(0)
            self._ready.clear()
            while self._pending:
                self._take_soon()
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._commit(batch)
                except BaseException as exc:  # cancelled, or a bug: every caller still gets an answer
                    self._fail(batch, StoreError(f"commit interrupted: {type(exc).__name__}"))
                    raise
            if not self._soon:
                self._idle.set()

    async def _commit(self, batch: list[Pending]) -> None:
        self.on_batch(len(batch))
        ops = [op for op, _, _, _ in batch]
        try:
            results = self._commit_now(ops) if _fits_the_loop(batch) else None
            if results is None:
                results = await asyncio.to_thread(self.store.transaction, ops)
        except StoreFull as exc:
            # Full: new events are refused, but what the others write (attempts'
            # outcomes, in the room kept for them) must not fail with them: committed
            # together, or one by one if that is still too much.
            new = [pending for pending in batch if isinstance(pending[0], NewEvent)]
            rest = [pending for pending in batch if not isinstance(pending[0], NewEvent)]
            self._fail(new, exc)
            if new and rest:
                await self._commit(rest)
            elif len(rest) > 1:
                await self._one_by_one(rest)
            elif rest:
                self._fail(rest, exc)
            return
        except StoreError as error:
            self._fail(batch, error)
            return
        except Exception:
            # A bug in one operation rolled back the whole batch: run each alone, so
            # only the faulty one fails.
            await self._one_by_one(batch)
            return
        for (_, future, then, _), result in zip(batch, results, strict=True):
            self._answer(future, then, result)
        self._checkpoint_if_due()

    async def _one_by_one(self, batch: list[Pending]) -> None:
        """Commit each operation of ``batch`` alone, in a thread: one failing fails alone."""
        for op, future, then, _ in batch:
            try:
                (result,) = await asyncio.to_thread(self.store.transaction, [op])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self._answer(future, then, result)
        self._checkpoint_if_due()

    def _checkpoint_if_due(self) -> None:
        """Start a checkpoint in a thread when the WAL holds more than ``CHECKPOINT_BYTES``
        not yet copied back, and then after each commit until one has left nothing
        behind: one at a time, and ``CHECKPOINT_RETRY`` after one failed.

        SQLite writes the WAL over from its start only once a checkpoint has copied all
        of it back; under steady writes each checkpoint leaves the commits made while it
        ran, so a checkpoint only at every ``CHECKPOINT_BYTES`` let the WAL file grow
        without end (56 MB in 12 s at 1,000 webhooks/s). The ones that catch up are short.
        """
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        if time.monotonic() < self._checkpoint_after:
            return
        backlog = self.store.wal_backlog()
        if backlog >= CHECKPOINT_BYTES or (self._catching_up and backlog > 0):
            self._catching_up = True
            self._checkpoint = self._tasks.spawn(self._run_checkpoint(), "a WAL checkpoint")

    async def _run_checkpoint(self) -> None:
        try:
            await asyncio.to_thread(self.store.checkpoint)
        except StoreError as exc:  # the commits report a failing store
            log.debug("%s", exc)
            self._checkpoint_after = time.monotonic() + CHECKPOINT_RETRY
            return
        if self.store.wal_backlog() == 0:  # the next commit starts the WAL over
            self._catching_up = False

    def _commit_now(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any] | None:
        """Commit ``ops`` on the event loop if commits are quick and nothing makes this
        one wait (``Store.transaction_now``); None if it must go to a thread."""
        if time.monotonic() < self._thread_until:
            return None
        started = time.monotonic()
        try:
            return self.store.transaction_now(ops)
        finally:
            ended = time.monotonic()
            took = ended - started
            self._loop_commit_time += LOOP_COMMIT_WEIGHT * (took - self._loop_commit_time)
            if self._loop_commit_time > LOOP_COMMIT_MAX:
                if ended - self._thread_until > LOOP_COMMIT_PAUSE_MAX:
                    self._pause = LOOP_COMMIT_PAUSE  # the last pause is long past
                # A warning for the first pause of a series (the disk got slow), then info.
                log.log(
                    logging.WARNING if self._pause == LOOP_COMMIT_PAUSE else logging.INFO,
                    "commits took %.1f ms on the event loop (the last %.1f ms); the next %gs of"
                    " them go to a thread",
                    self._loop_commit_time * 1000,
                    took * 1000,
                    self._pause,
                )
                self._thread_until = ended + self._pause
                self._pause = min(self._pause * 2, LOOP_COMMIT_PAUSE_MAX)
                self._loop_commit_time = LOOP_COMMIT_MAX / 2  # the next try must show it is quick

    @staticmethod
    def _answer(future: asyncio.Future[Any], then: Then, result: Any) -> None:
        if then is not None:
            try:
                then(result)
            except Exception:  # a bug in one caller's bookkeeping: the others still hear
                log.exception("after a group commit")
        if not future.done():
            future.set_result(result)

    @staticmethod
    def _fail(batch: list[Pending], exc: Exception) -> None:
        for _, future, _, _ in batch:
            if not future.done():
                future.set_exception(exc)


def _fits_the_loop(batch: list[Pending]) -> bool:
    """True if every operation of ``batch`` says what it writes and it all fits in
    ``LOOP_BATCH_BYTES``."""
    total = 0
    for *_, size in batch:
        if size is None:
            return False
        total += size + LOOP_OP_BYTES
    return total <= LOOP_BATCH_BYTES
