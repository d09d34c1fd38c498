"""Durable delivery: store-and-forward, retries, dead letters, replay and fan-out.

In ``queue`` mode a request with a body-carrying method and a body within the
queue limit becomes an *event*: committed to the store (group commit) before
anything is acknowledged, then delivered to each destination of its tunnel.
``Deliveries.accept`` is the ingress side (the first attempt is made inline, so
the sender gets the local service's own answer when it is up); a
``Dispatcher`` per (tunnel, destination) delivers what is pending, at most
``max_concurrency`` at a time, in arrival order, with retries on a schedule.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from relay_protocol import RequestHead, ResponseHead
from relay_protocol.headers import header_value, strip_hop_by_hop, without

from .commits import GroupCommitter
from .errors import StoreError
from .public_errors import relay_error
from .registry import Registry
from .retry import RetryPolicy, next_attempt_at, parse_retry_after
from .session import AgentSession, Stream, StreamFailed
from .settings import ANY_AGENT, TunnelSettings
from .store import Delivery, Event, Store

log = logging.getLogger("relay.server")

#: Methods whose requests become events in queue mode.
EVENT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Events fetched from the store per dispatcher query.
BATCH = 100
#: Seconds between purges of events past their retention.
PURGE_INTERVAL = 60.0
#: Seconds a webhook waits for a free delivery slot to be tried at once (and get
#: the app's own answer) before it is queued (202): a short burst stays
#: transparent, a long one drains at the app's pace.
INLINE_SLOT_WAIT = 2.0
#: Headers every delivery carries; the client's own values under these names are dropped.
EVENT_HEADERS = (b"x-relay-event-id", b"x-relay-attempt", b"x-relay-received-at")


@dataclass(frozen=True)
class QueueConfig:
    #: Largest body that becomes an event; larger requests stay live (10 MiB).
    max_body: int = 10 * 1024 * 1024
    #: Per tunnel: most events, and most body bytes, waiting for delivery.
    quota_events: int = 100_000
    quota_bytes: int = 1024 * 1024 * 1024
    #: Seconds finished (delivered or dead) events are kept for inspection and replay.
    retention: float = 7 * 86400.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: Seconds to wait for a destination's response head.
    timeout: float = 30.0
    #: URL destinations may resolve to loopback, private or link-local addresses.
    allow_private: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one attempt found: the destination's status, or the error that kept it from answering."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None


def new_event_id() -> str:
    # Sortable by time (milliseconds), unique by 48 random bits.
    return f"evt_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


def received_at_text(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delivery_head(event: Event, attempt: int) -> RequestHead:
    """The stored request, unchanged, plus the three X-Relay-* headers of this attempt."""
    headers = (
        *without(event.headers, *EVENT_HEADERS),
        (b"X-Relay-Event-Id", event.id.encode()),
        (b"X-Relay-Attempt", str(attempt).encode()),
        (b"X-Relay-Received-At", received_at_text(event.received_at).encode()),
    )
    return RequestHead(event.method, event.target, headers, event.client, event.id)


class PrivateAddress(OSError):
    """A URL destination resolved to an address the admin did not allow."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses loopback, private,
    link-local and other non-public addresses: checked at connect time, so DNS
    rebinding cannot get around it."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_public(result["host"]):
                raise PrivateAddress(f"{host} resolves to the non-public address {result['host']}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast


class Deliveries:
    """Events in, deliveries out. One per server application."""

    def __init__(
        self, *, store: Store, commits: GroupCommitter, registry: Registry, config: QueueConfig
    ) -> None:
        self.store = store
        self.commits = commits
        self.registry = registry
        self.config = config
        self._dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self._settings: dict[str, TunnelSettings] = {}
        self._pending: dict[str, list[int]] = {}  # tunnel -> [events, bytes] not yet finished
        self._tasks: set[asyncio.Task[Any]] = set()
        self.http: aiohttp.ClientSession | None = None
        registry.on_connect.append(self._agent_connected)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=None if self.config.allow_private else PublicOnlyResolver(), limit=100
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        totals = await asyncio.to_thread(self.store.pending_totals)
        self._pending = {tunnel: [events, size] for tunnel, (events, size) in totals.items()}
        for tunnel, destination in await asyncio.to_thread(self.store.pending_destinations):
            self.dispatcher(tunnel, destination).wake()
        self.spawn(self._purge_forever())

    async def stop(self) -> None:
        for dispatcher in self._dispatchers.values():
            dispatcher.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *self._tasks, *(d.task for d in self._dispatchers.values() if d.task), return_exceptions=True
        )
        if self.http is not None:
            await self.http.close()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _purge_forever(self) -> None:
        while True:
            with contextlib.suppress(StoreError):
                purged = await asyncio.to_thread(self.store.purge, time.time() - self.config.retention)
                if purged:
                    log.info("purged %d events past their retention", purged)
            await asyncio.sleep(min(PURGE_INTERVAL, max(1.0, self.config.retention / 4)))

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
        for destination in settings.destinations:
            self.dispatcher(tunnel, destination).wake()

    def dispatcher(self, tunnel: str, destination: str) -> Dispatcher:
        key = (tunnel, destination)
        if key not in self._dispatchers:
            self._dispatchers[key] = Dispatcher(self, tunnel, destination)
        return self._dispatchers[key]

    def _agent_connected(self, session: AgentSession) -> None:
        for name in session.names:
            for destination in (ANY_AGENT, f"agent:{session.label}"):
                if (name, destination) in self._dispatchers:
                    self.spawn(self._deliver_now(name, destination))

    async def _deliver_now(self, tunnel: str, destination: str) -> None:
        """An agent came: everything waiting for it is due at once, in arrival order."""
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.store.make_due_now, tunnel, destination)
        self.dispatcher(tunnel, destination).wake()

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
        write_response: Callable[[AgentSession, Stream, ResponseHead], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse | bytes:
        """Take a request as an event. Returns the response to send, or the body bytes
        read so far if the body turned out larger than the queue limit (go live)."""
        chunks: list[bytes] = []
        size = 0
        while size <= self.config.max_body and (
            chunk := await request.content.read(self.config.max_body + 1 - size)
        ):
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
        if size > self.config.max_body:
            return body
        pending = self._pending.setdefault(tunnel, [0, 0])
        if pending[0] >= self.config.quota_events or pending[1] + len(body) > self.config.quota_bytes:
            return relay_error(
                "too-many-requests",
                f"the queue of {tunnel!r} is full; try again later",
                **{"Retry-After": "60"},
            )
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
        if session is not None and not await dispatcher.take_slot(event.id, settings, INLINE_SLOT_WAIT):
            session = None  # a burst: the app gets at most max_concurrency at once, the rest wait
        # With an agent at hand the first attempt is made here; the lease keeps
        # the dispatcher off it until the attempt is over (or the server died).
        lease = now + self.config.timeout + 30 if session else now
        deliveries = [Delivery(0, tunnel, d, "queued", 0, lease) for d in settings.destinations]
        try:
            seq = await self.commits.write(Store.insert_event_op(event, deliveries))
        except StoreError as exc:
            log.error("cannot store an event for %s: %s", tunnel, exc)
            dispatcher.release(event.id)
            return relay_error("store-unavailable", "the relay cannot store this request now; retry later")
        except BaseException:  # the sender went away: the dispatcher delivers it after the lease
            dispatcher.release(event.id)
            raise
        event = replace(event, seq=seq)
        pending[0] += 1
        pending[1] += len(body)
        if session is None:
            for destination in settings.destinations:
                self.dispatcher(tunnel, destination).wake()
            return self._queued(event)
        return await self._first_attempt(
            event, replace(deliveries[0], event_seq=seq), session, settings, write_response
        )

    def _queued(self, event: Event) -> web.Response:
        response = web.json_response({"queued": True, "event": event.id}, status=202)
        response.headers["X-Relay-Event"] = event.id
        return response

    async def _first_attempt(
        self,
        event: Event,
        delivery: Delivery,
        session: AgentSession,
        settings: TunnelSettings,
        write_response: Callable[[AgentSession, Stream, ResponseHead], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        dispatcher = self.dispatcher(event.tunnel, delivery.destination)
        attempt = asyncio.ensure_future(self.attempt_agent(session, event, 1))
        try:
            # Shielded: a sender that gives up (its handler is cancelled) does not
            # cancel the attempt; its outcome is recorded all the same.
            stream, outcome, head = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self.spawn(self._abandoned(attempt, event, delivery, session, settings, dispatcher))
            raise
        # Recorded in the background: the event is already durable, and if this
        # record were lost the attempt would only be made again (same event id).
        self.spawn(self.record(event, delivery, outcome, settings))
        dispatcher.release(event.id)
        if stream is None or head is None or head.status in settings.retry_on:
            if stream is not None:
                await session.finish(stream)
            return self._queued(event)  # durable when down: the relay retries
        # Transparent when up: the sender gets the local service's own answer.
        try:
            return await write_response(session, stream, head)
        finally:
            await session.finish(stream)

    async def _abandoned(
        self,
        attempt: asyncio.Future[tuple[Stream | None, Outcome, ResponseHead | None]],
        event: Event,
        delivery: Delivery,
        session: AgentSession,
        settings: TunnelSettings,
        dispatcher: Dispatcher,
    ) -> None:
        """Finish an inline attempt whose sender went away: record what the app said."""
        try:
            stream, outcome, _ = await attempt
            if stream is not None:
                await drain(session, stream, self.config.timeout)
            await self.record(event, delivery, outcome, settings)
        finally:
            dispatcher.release(event.id)

    # -- attempts ----------------------------------------------------------------------

    async def attempt_agent(
        self, session: AgentSession, event: Event, attempt: int
    ) -> tuple[Stream | None, Outcome, ResponseHead | None]:
        """Send ``event`` to an agent; returns the open stream and its response head
        (the caller reads or drains the body, then finishes the stream)."""
        try:
            stream = await session.open(delivery_head(event, attempt), end_stream=not event.body)
        except StreamFailed as exc:
            return None, Outcome(None, f"agent: {exc}"), None
        try:
            if event.body:
                await session.send_body(stream, event.body, end=True)
            async with asyncio.timeout(self.config.timeout):
                head = await asyncio.shield(stream.head)
        except TimeoutError:
            await session.finish(stream)
            return None, Outcome(None, f"no answer within {self.config.timeout:g}s"), None
        except StreamFailed as exc:
            await session.finish(stream)
            return None, Outcome(None, f"agent: {exc}"), None
        retry_after = parse_retry_after(
            (header_value(head.headers, b"retry-after") or b"").decode("latin-1"), time.time()
        )
        return stream, Outcome(head.status, None, retry_after), head

    async def attempt_url(self, url: str, event: Event, attempt: int) -> Outcome:
        assert self.http is not None
        head = delivery_head(event, attempt)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in strip_hop_by_hop(without(head.headers, b"host", b"content-length")):
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        target = URL(url.rstrip("/") + event.target.decode("utf-8", "surrogateescape"), encoded=True)
        try:
            async with (
                asyncio.timeout(self.config.timeout),
                self.http.request(
                    event.method, target, headers=headers, data=event.body or None, allow_redirects=False
                ) as response,
            ):
                await response.read()
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                return Outcome(response.status, None, retry_after)
        except PrivateAddress as exc:
            return Outcome(None, str(exc))
        except TimeoutError:
            return Outcome(None, f"no answer within {self.config.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:200])

    async def record(
        self, event: Event, delivery: Delivery, outcome: Outcome, settings: TunnelSettings
    ) -> Delivery:
        """Store what an attempt found; returns the delivery's new state."""
        attempts = delivery.attempts + 1
        now = time.time()
        if outcome.status is not None and outcome.status not in settings.retry_on:
            status = "dead" if outcome.status == 410 else "delivered"  # 410 Gone: stop at once
            when = None
        else:
            when = next_attempt_at(self.config.policy, attempts, event.received_at, now, outcome.retry_after)
            status = "failed" if when is not None else "dead"
        updated = replace(
            delivery,
            status=status,
            attempts=attempts,
            next_attempt_at=when,
            last_status=outcome.status,
            last_error=outcome.error,
        )
        with contextlib.suppress(StoreError):  # if lost, the attempt is simply made again
            await self.commits.write(Store.update_delivery_op(updated))
        if status in ("delivered", "dead"):
            await self._maybe_finished(event, settings.destinations == (delivery.destination,))
        else:  # its dispatcher may be asleep until a later time: let it see the retry
            self.dispatcher(event.tunnel, delivery.destination).wake()
        log.log(
            logging.DEBUG if status == "delivered" else logging.INFO,
            "event %s -> %s: attempt %d %s (%s)",
            event.id,
            delivery.destination,
            attempts,
            status,
            outcome.status or outcome.error,
        )
        return updated

    async def _maybe_finished(self, event: Event, only_destination: bool) -> None:
        """Count ``event`` out of its tunnel's quota once no destination waits for it."""
        if only_destination or all(
            d.status in ("delivered", "dead")
            for d in await asyncio.to_thread(self.store.deliveries, event.seq)
        ):
            pending = self._pending.setdefault(event.tunnel, [0, 0])
            pending[0] = max(0, pending[0] - 1)
            pending[1] = max(0, pending[1] - len(event.body))

    async def replay(self, event: Event, deliveries: list[Delivery]) -> list[str]:
        """Queue ``event`` again at each destination (same id, next attempt number)."""
        now = time.time()
        for delivery in deliveries:
            was_finished = delivery.status in ("delivered", "dead")
            await self.commits.write(
                Store.update_delivery_op(replace(delivery, status="queued", next_attempt_at=now))
            )
            if was_finished:
                pending = self._pending.setdefault(event.tunnel, [0, 0])
                pending[0] += 1
                pending[1] += len(event.body)
            self.dispatcher(event.tunnel, delivery.destination).wake()
        return [d.destination for d in deliveries]


class Dispatcher:
    """Delivers one tunnel's pending events to one destination."""

    def __init__(self, deliveries: Deliveries, tunnel: str, destination: str) -> None:
        self.deliveries = deliveries
        self.tunnel = tunnel
        self.destination = destination
        #: Events being attempted now, by the dispatcher or inline by the ingress.
        self.in_flight: set[str] = set()
        #: Events whose attempt ended since the current store query began: a batch
        #: read before that still shows them due, and must not send them again.
        self._ended: set[str] = set()
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()
        #: True while everything due is in flight: an ending attempt then wakes the loop.
        self._waiting_on_in_flight = False
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def has_slot(self, settings: TunnelSettings) -> bool:
        return len(self.in_flight) < settings.max_concurrency

    async def take_slot(self, event_id: str, settings: TunnelSettings, timeout: float) -> bool:
        """Take a delivery slot for ``event_id``, waiting up to ``timeout``; False if none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.has_slot(settings):
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), deadline - loop.time())
            except TimeoutError:
                return False
        self.in_flight.add(event_id)
        return True

    def release(self, event_id: str) -> None:
        """An attempt on ``event_id`` is over: free its slot."""
        self.in_flight.discard(event_id)
        self._ended.add(event_id)
        self._freed.set()
        if self._waiting_on_in_flight:
            self._wake.set()

    @property
    def label(self) -> str | None:
        return self.destination[len("agent:") :] if self.destination.startswith("agent:") else None

    async def _run(self) -> None:
        store = self.deliveries.store
        cursor = 0
        while True:
            settings = await self.deliveries.settings(self.tunnel)
            if self.label is not None and self.deliveries.registry.pick(self.tunnel, self.label) is None:
                await self._sleep(None)  # no agent for it: wait to be woken by its arrival
                continue
            self._ended.clear()
            try:
                # Without bodies: a batch waiting for slots must not hold 100 x 10 MiB.
                batch = await asyncio.to_thread(
                    store.due, self.tunnel, self.destination, time.time(), cursor, BATCH, False
                )
            except StoreError as exc:
                log.warning("dispatcher %s/%s: %s", self.tunnel, self.destination, exc)
                await self._sleep(time.time() + 5)
                continue
            if not batch:
                cursor = 0
                next_at = await asyncio.to_thread(store.next_due_at, self.tunnel, self.destination)
                if next_at is not None and next_at <= time.time() and self.in_flight:
                    # All that is due is being attempted: wait for an attempt to end.
                    self._waiting_on_in_flight = True
                    try:
                        await self._sleep(None)
                    finally:
                        self._waiting_on_in_flight = False
                else:
                    await self._sleep(next_at)
                continue
            for event, delivery in batch:
                cursor = event.seq
                if event.id in self.in_flight or event.id in self._ended:
                    continue
                while not self.has_slot(settings):
                    self._freed.clear()
                    await self._freed.wait()
                self.in_flight.add(event.id)
                self.deliveries.spawn(self._deliver(event, delivery, settings))

    async def _sleep(self, until: float | None) -> None:
        """Wait until ``until`` (None: until woken), or until woken."""
        self._wake.clear()
        timeout = None if until is None else max(0.0, until - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, event: Event, delivery: Delivery, settings: TunnelSettings) -> None:
        attempt = delivery.attempts + 1
        try:
            event = replace(event, body=await asyncio.to_thread(self.deliveries.store.event_body, event.seq))
            if self.label is None:
                outcome = await self.deliveries.attempt_url(self.destination, event, attempt)
            else:
                outcome = await self._via_agent(event, attempt)
        except Exception as exc:  # a bug: count it as a failed attempt, so the schedule applies
            log.exception("delivery of %s to %s failed", event.id, self.destination)
            outcome = Outcome(None, f"relay error: {type(exc).__name__}")
        try:
            await self.deliveries.record(event, delivery, outcome, settings)
        except Exception:
            log.exception("cannot record the delivery of %s to %s", event.id, self.destination)
        finally:
            self.release(event.id)

    async def _via_agent(self, event: Event, attempt: int) -> Outcome:
        assert self.label is not None
        session = self.deliveries.registry.pick(self.tunnel, self.label)
        if session is None:
            return Outcome(None, "no agent connected")
        stream, outcome, _ = await self.deliveries.attempt_agent(session, event, attempt)
        if stream is not None:
            await drain(session, stream, self.deliveries.config.timeout)
        return outcome


async def drain(session: AgentSession, stream: Stream, timeout: float) -> None:
    """Read and drop a delivery's answer body (it is not kept), under flow control; finish the stream."""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await stream.read():
                await session.consumed(stream, len(chunk))
    except (StreamFailed, TimeoutError):
        pass
    finally:
        await session.finish(stream)


def event_json(event: Event, deliveries: list[Delivery], with_body: bool = False) -> dict[str, Any]:
    """The API's view of an event."""
    data: dict[str, Any] = {
        "id": event.id,
        "tunnel": event.tunnel,
        "received_at": received_at_text(event.received_at),
        "method": event.method,
        "target": event.target.decode("utf-8", "replace"),
        "client": event.client,
        "status": summary_status(deliveries),
        "deliveries": [
            {
                "destination": d.destination,
                "status": d.status,
                "attempts": d.attempts,
                "next_attempt_at": received_at_text(d.next_attempt_at)
                if d.next_attempt_at and d.status in ("queued", "failed")
                else None,
                "last_status": d.last_status,
                "last_error": d.last_error,
            }
            for d in deliveries
        ],
    }
    if with_body:
        data["headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers]
        try:
            data["body"] = event.body.decode("utf-8")
            data["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            data["body"] = base64.b64encode(event.body).decode()
            data["body_encoding"] = "base64"
    return data


def summary_status(deliveries: list[Delivery]) -> str:
    """One word for an event: the least advanced state among its destinations."""
    order = ("failed", "queued", "dead", "delivered")
    states = {d.status for d in deliveries}
    return next((s for s in order if s in states), "queued")
