"""``/metrics``: the server's counters and gauges in the Prometheus text format.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/):
``relay_`` prefix, base units (seconds, bytes), ``_total`` on counters. Every metric
lives in the application's own registry (two servers in one process never share one).
Labels are bounded: status class, the relay error code (a fixed table), a route kind,
and, only with ``--metrics-per-tunnel``, the name of a claimed tunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from .config import Network
from .connections import is_local
from .public_errors import relay_error
from .registry import Registry
from .store import STATUSES, Delivery, Store

#: Request duration buckets (seconds): a relayed webhook takes milliseconds to the
#: local app and back; 30 s is the default --timeout, above it are streams.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Group-commit batch sizes: powers of two up to the committer's MAX_BATCH region.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: Route kinds of the ``route`` label: a tunnel request, the JSON API, anything else
#: the server answers itself (probes, the agent endpoint, errors).
ROUTES = ("tunnel", "api", "server")


class Metrics:
    """The counters; ``observe_request`` and the ``on_*`` hooks are called as things happen."""

    def __init__(self, *, registry: Registry, store: Store, per_tunnel: bool = False) -> None:
        self.sessions = registry
        self.store = store
        self.per_tunnel = per_tunnel
        # No ``*_created`` series (the start time of each counter): they double the output
        # and tell nothing a scraper's own ``process_start_time`` does not.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        tunnel = ("tunnel",) if per_tunnel else ()
        #: ``requests``' children by their label values: ``labels()`` checks and locks on
        #: every call (2 % of a relayed request's CPU). As many as the series themselves.
        self._request_counters: dict[tuple[str, ...], Counter] = {}
        self.requests = Counter(
            "relay_requests",
            "Public requests answered, by route kind, status class (2xx...) and X-Relay-Error code.",
            ("route", "status_class", "error", *tunnel),
            registry=r,
        )
        self.duration = Histogram(
            "relay_request_duration_seconds",
            "Tunnel requests: seconds from the request head to the end of the response.",
            tunnel,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "relay_request_body_bytes",
            "Tunnel requests: body bytes received from public clients.",
            tunnel,
            registry=r,
        )
        self.bytes_out = Counter(
            "relay_response_body_bytes",
            "Tunnel requests: body bytes sent to public clients.",
            tunnel,
            registry=r,
        )
        self.attempts = Counter(
            "relay_delivery_attempts",
            "Delivery attempts recorded, by the state they left the delivery in.",
            ("result",),
            registry=r,
        )
        self.retries = Counter(
            "relay_delivery_retries", "Delivery attempts after a delivery's first.", registry=r
        )
        self.dead = Counter(
            "relay_deliveries_dead", "Deliveries given up (dead letters), by attempts or by age.", registry=r
        )
        self.batches = Histogram(
            "relay_commit_batch_size",
            "Store writes per group commit (one fsync each).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.agents = Gauge("relay_agents_connected", "Agent connections open now.", registry=r)
        self.streams = Gauge(
            "relay_streams_open", "Streams open now, over every agent connection.", registry=r
        )
        self.events = Gauge(
            "relay_events",
            "Stored events, by state (the least advanced of their deliveries').",
            ("state",),
            registry=r,
        )
        self.store_bytes = Gauge("relay_store_bytes", "Size of the store's database file.", registry=r)

    # -- hooks -----------------------------------------------------------------------------

    def observe_request(
        self, *, route: str, status: int, error: str, tunnel: str | None, seconds: float, read: int, sent: int
    ) -> None:
        """One public request answered: ``tunnel`` is its claimed tunnel's name, or None."""
        key = (route, f"{status // 100}xx", error, *((tunnel or "",) if self.per_tunnel else ()))
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(*key)
        counter.inc()
        if route != "tunnel":
            return
        if self.per_tunnel:
            name = tunnel or ""
            self.duration.labels(name).observe(seconds)
            self.bytes_in.labels(name).inc(read)
            self.bytes_out.labels(name).inc(sent)
        else:
            self.duration.observe(seconds)
            self.bytes_in.inc(read)
            self.bytes_out.inc(sent)

    def on_recorded(self, delivery: Delivery) -> None:
        """A delivery attempt's outcome was written."""
        self.attempts.labels(delivery.status).inc()
        if delivery.attempts > 1:
            self.retries.inc()
        if delivery.status == "dead":
            self.dead.inc()

    def on_expired(self, deliveries: int) -> None:
        """``deliveries`` waiting deliveries died of old age (--max-age)."""
        self.dead.inc(deliveries)

    def on_batch(self, size: int) -> None:
        self.batches.observe(size)

    # -- the endpoint ----------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The text exposition, the gauges read now (the store's in a worker thread)."""
        sessions = self.sessions.sessions()
        self.agents.set(len(sessions))
        self.streams.set(sum(s.open_streams for s in sessions))
        states, size = await asyncio.to_thread(self.store.stats)
        for state in STATUSES:
            self.events.labels(state).set(states.get(state, 0))
        self.store_bytes.set(size)
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics`` on the metrics listener (``--metrics-listen``)."""
        body = await self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def apex_handler(
        self, trusted: tuple[Network, ...]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``GET /metrics`` on the apex: from this host (or a trusted proxy itself) only."""

        async def metrics(request: web.Request) -> web.StreamResponse:
            if not is_local(request, trusted):
                return relay_error("not-found", "no such page on the relay server")
            return await self.handle(request)

        return metrics
