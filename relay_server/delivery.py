"""Durable delivery: store-and-forward, retries, dead letters, replay and fan-out.

In ``queue`` mode a request with a body-carrying method and a body within the
queue limit becomes an *event*: committed to the store (group commit) before
anything is acknowledged, then delivered to each destination of its tunnel.
``Deliveries.accept`` is the ingress side (the first attempt is made inline, so
the sender gets the local service's own answer when it is up); a ``Dispatcher``
per (tunnel, destination) delivers what waits (``dispatcher.py``), one attempt at
a time is ``attempts.py``, and what an outcome does to a delivery is ``states.py``.

What this module guarantees, whatever fails:

- every delivery slot taken is given back (``try/finally``), so a failure can
  never leave webhooks answered 202 waiting for a slot that never comes;
- an outcome that cannot be written (disk full, I/O error) is kept in memory and
  written again later as a *record*, never sent again as a new delivery; while
  outcomes cannot be written, dispatchers start nothing new, and the store error
  is logged once per ``STORE_LOG_INTERVAL``;
- an event dies only by the clock: its schedule, or ``--max-age`` (the expiry
  sweep kills even an event no agent ever came for).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp
from aiohttp import web

from relay_protocol import RequestHead, ResponseHead
from relay_protocol.headers import without

from .attempts import EVENT_HEADERS, AgentExchange, attempt_agent
from .commits import GroupCommitter
from .concurrency import AUTO_MIN
from .config import QueueConfig
from .dispatcher import Dispatcher
from .errors import StoreError
from .expect import send_continue
from .public_errors import relay_error
from .registry import Registry
from .session import AgentSession, Stream
from .settings import ANY_AGENT, TunnelSettings
from .ssrf import url_client
from .states import Outcome, settle
from .store import NAME_RELEASED, Delivery, Event, Store, changed
from .tasks import Tasks

log = logging.getLogger("relay.server")

#: Methods whose requests become events in queue mode.
EVENT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Seconds between purges of events past their retention (and expiry of events past
#: their max age).
PURGE_INTERVAL = 60.0
#: Seconds a webhook waits for a free delivery slot to be tried at once (and get
#: the app's own answer) before it is queued (202): a short burst stays
#: transparent, a long one drains at the app's pace.
INLINE_SLOT_WAIT = 2.0
#: Seconds a webhook's commit waits for its first attempt's answer while other
#: webhooks' first attempts are in flight too: an answer within it is stored with the
#: event, in one write (no second write for the outcome, no background task to record
#: it), so a busy server commits each webhook once. Measured at 16 and 64 senders
#: (docs/performance.md): server CPU per webhook 0.39-0.41 -> 0.36 ms. A webhook alone
#: waits for nothing: its commit runs beside its attempt, and it gets the longer of
#: the two, not their sum. A slower app costs a busy sender at most this much more.
FIRST_OUTCOME_WAIT = 0.005
#: Seconds between two log lines about the same failing store: one line per interval,
#: with the count of failures it stands for, never a line per request.
STORE_LOG_INTERVAL = 30.0
#: Backoff between tries to write outcomes that could not be written: first, cap (seconds).
RERECORD_FIRST = 0.5
RERECORD_CAP = 30.0

WriteResponse = Callable[[AgentSession, Stream, ResponseHead], Awaitable[web.StreamResponse]]


class _BodyRefused(Exception):
    """A webhook's body was not taken; ``response`` says why (nothing was stored)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


def _busy() -> web.Response:
    response = relay_error(
        "server-busy", "the relay is receiving too many webhooks at once; retry later", **{"Retry-After": "5"}
    )
    response.force_close()  # the body is not read: do not drain it either
    return response


class BodyBudget:
    """Bytes of webhook bodies held in memory, server-wide (``QueueConfig.body_budget``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) if that would pass the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class _Held:
    """The bytes of the body budget one webhook holds (``Deliveries.accept`` gives them back)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = 0


