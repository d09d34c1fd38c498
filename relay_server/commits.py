"""Group commit: many writes from the event loop, one transaction and one fsync.

Callers ``await commits.write(op)``; a single worker takes every operation
waiting at that moment, runs them in one ``Store.transaction`` in a thread, and
answers them all. Under load a commit carries hundreds of events; alone, a
write waits for one fsync as it would anyway. The worker is supervised: every
caller gets an answer (a result or an exception), whatever fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import StoreError
from .store import Store
from .tasks import Tasks

T = TypeVar("T")

#: Most operations in one transaction: bounds how long one commit holds the
#: writer lock (and the latency of the first caller in a long queue).
MAX_BATCH = 1000
#: Seconds ``stop`` lets the writes already waiting be committed.
STOP_WAIT = 10.0

Pending = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class GroupCommitter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[Pending] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = Tasks("group commit")
        #: Told the size of every batch committed.
        self.on_batch: Callable[[int], None] = lambda size: None

    def start(self) -> None:
        self._tasks.loop(self._run, "the group committer")

    async def stop(self) -> None:
        """Commit what is waiting (for at most ``STOP_WAIT`` seconds), then stop; a write
        still waiting then gets ``StoreError``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), STOP_WAIT)
        await self._tasks.stop()
        self._fail(self._pending, StoreError("the relay server is stopping"))
        self._pending = []

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` in the next group commit; returns once it is durable.

        Raises ``StoreError`` (``StoreFull``) if the commit failed: nothing of it was written.
        """
        return await self.submit(op)

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``op`` for the next group commit; the future is answered as ``write``
        returns or raises. (No task per write: the ingress awaits it shielded.)"""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._idle.clear()
        self._ready.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._commit(batch)
                except BaseException as exc:  # cancelled, or a bug: every caller still gets an answer
                    self._fail(batch, StoreError(f"commit interrupted: {type(exc).__name__}"))
                    raise
            self._idle.set()

    async def _commit(self, batch: list[Pending]) -> None:
        self.on_batch(len(batch))
        try:
            results = await asyncio.to_thread(self.store.transaction, [op for op, _ in batch])
        except StoreError as exc:
            self._fail(batch, exc)
            return
        except Exception:
            # A bug in one operation rolled back the whole batch: run each alone, so
            # only the faulty one fails.
            for op, future in batch:
                try:
                    (result,) = await asyncio.to_thread(self.store.transaction, [op])
                except Exception as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[Pending], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
