"""One dispatcher per (tunnel, destination): what is due, in arrival order, with its concurrency.

A dispatcher reads waiting deliveries from the store in batches (without bodies), and
starts an attempt for each while fewer than ``max_concurrency`` are in flight; it sleeps
until the next one is due, or until woken (a new event, an outcome, an agent). An
*early pass* (``deliver_early``: an agent connected, or reported its app up again) takes
every waiting delivery at once, in arrival order, whatever its schedule says, and stops
at the first failure at the destination (the app is still down: the rest wait for their
schedule or the next early pass).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .attempts import attempt_agent, attempt_url
from .concurrency import IDLE_FORGET, AdaptiveLimit
from .errors import StoreError
from .settings import TunnelSettings
from .states import Outcome
from .store import Delivery, Event, changed

if TYPE_CHECKING:
    from .delivery import Deliveries

log = logging.getLogger("relay.server")

#: Events fetched from the store per dispatcher query.
BATCH = 100
#: Seconds a dispatcher waits after its store query failed before it tries again.
STORE_RETRY = 5.0
#: Seconds a dispatcher sleeps after a whole pass started nothing although something was
#: due (all of it being recorded or just ended): never a busy loop, whatever the race.
IDLE_PASS_WAIT = 1.0


@dataclass
class _SlotWaiter:
    """One place in a dispatcher's line for delivery slots; ``woken`` is set on its turn."""

    woken: asyncio.Future[None]


