"""The aiohttp application (``create_app``) and the process around it (``run``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from relay_protocol.frames import CLOSE_GOING_AWAY
from relay_web.guard import SERVER_HEADER, ConnectionGuard, GuardedAppRunner
from relay_web.listen import authority, start_sites

from . import tokens
from .access import RequestNotes, loggable_path
from .agent_endpoint import AgentEndpoint
from .api import Api
from .commits import GroupCommitter
from .config import DEFAULT_KEEPALIVE_TIMEOUT, ServerConfig
from .connections import BUSY_RESPONSE, AcceptErrorLog, trusts
from .delivery import Deliveries
from .errors import ConfigError
from .expect import check_expectation, close_if_body_unsent
from .ingress import MAX_HEADER_LINE, MAX_REQUEST_HEADERS, Ingress
from .metrics import Metrics
from .names import PublicOrigin
from .probes import Probes, healthz
from .public_errors import relay_error
from .registry import InFlight, Registry
from .relayed import ExactHead
from .status import STATUS_PATH, Status
from .store import Store
from .watch import Watch

log = logging.getLogger("relay.server")

CONFIG = web.AppKey("config", ServerConfig)
STORE = web.AppKey("store", Store)
REGISTRY = web.AppKey("registry", Registry)
INFLIGHT = web.AppKey("inflight", InFlight)
DELIVERIES = web.AppKey("deliveries", Deliveries)
COMMITS = web.AppKey("commits", GroupCommitter)
WATCH = web.AppKey("watch", Watch)
METRICS = web.AppKey("metrics", Metrics)


def create_app(config: ServerConfig, store: Store | None = None) -> web.Application:
    """Build the server application. Raises ``ConfigError`` for a bad public URL or secret."""
    origin = PublicOrigin.parse(config.public_url)
    secret = tokens.load_secret(config.data_dir)
    store = store or Store(config.data_dir, config.store_max_bytes)
    registry = Registry()
    inflight = InFlight()
    commits = GroupCommitter(store)
    deliveries = Deliveries(store=store, commits=commits, registry=registry, config=config.queue)
    api = Api(
        secret=secret,
        store=store,
        registry=registry,
        deliveries=deliveries,
        max_names_per_user=config.max_names_per_user,
    )
    agents = AgentEndpoint(
        secret=secret,
        store=store,
        registry=registry,
        origin=origin,
        deliveries=deliveries,
        inflight=inflight,
        trusted_proxies=config.trusted_proxies,
        heartbeat_interval=config.heartbeat_interval,
        max_agents_per_user=config.max_agents_per_user,
        max_names_per_user=config.max_names_per_user,
    )
    metrics = Metrics(registry=registry, store=store, per_tunnel=config.metrics_per_tunnel)
    deliveries.on_recorded = metrics.on_recorded
    deliveries.on_expired = metrics.on_expired
    commits.on_batch = metrics.on_batch
    notes = RequestNotes(
        metrics=metrics, access_log=config.access_log, trusted_proxies=config.trusted_proxies
    )
    probes = Probes(origin=origin, store=store, inflight=inflight, trusted_proxies=config.trusted_proxies)
    status = Status(
        registry=registry,
        store=store,
        inflight=inflight,
        trusted_proxies=config.trusted_proxies,
        admin_token=config.admin_token,
    )
    ingress = Ingress(
        origin=origin,
        registry=registry,
        inflight=inflight,
        store=store,
        deliveries=deliveries,
        timeout=config.timeout,
        idle_timeout=config.idle_timeout,
        apex_routes={
            "/healthz": healthz,
            "/readyz": probes.readyz,
            "/metrics": metrics.apex_handler(config.trusted_proxies),
            "/_relay/tls-ask": probes.tls_ask,
            STATUS_PATH: status.handle,
            "/_relay/agent": agents.handle,
        },
        api=api.handle,
        trusted_proxies=config.trusted_proxies,
    )

    # Ingress is a middleware that never calls the routed handler: aiohttp's router
    # would answer CONNECT (authority-form) and absolute-form targets itself, and
    # would route those by the URL's host instead of the Host header. The router
    # has one catch-all route so that it matches at once: with none, it builds a
    # 404 exception and the middleware chain anew for every request (9% of the
    # server's time at 16 concurrent webhooks, measured with py-spy).
    @web.middleware
    async def everything(request: web.Request, handler: object) -> web.StreamResponse:
        started = notes.begin(request)
        response: web.StreamResponse | None = None
        try:
            response = await ingress.handle(request)
            close_if_body_unsent(request, response)
        except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError too
            # The public client went away mid-response: nobody to answer, no bug to report.
            path = loggable_path(request.raw_path)
            log.info("client went away during %s %s: %s", request.method, path, exc)
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never written: aiohttp finds the connection closed
        except Exception:  # a bug: log it, never show a traceback to the client
            log.exception("internal error on %s %s", request.method, loggable_path(request.raw_path))
            response = relay_error("internal-error", "the relay server failed on this request")
        finally:
            notes.end(request, response, started)  # response None: the client left first
        return response

    app = web.Application(
        middlewares=[everything],
        handler_args={
            # Bodies pass byte for byte: never inflate what the client compressed.
            "auto_decompress": False,
            "max_line_size": MAX_HEADER_LINE,
            "max_field_size": MAX_HEADER_LINE,
            "max_headers": MAX_REQUEST_HEADERS,
        },
    )
    app.router.add_route("*", "/{path:.*}", _never_called, expect_handler=check_expectation)
    app.on_response_prepare.append(_own_server_header)
    app[CONFIG] = config
    app[STORE] = store
    app[REGISTRY] = registry
    app[INFLIGHT] = inflight
    app[DELIVERIES] = deliveries
    app[COMMITS] = commits
    app[METRICS] = metrics
    app.cleanup_ctx.append(_store_ctx)
    app[WATCH] = Watch(store=store, registry=registry, deliveries=deliveries)
    app.cleanup_ctx.append(_watch_ctx)
    return app


async def _own_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the relay's own answers say ``SERVER_HEADER`` (not aiohttp's
    name and versions); a relayed one carries the local service's head, and only it
    (``relayed.ExactHead``)."""
    if not isinstance(response, ExactHead):
        response.headers["Server"] = SERVER_HEADER


