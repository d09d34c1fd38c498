"""Background tasks of the agent's inspector and console, supervised.

Every task started here has its exception retrieved and logged (a bug in a redraw or a
replay must say so, not vanish with the task), and ``stop`` cancels and awaits them all
when the agent stops, so that none outlives the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("relay.agent")


class Background:
    """The tasks one part of the agent runs beside the tunnel."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task until it ends or ``stop``. Call from the event loop."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    async def stop(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        # Their exceptions, if any, are logged by _finished: gather only waits.
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)
