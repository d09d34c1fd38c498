"""Group commit: many writes from the event loop, one transaction and one fsync.

Callers ``await commits.write(op)``; a single worker takes every operation
waiting at that moment, runs them in one ``Store.transaction`` in a thread, and
answers them all. Under load a commit carries hundreds of events; alone, a
write waits for one fsync as it would anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import StoreError
from .store import Store

T = TypeVar("T")

#: Most operations in one transaction: bounds how long one commit holds the
#: writer lock (and the latency of the first caller in a long queue).
MAX_BATCH = 1000


class GroupCommitter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Commit what is waiting, then stop."""
        if self._task is not None:
            while self._pending:
                await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` in the next group commit; returns once it is durable.

        Raises ``StoreError`` if the commit failed (nothing of it was written).
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._ready.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    results = await asyncio.to_thread(self.store.transaction, [op for op, _ in batch])
                except StoreError as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