async def _never_called(request: web.Request) -> web.StreamResponse:
    """The catch-all route's handler: the ``everything`` middleware answers instead."""
    raise AssertionError("the ingress middleware answers every request")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Group commit and deliveries run while the application does; the store closes last."""
    app[COMMITS].start()
    await app[DELIVERIES].start()
    yield
    await app[DELIVERIES].stop()
    await app[COMMITS].stop()
    app[STORE].close()


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Names' owners and revoked tokens, as the admin CLI changes them, watched from the
    start (after deliveries, which it tells about names that changed hands)."""
    await app[WATCH].start()
    yield
    await app[WATCH].stop()


async def _drain(app: web.Application) -> None:
    """On shutdown: refuse new tunnel requests and agents (503; /readyz says not-ready),
    let in-flight ones finish (bounded), then close every agent connection with
    GOING_AWAY so agents reconnect elsewhere."""
    inflight = app[INFLIGHT]
    inflight.draining = True
    if not await inflight.wait_idle(app[CONFIG].shutdown_grace):
        log.warning(
            "shutdown: %d requests still in flight after %ss", inflight.count, app[CONFIG].shutdown_grace
        )
    sessions = app[REGISTRY].sessions()
    await asyncio.gather(*(s.close(CLOSE_GOING_AWAY, "server shutting down") for s in sessions))


async def serve(
    config: ServerConfig,
    app: web.Application,
    ready: asyncio.Event | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully. ``sockets``:
    listening already (``relay_web.listen.listening_sockets``), else made here."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog())  # no traceback per accept() without descriptors
    guard = ConnectionGuard(
        max_connections=config.max_connections,
        max_per_client=config.max_connections_per_client,
        head_timeout=config.head_timeout,
        busy_response=BUSY_RESPONSE,
        # A front proxy carries many clients' connections.
        exempt=lambda client: trusts(config.trusted_proxies, client),
    )
    runner = GuardedAppRunner(
        app,
        guard,
        handler_cancellation=True,  # a client that goes away cancels its stream at the agent
        access_log=None,
        shutdown_timeout=config.shutdown_grace + 5,
        keepalive_timeout=DEFAULT_KEEPALIVE_TIMEOUT,  # idle between requests; heads: head_timeout
    )
    await runner.setup()
    # A TLS handshake counts as part of the head: a client that never finishes one is
    # closed after --head-timeout, as one that never finishes its request head.
    sites = await start_sites(
        runner,
        config.host,
        config.port,
        ssl_context=config.tls,
        handshake_timeout=config.head_timeout,
        sockets=sockets,
    )
    metrics_runner = await _metrics_site(config, app[METRICS]) if config.metrics_listen else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    scheme = "https" if config.tls is not None else "http"
    log.info(
        "relay-server listening on %s://%s, public URL %s", scheme, authority(host, port), config.public_url
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
        # Drain while still listening, so that /readyz and the status say "draining" to
        # whoever asks (a load balancer, `relay-server status`) and new requests get a
        # 503 rather than a refused connection; and while the agent connections still
        # carry the answers: aiohttp's cleanup() closes every connection before its
        # shutdown hooks run, which would cut the requests we wait for. Then stop.
        await _drain(app)
        for site in sites:
            await site.stop()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        log.info("stopped")


async def _metrics_site(config: ServerConfig, metrics: Metrics) -> web.AppRunner:
    """The ``--metrics-listen`` listener: ``GET /metrics`` and nothing else, to anyone who
    reaches it (the operator chose its address). Raises ``ConfigError`` if it cannot bind."""
    assert config.metrics_listen is not None
    host, port = config.metrics_listen
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    app.on_response_prepare.append(_own_server_header)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await start_sites(runner, host, port)
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on --metrics-listen {host}:{port}: {exc.strerror or exc}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]  # the port the kernel picked for port 0
    log.info("metrics on http://%s/metrics", authority(host, port))
    return runner
