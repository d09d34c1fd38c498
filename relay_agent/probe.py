"""Watching a local service that refused a forwarded request, until it accepts connections again.

When forwarding fails because the target is unreachable, ``TargetProbe`` tries a
plain TCP connect about once a second; the first that succeeds calls ``on_up``
(the tunnel then sends TARGET_UP, so the server delivers what waits for the app
at once instead of at its next retry) and the probing stops until the next
unreachable failure. At most one probe task runs per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .pool import addresses

log = logging.getLogger("relay.agent")

#: Seconds between two connect attempts: a webhook waits about a second past
#: the app's return, and one local connect a second costs nothing.
PROBE_INTERVAL = 1.0
#: Seconds one connect attempt may take: a local service that does not accept
#: within that is not back yet (a firewall dropping SYNs would hang it longer).
PROBE_CONNECT_TIMEOUT = 1.0


async def reachable(host: str, port: int, timeout: float = PROBE_CONNECT_TIMEOUT) -> bool:
    """True if a TCP connection to one of the addresses of ``host:port`` (as forwarding
    tries them: ``pool.addresses``) opens within ``timeout``; it is closed at once."""
    try:
        async with asyncio.timeout(timeout):
            for address, port_ in await addresses(host, port):
                try:
                    _, writer = await asyncio.open_connection(address, port_)
                except OSError:
                    continue
                writer.close()
                return True
    except (OSError, TimeoutError):
        pass
    return False


class TargetProbe:
    """One supervised task probing ``host:port`` until it answers, then ``on_up()``."""

    def __init__(self, host: str, port: int, on_up: Callable[[], None]) -> None:
        self.host = host
        self.port = port
        self.on_up = on_up
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start probing, unless a probe already runs. Call from the event loop."""
        if self.running:
            return
        self._task = asyncio.create_task(self._watch(), name=f"probe {self.host}:{self.port}")
        self._task.add_done_callback(self._finished)

    async def stop(self) -> None:
        """Cancel the probe (the agent is stopping) and wait for it to end."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        where = f"{self.host}:{self.port}"
        log.info("local service %s unreachable: probing it every %gs", where, PROBE_INTERVAL)
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            if await reachable(self.host, self.port):
                break
        log.info("local service %s accepts connections again", where)
        self.on_up()

    def _finished(self, task: asyncio.Task[None]) -> None:
        # A probe that died of a bug must say so, not leave the agent silently unprobed.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("target probe failed", exc_info=exc)
