"""The inspector's web server: the page, its assets, and its JSON API, on the agent's loop.

::

    GET  /                      the page (static/index.html; its script and style beside it)
    GET  /api/status            {"server", "target", "names", "urls", "online", "limits"}
    ...  /api/exchanges...      exchanges.py
    ...  /api/server/events...  history.py

Every answer refuses a request whose Host or Origin is not the inspector's own (403,
``address.py`` says why) or that a browser marks as sent by another site
(``Sec-Fetch-Site: cross-site`` or ``same-site``, Fetch Metadata); a POST must say
``Content-Type: application/json`` (415 otherwise), which no cross-site form can send and
a cross-site script cannot send without a CORS preflight the inspector never grants. It
carries a Content-Security-Policy that lets the page load
nothing but its own files: no CDN, no inline script, works offline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from relay_web.guard import ConnectionGuard, GuardedAppRunner, busy_response
from relay_web.listen import start_sites
from relay_web.malformed import count_malformed_requests

from ..errors import AgentConfigError
from . import exchanges, history
from .address import InspectAddress
from .recorder import MAX_BODY, MAX_EXCHANGES
from .state import INSPECTOR, Inspector, api_error, error_code

log = logging.getLogger("relay.agent")

STATIC = Path(__file__).parent / "static"
_ASSETS = frozenset({"app.js", "style.css"})
#: Connections the inspector takes at once: pages and scripts of one person (each page
#: holds a few, its event stream one). Any process on the machine can connect; more
#: are answered 503 at once, so that they never take the descriptors forwarding needs.
MAX_CONNECTIONS = 64
#: Seconds a connection has to send its request head, and to stay idle between requests.
HEAD_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 15.0
#: Sent (then the connection is closed) to a connection over ``MAX_CONNECTIONS``.
BUSY_RESPONSE = busy_response(
    b'{"error": "too-many-connections", "message": "the inspector has too many connections"}',
    "application/json",
)
#: Seconds the inspector's open requests (event streams, a replay's answer) get to end
#: when the agent stops.
SHUTDOWN_TIMEOUT = 1.0
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: Fetch Metadata's ``Sec-Fetch-Site`` values for a request another site's page made
#: (https://www.w3.org/TR/fetch-metadata/): the inspector's own page sends
#: ``same-origin``, a typed URL or a bookmark ``none``.
_OTHER_SITES = frozenset({"cross-site", "same-site"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(inspector: Inspector, address: InspectAddress) -> web.Application:
    """The inspector's application, answering only to ``address``'s own names. Anything
    on the machine can reach its port: malformed requests are counted, not each logged
    with a traceback (``relay_web.malformed``)."""
    count_malformed_requests()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not address.allows_host(request.headers.get("Host", "")):
            return _secured(
                api_error(403, "forbidden", "this is not the inspector's address (DNS rebinding?)")
            )
        if _from_another_site(request, address):
            return _secured(api_error(403, "forbidden", "requests from other sites are refused"))
        if request.method == "POST" and request.content_type != "application/json":
            return _secured(
                api_error(415, "unsupported-media-type", "a POST to the inspector must be application/json")
            )
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.content_type == "application/json":
                raise
            response = api_error(
                exc.status, error_code(exc.status), f"{request.method} {request.path}: {exc.reason}"
            )
        return _secured(response)

    app = web.Application(middlewares=[guard], client_max_size=exchanges.MAX_REPLAY_REQUEST)
    app[INSPECTOR] = inspector
    app.router.add_get("/", _page)
    app.router.add_get("/api/status", _status)
    app.router.add_routes(exchanges.routes)
    app.router.add_routes(history.routes)
    app.router.add_get("/static/{name}", _asset)
    return app


def _from_another_site(request: web.Request, address: InspectAddress) -> bool:
    """A browser says another site's page made ``request``: by its Origin, or Fetch Metadata."""
    origin = request.headers.get("Origin")
    if origin is not None and not address.allows_origin(origin):
        return True
    return request.headers.get("Sec-Fetch-Site", "").lower() in _OTHER_SITES


def _bind_error(failure: OSError | None) -> str:
    """What went wrong binding, in the system's words (asyncio wraps them in its own,
    "error while attempting to bind ..."; a name that does not resolve is a gaierror,
    whose negative errno ``os.strerror`` does not know)."""
    if isinstance(failure, socket.gaierror):
        return f"cannot resolve the name ({failure.strerror})"
    if failure is not None and failure.errno:
        return os.strerror(failure.errno).lower()
    return str(failure)


def _secured(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _asset(request: web.Request) -> web.FileResponse:
    """The page's script or style: only these names (a directory served whole answered
    paths such as ``..%5c`` with its own empty 404, not the API's JSON)."""
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name)


async def _status(request: web.Request) -> web.Response:
    status = request.app[INSPECTOR].status()
    return web.json_response({**status, "limits": {"exchanges": MAX_EXCHANGES, "body": MAX_BODY}})


@contextlib.asynccontextmanager
async def serve(inspector: Inspector, address: InspectAddress) -> AsyncIterator[InspectAddress | None]:
    """Serve the inspector on ``address`` (or the first free of its ``candidates``) while
    the block runs; yields the address bound. An exact address that cannot be bound
    raises ``AgentConfigError``; when every default port is taken, the agent goes on
    without an inspector (a warning says so) and None is yielded."""
    runner: web.AppRunner | None = None
    bound: InspectAddress | None = None
    failure: OSError | None = None
    for candidate in address.candidates():
        guard = ConnectionGuard(
            max_connections=MAX_CONNECTIONS,
            max_per_client=MAX_CONNECTIONS,
            head_timeout=HEAD_TIMEOUT,
            busy_response=BUSY_RESPONSE,
        )
        runner = GuardedAppRunner(
            create_app(inspector, candidate),
            guard,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )
        await runner.setup()
        try:
            await start_sites(runner, candidate.host, candidate.port)
        except OSError as exc:
            await runner.cleanup()
            runner, failure = None, exc
            if exc.errno == errno.EADDRINUSE:
                continue  # the next port, for the default address
            break
        bound = candidate
        break
    if bound is not None and not bound.loopback:
        log.warning(
            "the inspector on %s is not on a loopback address: whoever can reach it can read"
            " and replay your webhooks (it asks for no password)",
            bound.authority,
        )
    if runner is None:
        why = _bind_error(failure)
        if address.exact:
            raise AgentConfigError(f"cannot serve the inspector on {address.authority}: {why}")
        tried = address.candidates()
        log.warning(
            "no inspector: cannot listen on %s, ports %d to %d (%s); --inspect ADDR picks another",
            address.host,
            tried[0].port,
            tried[-1].port,
            why,
        )
    try:
        yield bound
    finally:
        inspector.recorder.close()
        await inspector.background.stop()
        if runner is not None:
            await runner.cleanup()
        inspector.renderer.shutdown(wait=False, cancel_futures=True)