class Dispatcher:
    """Delivers one tunnel's waiting events to one destination."""

    def __init__(self, deliveries: Deliveries, tunnel: str, destination: str) -> None:
        self.deliveries = deliveries
        self.tunnel = tunnel
        self.destination = destination
        #: Events being attempted now (each holds a delivery slot), by the dispatcher
        #: or inline by the ingress.
        self.in_flight: set[str] = set()
        #: Events whose inline attempt is over but whose outcome is still being written.
        self.recording: set[str] = set()
        #: While a batch is read and dispatched: its event ids, and those of them whose
        #: attempt ended meanwhile (the batch shows them due; they must not go again).
        #: Both are bounded by BATCH and emptied after each batch.
        self._batch: set[str] = set()
        self._reading = False
        self._ended: set[str] = set()
        self._wake = asyncio.Event()
        #: The tunnel's limit on attempts in flight (None: ``auto``, the adaptive limit's):
        #: from its settings when they change (``slots_changed``), or from the first
        #: ``take_slot``'s if none came before (a caller's copy may be older than a change).
        self.max_concurrency: int | None = None
        self._configured = False
        self.adaptive = AdaptiveLimit()
        #: When the last attempt in flight ended (monotonic seconds; None: one is in flight).
        self._idle_since: float | None = time.monotonic()
        #: Who waits for a delivery slot, first come first served (see take_slot).
        self._slot_line: collections.deque[_SlotWaiter] = collections.deque()
        self._early = False
        self._restart = False
        #: True while everything due is in flight: an ending attempt then wakes the loop.
        self._waiting_on_in_flight = False
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()
        if self.task is None or self.task.done():
            self.task = self.deliveries.tasks.loop(self._run, f"dispatcher {self.tunnel}/{self.destination}")

    def deliver_early(self) -> None:
        """Try everything waiting now, in arrival order (an agent came, or its app is back)."""
        self._early = True
        self._restart = True
        self.wake()

    @property
    def slots(self) -> int:
        """Attempts that may be in flight now: the tunnel's number, or the adaptive limit."""
        return self.adaptive.limit if self.max_concurrency is None else self.max_concurrency

    def idle_for_long(self) -> bool:
        """True if an ``auto`` limit will start anew with the next delivery: nothing was
        in flight for ``IDLE_FORGET`` seconds."""
        return (
            self.max_concurrency is None
            and self._idle_since is not None
            and time.monotonic() - self._idle_since > IDLE_FORGET
        )

    def has_slot(self) -> bool:
        return len(self.in_flight) < self.slots

    async def take_slot(self, event_id: str, settings: TunnelSettings, timeout: float | None) -> bool:
        """Take a delivery slot for ``event_id``, waiting up to ``timeout`` seconds (None:
        as long as it takes); False if none came.

        First come, first served: a freed slot goes to whoever has waited longest (inline
        attempts and this dispatcher's loop alike), and only they are woken. Without the
        line, every release woke every waiter and a newcomer could take the slot first:
        at 64 senders and 8 slots some webhooks waited seconds behind later ones.
        """
        if not self._configured:
            self._follow(settings)
        if not self.in_flight and self._idle_since is not None:
            if self.idle_for_long():
                self.adaptive = AdaptiveLimit()  # the burst is long over: measured anew
            self._idle_since = None
        if not self._slot_line and self.has_slot():
            self.in_flight.add(event_id)
            return True
        loop = asyncio.get_running_loop()
        waiter = _SlotWaiter(loop.create_future())
        self._slot_line.append(waiter)
        self.adaptive.held_back()
        taken = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await waiter.woken
                    if self.has_slot():
                        self.in_flight.add(event_id)
                        taken = True
                        return True
                    waiter.woken = loop.create_future()  # the limit went down: wait again, in place
        except TimeoutError:
            return False
        finally:
            self._slot_line.remove(waiter)
            if not taken and waiter.woken.done() and not waiter.woken.cancelled():
                self._wake_next()  # woken, then gone: the slot goes on down the line

    def release(self, event_id: str) -> None:
        """An attempt on ``event_id`` is over: free its slot."""
        self.in_flight.discard(event_id)
        if not self.in_flight:
            self._idle_since = time.monotonic()
        self._wake_next()
        self._ended_now(event_id)

    def slots_changed(self, settings: TunnelSettings) -> None:
        """The tunnel's settings changed: everyone waiting looks again (in line order)."""
        self._follow(settings)
        self._wake_all()

    def _follow(self, settings: TunnelSettings) -> None:
        """Take the tunnel's limit from ``settings`` (back to auto: learnt anew from the floor)."""
        if settings.max_concurrency is None and self.max_concurrency is not None:
            self.adaptive = AdaptiveLimit()
        self.max_concurrency = settings.max_concurrency
        self._configured = True

    def restart_slots(self) -> None:
        """An agent arrived, or the app is up again: an ``auto`` limit goes back to the
        floor, its fastest answer kept (concurrency.py)."""
        if self.max_concurrency is None:
            self.adaptive.restart()
            log.debug("%s/%s: delivery slots start again", self.tunnel, self.destination)

    def attempt_ended(self, outcome: Outcome) -> None:
        """An attempt here ended with ``outcome``: an ``auto`` limit learns from it (a
        slot it adds goes to whoever waits longest)."""
        if self.max_concurrency is not None:
            return  # a number the tunnel set: nothing to learn (answers at N say nothing of more)
        before = self.adaptive.limit
        if outcome.answered_in is not None and outcome.status is not None:
            if self.adaptive.answered(outcome.answered_in, outcome.status):
                self._wake_next()
        elif outcome.status is None and outcome.reached and not outcome.final:
            self.adaptive.restart()  # the app's failure (not the relay's, nor the request's)
        if self.adaptive.limit != before:
            log.debug("%s/%s: %d delivery slots", self.tunnel, self.destination, self.adaptive.limit)

    def _wake_all(self) -> None:
        for waiter in self._slot_line:
            if not waiter.woken.done():
                waiter.woken.set_result(None)

    def _wake_next(self) -> None:
        for waiter in self._slot_line:
            if not waiter.woken.done():
                waiter.woken.set_result(None)
                return

    def recorded(self, event_id: str) -> None:
        """The outcome of ``event_id``'s inline attempt is written (or kept to be written)."""
        self.recording.discard(event_id)
        self._ended_now(event_id)

    def _ended_now(self, event_id: str) -> None:
        if self._reading or event_id in self._batch:
            self._ended.add(event_id)
        if self._waiting_on_in_flight:
            self._wake.set()

    @property
    def label(self) -> str | None:
        return self.destination[len("agent:") :] if self.destination.startswith("agent:") else None

    def _busy(self, event: Event) -> bool:
        return (
            event.id in self.in_flight
            or event.id in self.recording
            or event.id in self._ended
            or self.deliveries.is_unrecorded(event.seq, self.destination)
        )

    async def _run(self) -> None:
        deliveries = self.deliveries
        store = deliveries.store
        cursor = 0
        started_in_pass = 0
        while True:
            # Cleared before anything is looked at, never when going to sleep: a wake-up that
            # comes while this pass reads the store (a webhook committed just after its
            # snapshot) then ends the sleep at once instead of being lost (found by a flaky
            # test under load: the webhook waited for the next one).
            self._wake.clear()
            # While outcomes cannot be written, attempt nothing new: each would be sent
            # again once the store is back, as a double.
            await deliveries.recording_ok.wait()
            settings = await deliveries.settings(self.tunnel)
            if self.label is not None and deliveries.registry.pick(self.tunnel, self.label) is None:
                self._early = False  # the agent's arrival starts the next early pass
                await self._sleep(None)
                continue
            if self._restart:
                cursor, started_in_pass, self._restart = 0, 0, False
            early = self._early
            self._reading, self._ended = True, set()
            try:
                # Without bodies: a batch waiting for slots must not hold 100 x 10 MiB.
                batch = await asyncio.to_thread(
                    store.due, self.tunnel, self.destination, math.inf if early else time.time(),
                    cursor, BATCH, False,
                )  # fmt: skip
            except StoreError as exc:
                deliveries.store_trouble(exc)
                batch = None
                await self._sleep(time.time() + STORE_RETRY)
            finally:
                self._reading = False
            if batch is None:  # (no ``continue`` in the ``except``: mypyc compiles none there)
                continue
            self._batch = {event.id for event, _ in batch}
            self._ended &= self._batch
            try:
                if not batch:
                    self._early = False
                    await self._idle(started_in_pass)
                    cursor, started_in_pass = 0, 0
                for event, delivery in batch:
                    if not self._busy(event):
                        await self.take_slot(event.id, settings, None)
                        if not deliveries.recording_ok.is_set():
                            self.release(event.id)
                            break
                        if early and not self._early:  # the app failed: the early pass is over
                            self.release(event.id)
                            self._restart = True
                            break
                        scheduled = (delivery.next_attempt_at or 0.0) <= time.time()
                        # The body is read here, in order: attempts then open their
                        # streams in arrival order (each in its own task, concurrently).
                        body = await self._body(event)
                        deliveries.tasks.spawn(
                            self._deliver(event, body, delivery, settings, scheduled),
                            f"delivery of {event.id}",
                        )
                        started_in_pass += 1
                    cursor = event.seq
            finally:
                self._batch, self._ended = set(), set()

    async def _idle(self, started_in_pass: int) -> None:
        """Nothing more is due in this pass: sleep until the next delivery is due, or woken."""
        try:
            next_at = await asyncio.to_thread(
                self.deliveries.store.next_due_at, self.tunnel, self.destination
            )
        except StoreError as exc:
            self.deliveries.store_trouble(exc)
            await self._sleep(time.time() + STORE_RETRY)
            return
        if next_at is not None and next_at <= time.time():
            if self.in_flight or self.recording:
                # All that is due is being attempted: wait for an attempt to end.
                self._waiting_on_in_flight = True
                try:
                    await self._sleep(None)
                finally:
                    self._waiting_on_in_flight = False
                return
            if not started_in_pass:
                await self._sleep(time.time() + IDLE_PASS_WAIT)
                return
        await self._sleep(next_at)

    async def _sleep(self, until: float | None) -> None:
        """Wait until ``until`` (None: until woken), or until woken since this pass began."""
        timeout = None if until is None else max(0.0, until - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _body(self, event: Event) -> bytes | None:
        """``event``'s body; None if the store cannot read it (the attempt then fails as
        not reached)."""
        try:
            return await asyncio.to_thread(self.deliveries.store.event_body, event.seq)
        except StoreError as exc:
            self.deliveries.store_trouble(exc)
            return None

    async def _deliver(
        self, event: Event, body: bytes | None, delivery: Delivery, settings: TunnelSettings, scheduled: bool
    ) -> None:
        deliveries = self.deliveries
        attempt = delivery.attempts + 1
        try:
            try:
                if body is None:
                    raise StoreError("the event's body could not be read")
                event = changed(event, body=body)
                if self.label is None:
                    outcome = await attempt_url(
                        deliveries.url_client(), self.destination, event, attempt, deliveries.config.timeout
                    )
                else:
                    outcome = await self._via_agent(event, attempt)
            except StoreError:
                outcome = Outcome(None, "the relay could not read the event", reached=False)
            except Exception as exc:  # a bug: count it as a failed attempt, so the schedule applies
                log.exception("delivery of %s to %s failed", event.id, self.destination)
                outcome = Outcome(None, f"relay error: {type(exc).__name__}")
            self.attempt_ended(outcome)
            if outcome.reached and (outcome.status is None or outcome.status in settings.retry_on):
                self._early = False  # the destination failed: the rest wait for their schedule
            await deliveries.record(event, delivery, outcome, settings, scheduled=scheduled)
        finally:
            self.release(event.id)

    async def _via_agent(self, event: Event, attempt: int) -> Outcome:
        assert self.label is not None
        session = self.deliveries.registry.pick(self.tunnel, self.label)
        if session is None:
            return Outcome(None, "no agent connected", reached=False)
        if session.user != event.user:  # the name changed hands: never another tenant's agent
            return Outcome(None, "the tunnel's name belongs to another user now", reached=False)
        outcome, exchange = await attempt_agent(session, event, attempt, self.deliveries.config.timeout)
        if exchange is not None:
            await exchange.drain(self.deliveries.config.timeout)
        return outcome
