"""Background tasks that are never silently dead: supervised loops and tracked one-offs.

``Tasks.spawn`` runs a one-off coroutine (recording an outcome, finishing an abandoned
attempt): it is kept until done, and its exception is retrieved and logged. ``Tasks.loop``
runs a long-lived loop (a dispatcher, the group committer): an unexpected exception is
logged and the loop started again after a backoff (1 s doubling to 30 s), so a store
error or a bug never leaves a task dead with webhooks waiting behind it. ``stop`` cancels
everything and waits a bounded time: it cannot hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("relay.server")

#: Backoff before a crashed loop runs again: first delay and cap (seconds).
RESTART_FIRST = 1.0
RESTART_CAP = 30.0
#: Seconds ``stop`` waits for cancelled tasks to end: a task stuck in a worker thread
#: (a SQLite call cannot be interrupted) must not hold up shutdown for ever.
STOP_WAIT = 10.0


class Tasks:
    """The background tasks of one component; ``stop()`` ends them all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; an exception it raises is logged with ``what``."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))
        return task

    def loop(self, body: Callable[[], Awaitable[None]], what: str) -> asyncio.Task[None]:
        """Run ``body()`` until it returns; restart it with backoff whenever it raises."""
        return self.spawn(self._supervise(body, what), what)

    async def _supervise(self, body: Callable[[], Awaitable[None]], what: str) -> None:
        delay = RESTART_FIRST
        while True:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: %s failed; restarting it in %gs", self.name, what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_CAP)

    def _done(self, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: never "Task exception was never retrieved"
        if exc is not None:
            log.error("%s: %s failed", self.name, what, exc_info=exc)

    async def stop(self) -> None:
        """Cancel every task and wait for them, at most ``STOP_WAIT`` seconds."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT)
            if stuck:
                log.warning("%s: %d tasks did not stop within %gs", self.name, len(stuck), STOP_WAIT)
