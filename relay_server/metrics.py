"""``/metrics``: the server's counters and gauges in the Prometheus text format.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/):
``relay_`` prefix, base units (seconds, bytes), ``_total`` on counters. Every metric
lives in the application's own registry (two servers in one process never share one).
Labels are bounded: status class, the relay error code (a fixed table), a route kind,
and, only with ``--metrics-per-tunnel``, the name of a claimed tunnel.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Awaitable, Callable, Iterator

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
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _TunnelFigures:
    """What ``RequestCounts`` adds up for tunnel requests (of one tunnel, with
    ``--metrics-per-tunnel``): durations by bucket, not cumulated, and body bytes."""

    __slots__ = ("buckets", "read", "seconds", "sent")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last: over every bound (+Inf)
        self.seconds = 0.0
        self.read = 0
        self.sent = 0


class RequestCounts(Collector):
    """The public requests' counter, duration histogram and body byte counters, kept as
    plain numbers by ``observe`` and turned into metric families by ``collect`` (a
    prometheus_client custom collector: https://prometheus.github.io/client_python/collector/custom/).

    Called on the event loop only, as the exposition is made: no lock. The series, buckets
    and sums are those the library's own ``Counter`` and ``Histogram`` gave (a value on a
    bound counts in that bound's bucket; tests/unit/test_operate.py).
    """

    def __init__(self, per_tunnel: bool) -> None:
        self.per_tunnel = per_tunnel
        #: Requests by (route, status class, error code[, tunnel]).
        self.requests: dict[tuple[str, ...], int] = {}
        #: Tunnel requests' figures by tunnel name ("" for all of them, without per-tunnel).
        self.tunnels: dict[str, _TunnelFigures] = {} if per_tunnel else {"": _TunnelFigures()}

    def observe(
        self, route: str, status: int, error: str, tunnel: str | None, seconds: float, read: int, sent: int
    ) -> None:
        name = (tunnel or "") if self.per_tunnel else ""
        key: tuple[str, ...] = (route, _STATUS_CLASSES.get(status) or f"{status // 100}xx", error)
        if self.per_tunnel:
            key += (name,)
        self.requests[key] = self.requests.get(key, 0) + 1
        if route != "tunnel":
            return
        figures = self.tunnels.get(name)
        if figures is None:
            figures = self.tunnels[name] = _TunnelFigures()
        # Prometheus buckets hold what is at most their bound ("le"): the first bound >= seconds.
        figures.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        figures.seconds += seconds
        figures.read += read
        figures.sent += sent

    def collect(self) -> Iterator[Metric]:
        tunnel = ["tunnel"] if self.per_tunnel else []
        requests = CounterMetricFamily(
            "relay_requests",
            "Public requests answered, by route kind, status class (2xx...) and X-Relay-Error code.",
            labels=["route", "status_class", "error", *tunnel],
        )
        for key, count in self.requests.items():
            requests.add_metric(list(key), count)
        yield requests
        duration = HistogramMetricFamily(
            "relay_request_duration_seconds",
            "Tunnel requests: seconds from the request head to the end of the response.",
            labels=tunnel,
        )
        read = CounterMetricFamily(
            "relay_request_body_bytes",
            "Tunnel requests: body bytes received from public clients.",
            labels=tunnel,
        )
        sent = CounterMetricFamily(
            "relay_response_body_bytes", "Tunnel requests: body bytes sent to public clients.", labels=tunnel
        )
        for name, figures in self.tunnels.items():
            labels = [name] if self.per_tunnel else []
            cumulative = list(itertools.accumulate(figures.buckets))
            duration.add_metric(labels, list(zip(_BOUNDS, cumulative, strict=True)), figures.seconds)
            read.add_metric(labels, figures.read)
            sent.add_metric(labels, figures.sent)
        yield from (duration, read, sent)


#: The buckets' "le" labels, as prometheus_client writes them.
_BOUNDS = [*(floatToGoString(b) for b in DURATION_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
#: "2xx" and so on for the statuses the relay answers, made once.
_STATUS_CLASSES = {status: f"{status // 100}xx" for status in range(100, 600)}


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
        #: The figures of every public request, counted in plain numbers and read at
        #: scrape time (prometheus_client's ``inc`` takes a lock, ``labels`` checks and
        #: locks: 3.1 us of a relayed request's CPU for four of them, against 0.5).
        self.request_counts = RequestCounts(per_tunnel)
        r.register(self.request_counts)
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
        self.request_counts.observe(route, status, error, tunnel, seconds, read, sent)

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