def new_event_id() -> str:
    # Sortable by time (milliseconds), unique by 48 random bits.
    return f"evt_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


class StoreTrouble:
    """Logs a failing store once per ``STORE_LOG_INTERVAL``, with how many failures it stands for."""

    def __init__(self) -> None:
        self._last = -STORE_LOG_INTERVAL
        self._since = 0

    def __call__(self, exc: StoreError) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last >= STORE_LOG_INTERVAL:
            more = (
                f" ({self._since - 1} more store failures since the last report)" if self._since > 1 else ""
            )
            log.error("store: %s%s", exc, more)
            self._last, self._since = now, 0


class Deliveries:
    """Events in, deliveries out. One per server application."""

    def __init__(
        self, *, store: Store, commits: GroupCommitter, registry: Registry, config: QueueConfig
    ) -> None:
        self.store = store
        self.commits = commits
        self.registry = registry
        self.config = config
        self.tasks = Tasks("deliveries")
        self.bodies = BodyBudget(config.body_budget)
        self.store_trouble = StoreTrouble()
        #: Set while outcomes can be written; dispatchers wait on it.
        self.recording_ok = asyncio.Event()
        self.recording_ok.set()
        self._dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self._settings: dict[str, TunnelSettings] = {}
        self._pending: dict[str, list[int]] = {}  # tunnel -> [events, bytes] not yet finished
        #: Outcomes not written yet, by (event seq, destination): written again as records.
        self._unrecorded: dict[tuple[int, str], tuple[Event, Delivery]] = {}
        self._rerecording: asyncio.Task[None] | None = None
        #: First attempts made by the ingress (a sender waits) in flight, server-wide.
        self._first_attempts = 0
        self._http: aiohttp.ClientSession | None = None
        #: Told of every attempt's outcome once written, and of deliveries dead of old age.
        self.on_recorded: Callable[[Delivery], None] = lambda delivery: None
        self.on_expired: Callable[[int], None] = lambda count: None
        registry.on_connect.append(self._agent_arrived)
        registry.on_target_up.append(self._agent_arrived)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        totals = await asyncio.to_thread(self.store.pending_totals)
        self._pending = {tunnel: [events, size] for tunnel, (events, size) in totals.items()}
        for tunnel, destination in await asyncio.to_thread(self.store.pending_destinations):
            self.dispatcher(tunnel, destination).wake()
        self.tasks.loop(self._maintain, "purge and expiry")

    async def stop(self) -> None:
        await self.tasks.stop()
        if self._http is not None:
            await self._http.close()

    def url_client(self) -> aiohttp.ClientSession:
        """The one client session for URL destinations, made on first use."""
        if self._http is None:
            self._http = url_client(self.config.allow_private)
        return self._http

    async def _maintain(self) -> None:
        """Purge finished events past their retention; kill waiting ones past their max age."""
        while True:
            now = time.time()
            try:
                purged = await asyncio.to_thread(self.store.purge, now - self.config.retention)
                expired = await asyncio.to_thread(
                    self.store.expire, now - self.config.policy.max_age, "not delivered within the max age"
                )
                # Counted again from the store: the in-memory quota counts can never drift
                # for longer than one interval, whatever failed in between. The read goes
                # through the group commit and replaces the counts right when its batch is
                # committed: every write before it in the batch is in the read and was
                # counted just before, every write after it is counted just after.
                await self.recount()
            except StoreError as exc:
                self.store_trouble(exc)
            else:
                if expired:
                    self.on_expired(expired)
                if purged or expired:
                    log.info("purged %d events past their retention, %d expired", purged, expired)
            interval = min(self.config.retention, self.config.policy.max_age) / 4
            await asyncio.sleep(min(PURGE_INTERVAL, max(1.0, interval)))

    # -- settings --------------------------------------------------------------------

    async def settings(self, tunnel: str) -> TunnelSettings:
        cached = self._settings.get(tunnel)
        if cached is None:
            cached = TunnelSettings.from_json(await asyncio.to_thread(self.store.tunnel_settings, tunnel))
            self._settings[tunnel] = cached
        return cached

    async def save_settings(self, tunnel: str, user: str, settings: TunnelSettings) -> None:
        await asyncio.to_thread(self.store.save_tunnel_settings, tunnel, user, settings.to_json())
        self._settings[tunnel] = settings
        for (name, _), dispatcher in self._dispatchers.items():
            if name == tunnel:
                dispatcher.slots_changed(settings)
        self._wake_dispatchers(tunnel, settings)

    def forget_tunnel(self, tunnel: str) -> None:
        """``tunnel``'s name changed hands (the admin released it, or another user claimed
        it since): drop its cached settings, quota counts and dispatchers, so nothing of
        the previous owner (destinations, mode) applies to the next one. Attempts in
        flight end on their own; the registry gives them no agent of the new owner."""
        self._settings.pop(tunnel, None)
        self._pending.pop(tunnel, None)
        for key in [k for k in self._dispatchers if k[0] == tunnel]:
            task = self._dispatchers.pop(key).task
            if task is not None:
                task.cancel()

    def dispatcher(self, tunnel: str, destination: str) -> Dispatcher:
        key = (tunnel, destination)
        if key not in self._dispatchers:
            self._dispatchers[key] = dispatcher = Dispatcher(self, tunnel, destination)
            if (settings := self._settings.get(tunnel)) is not None:
                dispatcher.slots_changed(settings)  # the newest, not a caller's older copy
        return self._dispatchers[key]

    def slots(self, tunnel: str, settings: TunnelSettings) -> dict[str, int]:
        """Deliveries each of ``tunnel``'s destinations may have in flight now: its set
        number, or where ``auto`` stands (AUTO_MIN before its first delivery, and when the
        next one starts it anew after a long idle time)."""
        return {
            destination: (
                dispatcher.slots
                if (dispatcher := self._dispatchers.get((tunnel, destination))) is not None
                and dispatcher.max_concurrency == settings.max_concurrency
                and not dispatcher.idle_for_long()
                else settings.max_concurrency or AUTO_MIN
            )
            for destination in settings.destinations
        }

    def _agent_arrived(self, session: AgentSession) -> None:
        """An agent connected, or told us its app answers again: what waits for it goes now."""
        for name in session.names:
            for destination in (ANY_AGENT, f"agent:{session.label}"):
                if (dispatcher := self._dispatchers.get((name, destination))) is not None:
                    dispatcher.restart_slots()  # another agent, or the app restarted
                    dispatcher.deliver_early()

    # -- the ingress side ----------------------------------------------------------

    def is_event(self, request: web.Request, settings: TunnelSettings, upgrade: bool) -> bool:
        if settings.mode != "queue" or upgrade or request.method not in EVENT_METHODS:
            return False
        return request.content_length is None or request.content_length <= self.config.max_body

    async def accept(
        self,
        request: web.Request,
        tunnel: str,
        user: str,
        head: RequestHead,
        settings: TunnelSettings,
        write_response: WriteResponse,
    ) -> web.StreamResponse | bytes:
        """Take a request as an event. Returns the response to send, or the body bytes
        read so far if the body turned out larger than the queue limit (go live).

        Before a byte is read: the tunnel's quota (when Content-Length is known) and the
        server's body budget; while reading: ``body_timeout`` for the whole body."""
        length = request.content_length
        if full := self._queue_full(tunnel, length or 0):
            return full
        held = _Held()
        try:  # the budget goes back however this ends: answered, refused, the sender gone
            if length is not None:
                if not self.bodies.take(length):
                    return _busy()
                held.size = length
            await send_continue(request)  # a refusal above went without the body sent
            try:
                body = await self._read_body(request, held)
            except _BodyRefused as refused:
                return refused.response
            return await self._accept_body(request, tunnel, user, head, settings, write_response, body)
        finally:
            self.bodies.give(held.size)

    async def _read_body(self, request: web.Request, held: _Held) -> bytes:
        """The body (at most ``max_body`` + 1 bytes). Without a Content-Length, each chunk
        is taken from the budget as it comes, into ``held``. Raises ``_BodyRefused`` when
        the sender is too slow or, without a Content-Length, the budget runs out; whatever
        else the sender's connection raises (it went away) passes through."""
        unknown_length = request.content_length is None
        if not unknown_length and request.content.is_eof():
            # Read whole with its head, as a webhook's body is as a rule (and it is within
            # max_body, taken from the budget): no timer, no wait.
            return request.content.read_nowait()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout):
                while size <= self.config.max_body and (
                    chunk := await request.content.read(self.config.max_body + 1 - size)
                ):
                    if unknown_length:
                        if not self.bodies.take(len(chunk)):
                            raise _BodyRefused(_busy())
                        held.size += len(chunk)
                    chunks.append(chunk)
                    size += len(chunk)
        except TimeoutError:
            response = relay_error(
                "body-timeout", f"the request body did not arrive within {self.config.body_timeout:g}s"
            )
            response.force_close()  # the rest of the body is not read
            raise _BodyRefused(response) from None
        return b"".join(chunks)

    async def _accept_body(
        self,
        request: web.Request,
        tunnel: str,
        user: str,
        head: RequestHead,
        settings: TunnelSettings,
        write_response: WriteResponse,
        body: bytes,
    ) -> web.StreamResponse | bytes:
        if len(body) > self.config.max_body:
            return body
        if full := self._queue_full(tunnel, len(body)):
            return full
        now = time.time()
        event = Event(
            0,
            new_event_id(),
            tunnel,
            user,
            now,
            head.method,
            head.target,
            without(head.headers, *EVENT_HEADERS),
            head.client,
            body,
        )
        session = None if settings.fan_out else self.registry.pick(tunnel)
        dispatcher = self.dispatcher(tunnel, ANY_AGENT)
        # A burst: the app gets at most max_concurrency at once, the rest wait.
        slot = session is not None and await dispatcher.take_slot(event.id, settings, INLINE_SLOT_WAIT)
        handed_over = False
        try:
            # With an agent at hand the first attempt is made here; the lease keeps
            # the dispatcher off it until the attempt is over (or the server died).
            lease = now + self.config.timeout + 30 if slot else now
            deliveries = [Delivery(0, tunnel, d, "pending", 0, lease) for d in settings.destinations]
            # The first attempt's delivery as its outcome is settled: due now (the lease is
            # no schedule: an attempt that never reached the app goes again a second later).
            first = Delivery(0, tunnel, settings.destinations[0], "pending", 0, now)
            # The first attempt starts before the event is committed: the sender waits
            # for the longer of the fsync and the app, not for their sum (or, when other
            # webhooks are in flight, for the app and then one write of both: see
            # FIRST_OUTCOME_WAIT). Nothing is answered before the commit (never a 2xx
            # for a webhook not stored); if it fails, the attempt is cut short and the
            # sender gets 503 (and retries: the app may then see it twice, as webhooks
            # are delivered at least once).
            attempt = None
            stored = None  # the first attempt's outcome, when it is stored with the event
            if slot:
                assert session is not None
                attempt = self._first_attempt_started(session, event, dispatcher)
                if self._first_attempts > 1:
                    try:
                        await asyncio.wait((attempt,), timeout=FIRST_OUTCOME_WAIT)
                    except asyncio.CancelledError:  # the sender left: stored all the same
                        handed_over = True
                        commit = self._submit_event(event, deliveries, None)
                        left = self._abandoned_before_commit(
                            commit, attempt, event, first, settings, dispatcher, None
                        )
                        self.tasks.spawn(left, f"webhook {event.id} whose sender left")
                        raise
                stored = self._answered(attempt, event, first, settings)
                if stored is not None:
                    deliveries = [stored]
            commit = self._submit_event(event, deliveries, stored)
            try:
                seq = await asyncio.shield(commit)
            except asyncio.CancelledError:
                # The sender left: its webhook is stored all the same, and delivered.
                if attempt is not None:  # the attempt's outcome is recorded once stored
                    handed_over = True
                    left = self._abandoned_before_commit(
                        commit, attempt, event, first, settings, dispatcher, stored
                    )
                else:  # the dispatchers are told once it is stored
                    left = self._queued_after_leaving(commit, event, settings)
                self.tasks.spawn(left, f"webhook {event.id} whose sender left")
                raise
            except Exception as exc:  # not stored: a failing store (503), or a bug (500)
                if attempt is not None:  # in a task: a sender leaving now cannot stop it halfway
                    await asyncio.shield(self.tasks.spawn(_cut_short(attempt), f"unstored {event.id}"))
                if not isinstance(exc, StoreError):
                    raise exc  # named: compiled by mypyc, a bare raise after an await crashed
                self.store_trouble(exc)
                return relay_error(
                    "store-unavailable", "the relay cannot store this request now; retry later"
                )
            event = changed(event, seq=seq)
            if attempt is None:
                self._wake_dispatchers(tunnel, settings)
                return self._queued(event)
            handed_over = True  # the first attempt owns the slot from here
            delivery = changed(stored or first, event_seq=seq)
            return await self._first_attempt(
                attempt, event, delivery, settings, write_response, stored=stored is not None
            )
        finally:
            if slot and not handed_over:
                dispatcher.release(event.id)

    def _first_attempt_started(
        self, session: AgentSession, event: Event, dispatcher: Dispatcher
    ) -> asyncio.Future[tuple[Outcome, AgentExchange | None]]:
        """Start the ingress's attempt of ``event`` (counted in ``_first_attempts`` until it
        ends; its outcome goes to ``dispatcher``'s slots)."""
        attempt = asyncio.ensure_future(attempt_agent(session, event, 1, self.config.timeout))
        self._first_attempts += 1
        attempt.add_done_callback(partial(self._first_attempt_ended, dispatcher))
        return attempt

    def _first_attempt_ended(
        self, dispatcher: Dispatcher, attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]]
    ) -> None:
        self._first_attempts -= 1
        if not attempt.cancelled() and attempt.exception() is None:
            dispatcher.attempt_ended(attempt.result()[0])

    def _answered(
        self,
        attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]] | None,
        event: Event,
        delivery: Delivery,
        settings: TunnelSettings,
    ) -> Delivery | None:
        """``delivery`` after the first attempt, if that attempt is over already (to be
        stored with the event), else None."""
        if attempt is None or not attempt.done() or attempt.cancelled() or attempt.exception() is not None:
            return None
        outcome, _ = attempt.result()
        return self._settled(event, delivery, outcome, settings, scheduled=True)

    def _submit_event(
        self, event: Event, deliveries: list[Delivery], stored: Delivery | None
    ) -> asyncio.Future[int]:
        """Queue ``event`` and its ``deliveries`` for the next group commit; it is counted
        in its tunnel's quota the moment it is committed (in the order of the writes),
        unless it is stored already finished (``stored``: its first attempt's outcome)."""
        counted = stored is None or stored.waiting
        return self.commits.submit(
            Store.insert_event_op(event, deliveries),
            lambda _: self._count(event.tunnel, 1, len(event.body)) if counted else None,
            size=len(event.body),  # and a head of at most MAX_HEAD_SIZE
        )

    def _wake_dispatchers(self, tunnel: str, settings: TunnelSettings) -> None:
        for destination in settings.destinations:
            self.dispatcher(tunnel, destination).wake()

    async def _queued_after_leaving(
        self, commit: asyncio.Future[int], event: Event, settings: TunnelSettings
    ) -> None:
        """The sender of a webhook queued without an inline attempt left while it was
        being committed: once it is stored, wake its dispatchers (or they
        would find it only at their next pass, which for an idle one is the next webhook)."""
        try:
            await commit
        except StoreError as exc:  # not stored, and nobody left to tell
            self.store_trouble(exc)
            return
        self._wake_dispatchers(event.tunnel, settings)

    def _queue_full(self, tunnel: str, size: int) -> web.Response | None:
        """429 if one more event of ``size`` bytes would pass the tunnel's quota."""
        pending = self._pending.setdefault(tunnel, [0, 0])
        if pending[0] < self.config.quota_events and pending[1] + size <= self.config.quota_bytes:
            return None
        return relay_error(
            "too-many-requests", f"the queue of {tunnel!r} is full; try again later", **{"Retry-After": "60"}
        )

    def _queued(self, event: Event) -> web.Response:
        response = web.json_response({"queued": True, "event": event.id}, status=202)
        response.headers["X-Relay-Event"] = event.id
        return response

    async def _first_attempt(
        self,
        attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]],
        event: Event,
        delivery: Delivery,
        settings: TunnelSettings,
        write_response: WriteResponse,
        *,
        stored: bool,
    ) -> web.StreamResponse:
        """The inline attempt (started, its event committed): the app's own answer goes
        back to the sender, or 202. ``stored``: its outcome was committed with the event
        (``delivery`` is then the delivery after it)."""
        dispatcher = self.dispatcher(event.tunnel, delivery.destination)
        owns_slot = True
        try:
            try:
                # Shielded: a sender that gives up (its handler is cancelled) does not
                # cancel the attempt; its outcome is recorded all the same.
                outcome, exchange = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                owns_slot = False
                self.tasks.spawn(
                    self._abandoned(attempt, event, delivery, settings, dispatcher, stored=stored),
                    f"abandoned attempt of {event.id}",
                )
                raise
            if stored:
                self._recorded(event, delivery)
            else:
                # Recorded in the background: the event is already durable; until the
                # record is written the dispatcher leaves the event alone.
                dispatcher.recording.add(event.id)
                self.tasks.spawn(
                    self._record_inline(event, delivery, outcome, settings, dispatcher),
                    f"record of {event.id}",
                )
            if exchange is None or exchange.head.status in settings.retry_on:
                if exchange is not None:
                    await exchange.finish()
                return self._queued(event)  # durable when down: the relay retries
            # Transparent when up: the sender gets the local service's own answer.
            try:
                return await write_response(exchange.session, exchange.stream, exchange.head)
            finally:
                await exchange.finish()
        finally:
            if owns_slot:
                dispatcher.release(event.id)

    async def _record_inline(
        self,
        event: Event,
        delivery: Delivery,
        outcome: Outcome,
        settings: TunnelSettings,
        dispatcher: Dispatcher,
    ) -> None:
        try:
            await self.record(event, delivery, outcome, settings, scheduled=True, soon=True)
        finally:
            dispatcher.recorded(event.id)

    async def _abandoned_before_commit(
        self,
        commit: asyncio.Future[int],
        attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]],
        event: Event,
        delivery: Delivery,
        settings: TunnelSettings,
        dispatcher: Dispatcher,
        stored: Delivery | None,
    ) -> None:
        """The sender left while its webhook was being committed (or before): once it is
        stored, finish the attempt as ``_abandoned`` does; if it could not be stored, cut
        it short. ``stored``: the delivery after the attempt, committed with the event."""
        try:
            seq = await commit
        except StoreError as exc:
            await _cut_short(attempt)
            dispatcher.release(event.id)
            self.store_trouble(exc)
            return
        event = changed(event, seq=seq)
        delivery = changed(stored or delivery, event_seq=seq)
        await self._abandoned(attempt, event, delivery, settings, dispatcher, stored=stored is not None)

    async def _abandoned(
        self,
        attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]],
        event: Event,
        delivery: Delivery,
        settings: TunnelSettings,
        dispatcher: Dispatcher,
        *,
        stored: bool,
    ) -> None:
        """Finish an inline attempt whose sender went away: record what the app said
        (``stored``: it is already, and ``delivery`` is the delivery after it)."""
        try:
            outcome, exchange = await attempt
            if stored:
                self._recorded(event, delivery)
            if exchange is not None:
                await exchange.drain(self.config.timeout)
            if not stored:
                await self.record(event, delivery, outcome, settings, scheduled=True)
        finally:
            dispatcher.release(event.id)

    # -- outcomes ----------------------------------------------------------------------

    async def record(
        self,
        event: Event,
        delivery: Delivery,
        outcome: Outcome,
        settings: TunnelSettings,
        *,
        scheduled: bool,
        soon: bool = False,
    ) -> Delivery:
        """Store what an attempt found; returns the delivery's new state.

        Never raises ``StoreError``: an outcome that cannot be written now is kept and
        written later (``is_unrecorded`` tells dispatchers to leave it alone meanwhile).
        ``soon``: the write may wait ``commits.SOON`` for a commit to share (an inline
        attempt's, whose slot is already free).
        """
        updated = self._settled(event, delivery, outcome, settings, scheduled=scheduled)
        try:
            write = self.commits.write_soon if soon else self.commits.write
            await write(
                Store.update_delivery_op(updated),
                lambda waiting: self._count_if_finished(event, waiting),
                size=0,
            )
        except StoreError as exc:
            self.store_trouble(exc)
            self._unrecorded[event.seq, delivery.destination] = (event, updated)
            self.recording_ok.clear()
            if self._rerecording is None or self._rerecording.done():
                self._rerecording = self.tasks.loop(self._rerecord, "writing outcomes again")
            return updated
        self._recorded(event, updated)
        return updated

    def _settled(
        self, event: Event, delivery: Delivery, outcome: Outcome, settings: TunnelSettings, *, scheduled: bool
    ) -> Delivery:
        """``delivery`` after an attempt of ``event`` ended with ``outcome`` (``states.settle``)."""
        updated = settle(
            delivery,
            outcome,
            scheduled=scheduled,
            policy=self.config.policy,
            retry_on=settings.retry_on,
            since=delivery.since or event.received_at,
            now=time.time(),
        )
        if updated.waiting and self.registry.owner_changed(event.tunnel, event.user):
            # The name was released while this attempt ran: never a retry for a new owner.
            updated = changed(updated, status="dead", dead_reason=NAME_RELEASED, next_attempt_at=None)
        return updated

    def _recorded(self, event: Event, updated: Delivery) -> None:
        """An outcome of ``event`` is stored: tell the metrics, wake its dispatcher if
        it still waits, and log it (at DEBUG when delivered: nothing per request)."""
        self.on_recorded(updated)
        if updated.waiting:  # its dispatcher may be asleep until a later time: let it see it
            self.dispatcher(event.tunnel, updated.destination).wake()
        log.log(
            logging.DEBUG if updated.status == "delivered" else logging.INFO,
            "event %s -> %s: attempt %d %s (%s)",
            event.id,
            updated.destination,
            updated.attempts,
            updated.status,
            updated.last_status or updated.last_error or updated.dead_reason,
        )

    def is_unrecorded(self, event_seq: int, destination: str) -> bool:
        return (event_seq, destination) in self._unrecorded

    async def _rerecord(self) -> None:
        """Write the kept outcomes, with backoff, until the store takes them; then resume."""
        delay = RERECORD_FIRST
        while self._unrecorded:
            await asyncio.sleep(delay)
            kept = dict(self._unrecorded)
            ops = [Store.update_delivery_op(updated) for _, updated in kept.values()]

            def write_all(
                db: sqlite3.Connection, ops: list[Callable[[sqlite3.Connection], bool]] = ops
            ) -> list[bool]:
                return [op(db) for op in ops]

            events = [event for event, _ in kept.values()]
            try:
                await self.commits.write(write_all, partial(self._counted_if_finished, events))
            except StoreError as exc:
                self.store_trouble(exc)
                delay = min(delay * 2, RERECORD_CAP)
                continue
            for key, (event, updated) in kept.items():
                if self._unrecorded.get(key, (None, None))[1] is updated:
                    del self._unrecorded[key]
                self._recorded(event, updated)
            log.info("store: %d outcomes written after the store recovered", len(kept))
        self.recording_ok.set()
        for dispatcher in self._dispatchers.values():
            dispatcher.wake()

    def waiting(self, tunnel: str) -> int:
        """Events of ``tunnel`` waiting for delivery (the count its quota checks)."""
        return self._pending.get(tunnel, [0, 0])[0]

    def _count(self, tunnel: str, events: int, size: int) -> None:
        """Add to ``tunnel``'s count of waiting events and bytes (never below zero)."""
        pending = self._pending.setdefault(tunnel, [0, 0])
        pending[0] = max(0, pending[0] + events)
        pending[1] = max(0, pending[1] + size)

    async def recount(self) -> None:
        """Count every tunnel's waiting events and bytes again from the store."""
        await self.commits.write(Store.pending_totals_op(), self._recounted)

    def _count_back(self, event: Event, came_back: bool) -> None:
        """A replay of ``event`` is committed: counted again if nothing of it waited
        (``came_back``: ``Store.replay_op``)."""
        if came_back:
            self._count(event.tunnel, 1, len(event.body))

    def _recounted(self, totals: dict[str, tuple[int, int]]) -> None:
        self._pending = {tunnel: [events, size] for tunnel, (events, size) in totals.items()}

    def _counted_if_finished(self, events: list[Event], still_waiting: list[bool]) -> None:
        for event, waiting in zip(events, still_waiting, strict=True):
            self._count_if_finished(event, waiting)

    def _count_if_finished(self, event: Event, still_waiting: bool) -> None:
        """An outcome of ``event`` is committed: out of its tunnel's quota once no
        destination waits for it (``still_waiting``: ``Store.update_delivery_op``)."""
        if not still_waiting:
            self._count(event.tunnel, -1, -len(event.body))

    def in_flight(self, event: Event, deliveries: list[Delivery]) -> bool:
        """True while an attempt of ``event`` runs or its outcome is being written."""
        for delivery in deliveries:
            dispatcher = self._dispatchers.get((event.tunnel, delivery.destination))
            if dispatcher is not None and event.id in dispatcher.in_flight | dispatcher.recording:
                return True
            if self.is_unrecorded(event.seq, delivery.destination):
                return True
        return False

    async def replay(self, event: Event, deliveries: list[Delivery]) -> list[str]:
        """Queue ``event`` again at each destination (same id, next attempt number, a
        fresh schedule and max age). The caller checks ``in_flight`` first: an attempt
        still running would overwrite the replay when it records its outcome."""
        now = time.time()
        for delivery in deliveries:
            pending = changed(
                delivery, status="pending", next_attempt_at=now, failures=0, dead_reason=None, since=now
            )
            # Back in the quota with the write that finds nothing of it waiting.
            await self.commits.write(Store.replay_op(pending), partial(self._count_back, event), size=0)
            self.dispatcher(event.tunnel, delivery.destination).wake()
        return [d.destination for d in deliveries]


async def _cut_short(attempt: asyncio.Future[tuple[Outcome, AgentExchange | None]]) -> None:
    """End a first attempt whose event could not be stored: cancelled if it still runs,
    its stream finished if the app answered already (no answer goes back from it)."""
    attempt.cancel()
    await asyncio.wait([attempt])  # not gather: it gives a list, which mypyc's tuple refuses
    if attempt.cancelled() or attempt.exception() is not None:
        return
    _, exchange = attempt.result()
    if exchange is not None:
        await exchange.finish()
