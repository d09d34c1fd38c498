"""Public ingress: every HTTP request the server receives enters here.

``route`` decides from the normalised Host and the raw target whether a request
is for a tunnel (``NAME.domain/...`` or ``domain/t/NAME/...``) or for the
server itself; ``Ingress.forward`` streams a tunnel request to an agent and
its response back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from relay_protocol import RelayError, RequestHead, ResponseHead
from relay_protocol.frames import RESET_TARGET_TIMEOUT, RESET_TARGET_UNREACHABLE
from relay_protocol.headers import (
    WEBSOCKET_HANDSHAKE,
    is_websocket_upgrade,
    strip_hop_by_hop,
    without,
)
from relay_protocol.limits import MAX_DATA_SIZE

from .delivery import Deliveries
from .names import PublicOrigin, is_valid_name, normalize_host
from .public_errors import relay_error
from .registry import InFlight, Registry
from .session import AgentSession, Stream, StreamFailed
from .store import Store
from .upgrade import relay_websocket

log = logging.getLogger("relay.server")

#: Largest request head (all header lines) accepted from a public client. Far
#: above what providers send (a few KiB), and half of the protocol's
#: MAX_HEAD_SIZE so the X-Forwarded-* headers always fit.
MAX_REQUEST_HEAD = 32 * 1024
#: Largest single header line aiohttp's parser accepts (it answers 400 above).
MAX_HEADER_LINE = 16 * 1024
#: Most header fields in one public request; the protocol allows 256, and the
#: relay adds up to four X-Forwarded-* fields.
MAX_REQUEST_HEADERS = 240

#: Methods a tunnel never forwards: CONNECT would open a raw tunnel through
#: the agent, TRACE reflects headers (cross-site tracing).
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

#: Headers the relay sets itself; whatever the client sent under these names is dropped.
_FORWARDED = (
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
    b"forwarded",
)
# Also consumed by the relay: aiohttp answers "Expect: 100-continue" itself.
_CONSUMED = (*_FORWARDED, b"expect")

#: The JSON API lives under this path on the apex.
API_PREFIX = "/_relay/api/"

_PATH_PREFIX = re.compile(r"^/t/([^/?#]*)(.*)$", re.DOTALL)


@dataclass(frozen=True)
class TunnelRoute:
    name: str
    target: str  # the origin-form target the agent forwards, prefix removed
    prefix: str  # "/t/NAME" for the path form, "" for the subdomain form


@dataclass(frozen=True)
class ApexRoute:
    path: str


class BadTarget(ValueError):
    """The request target cannot be routed (dot-segments leaving the tunnel)."""


def _escapes_root(path: str) -> bool:
    """True if ``path``'s dot-segments (plain or percent-encoded) climb above its root."""
    depth = 0
    for segment in path.split("/")[1:]:
        seg = segment.lower().replace("%2e", ".")
        if seg == "..":
            depth -= 1
            if depth < 0:
                return True
        elif seg not in (".", ""):
            depth += 1
    return False


def route(host: str, raw_target: str, origin: PublicOrigin) -> TunnelRoute | ApexRoute:
    """Where a request goes. ``host`` is already normalised; raises ``BadTarget``."""
    name = origin.subdomain_of(host)
    if name is not None:
        return TunnelRoute(name, raw_target, "")
    match = _PATH_PREFIX.match(raw_target)
    if match is None:
        return ApexRoute(raw_target.split("?", 1)[0])
    name, rest = match.groups()
    if rest and rest[0] not in "/?":
        return ApexRoute(raw_target.split("?", 1)[0])  # /t/alice-x... is not /t/alice
    target = rest if rest.startswith("/") else "/" + rest
    if _escapes_root(target.split("?", 1)[0]):
        raise BadTarget("dot-segments in the path would leave the tunnel")
    return TunnelRoute(name, target, f"/t/{name}")


def _text(raw: bytes) -> str:
    # aiohttp writes header strings as UTF-8: valid UTF-8 passes byte for byte.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RelayedResponse(web.StreamResponse):
    """A response carrying exactly the local service's headers.

    aiohttp adds ``Content-Type: application/octet-stream`` to a body that has
    none; a relay must not invent headers, so that default is taken back out.
    (``_prepare_headers`` is aiohttp's hook between building and writing the
    head; the httpbin fidelity tests catch any change to it.)
    """

    async def _prepare_headers(self) -> None:
        had_type = "Content-Type" in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall("Content-Type", None)


class Ingress:
    """The catch-all request handler of the public server."""

    def __init__(
        self,
        *,
        origin: PublicOrigin,
        registry: Registry,
        inflight: InFlight,
        store: Store,
        deliveries: Deliveries,
        timeout: float,
        idle_timeout: float,
        apex_routes: dict[str, Handler],
        api: Handler,
    ) -> None:
        self.origin = origin
        self.registry = registry
        self.inflight = inflight
        self.store = store
        self.deliveries = deliveries
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.apex_routes = apex_routes
        self.api = api

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_target = request.raw_path
        if request.method in REFUSED_METHODS:
            return relay_error("method-not-allowed", f"{request.method} is not forwarded")
        if not raw_target.startswith("/"):
            # aiohttp would route "GET http://bob.example/x" by the URL's host,
            # not by the Host header: refuse absolute-form and asterisk-form.
            return relay_error("bad-request", "the request target must be a path (origin-form)")
        if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > MAX_REQUEST_HEAD:
            return relay_error("headers-too-large", f"request headers over {MAX_REQUEST_HEAD} bytes")
        host = normalize_host(request.headers.get("Host", ""))
        try:
            where = route(host, raw_target, self.origin)
        except BadTarget as exc:
            return relay_error("bad-request", str(exc))
        if isinstance(where, ApexRoute):
            if where.path.startswith(API_PREFIX):
                return await self.api(request)
            handler = self.apex_routes.get(where.path)
            if handler is None:
                return relay_error("not-found", "no such page on the relay server")
            return await handler(request)
        if not is_valid_name(where.name):
            return relay_error("unknown-tunnel", f"no tunnel is named {where.name[:64]!r}")
        if self.inflight.draining:
            return relay_error("tunnel-offline", "the relay server is shutting down")
        session = self.registry.pick(where.name)
        owner = session.user if session else await asyncio.to_thread(self.store.name_owner, where.name)
        if owner is None:
            return relay_error("unknown-tunnel", f"no tunnel is named {where.name!r}")
        with self.inflight.track():
            upgrade = is_websocket_upgrade(request.method, tuple(request.raw_headers))
            settings = await self.deliveries.settings(where.name)
            read_ahead = b""
            if self.deliveries.is_event(request, settings, upgrade):
                try:
                    head = self._request_head(request, where, upgrade)
                except RelayError as exc:  # ProtocolError from RequestHead: bad header bytes
                    return relay_error("bad-request", f"request cannot be forwarded: {exc}")
                answer = await self.deliveries.accept(
                    request,
                    where.name,
                    owner,
                    head,
                    settings,
                    functools.partial(self._write_response, request),
                )
                if isinstance(answer, web.StreamResponse):
                    return answer
                read_ahead = answer  # over the queue limit: it goes live, with what was read
                session = self.registry.pick(where.name)
            if session is None:
                return relay_error("tunnel-offline", f"no agent is connected for {where.name!r}")
            return await self.forward(request, session, where, upgrade, read_ahead)

    def _request_head(self, request: web.Request, where: TunnelRoute, upgrade: bool) -> RequestHead:
        headers = without(strip_hop_by_hop(tuple(request.raw_headers)), *_CONSUMED)
        if upgrade:  # the agent runs its own handshake with the local service
            headers = (*without(headers, *WEBSOCKET_HANDSHAKE), (b"Upgrade", b"websocket"))
        added = [
            (b"X-Forwarded-For", (request.remote or "").encode()),
            (b"X-Forwarded-Proto", self.origin.scheme.encode()),
            (b"X-Forwarded-Host", request.headers.get("Host", "").encode("utf-8", "replace")),
        ]
        if where.prefix:
            added.append((b"X-Forwarded-Prefix", where.prefix.encode()))
        return RequestHead(
            method=request.method,
            target=where.target.encode("utf-8", "surrogateescape"),
            headers=headers + tuple(added),
            client=request.remote or "",
        )

    async def forward(
        self,
        request: web.Request,
        session: AgentSession,
        where: TunnelRoute,
        upgrade: bool,
        read_ahead: bytes = b"",
    ) -> web.StreamResponse:
        """Stream ``request`` (``read_ahead``: its first body bytes, already read)
        to ``session``'s agent and its response back."""
        try:
            head = self._request_head(request, where, upgrade)
        except RelayError as exc:  # ProtocolError from RequestHead: bad header bytes
            return relay_error("bad-request", f"request cannot be forwarded: {exc}")
        has_body = request.body_exists or bool(read_ahead)
        # --timeout covers opening the stream too: an agent that stops reading
        # makes ``open`` wait, and the client must still get its 504 in time.
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                # An upgrade keeps the request half open: websocket messages follow the 101.
                stream = await session.open(head, end_stream=not (has_body or upgrade))
        except TimeoutError:
            return self._timed_out()
        except StreamFailed as exc:
            if session.closed:
                return relay_error("tunnel-offline", f"no agent is connected for {where.name!r}")
            return relay_error("too-many-requests", f"the agent is busy: {exc}")
        pump = (
            asyncio.create_task(self._pump_body(request, session, stream, read_ahead)) if has_body else None
        )
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    response_head = await asyncio.shield(stream.head)
            except TimeoutError:
                return self._timed_out()
            except StreamFailed as exc:
                return self._failure_response(exc, where.name)
            if upgrade and response_head.status == 101:
                return await relay_websocket(request, session, stream, response_head, self.idle_timeout)
            return await self._write_response(request, session, stream, response_head)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            await session.finish(stream)

    async def _pump_body(
        self, request: web.Request, session: AgentSession, stream: Stream, read_ahead: bytes
    ) -> None:
        try:
            if read_ahead:
                await session.send_body(stream, read_ahead)
            async for chunk in request.content.iter_chunked(MAX_DATA_SIZE):
                await session.send_body(stream, chunk)
            await session.send_body(stream, b"", end=True)
        except StreamFailed:
            pass  # the response side reports it
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            log.info("stream %s: public client body failed: %s", stream.id, exc)
            stream.fail(StreamFailed("public client went away"))

    def _timed_out(self) -> web.Response:
        return relay_error("local-timeout", f"the local service did not answer within {self.timeout:g}s")

    def _failure_response(self, exc: StreamFailed, name: str) -> web.Response:
        if exc.code is None:
            return relay_error("tunnel-offline", f"the agent for {name!r} disconnected: {exc}")
        if exc.code == RESET_TARGET_TIMEOUT:
            return relay_error("local-timeout", f"the local service timed out: {exc}")
        if exc.code == RESET_TARGET_UNREACHABLE:
            return relay_error("local-unreachable", f"the local service is unreachable: {exc}")
        return relay_error("local-unreachable", f"the request failed at the agent: {exc}")

    async def _write_response(
        self,
        request: web.Request,
        session: AgentSession,
        stream: Stream,
        head: ResponseHead,
    ) -> web.StreamResponse:
        response = RelayedResponse(status=head.status)
        for name, value in strip_hop_by_hop(head.headers):
            response.headers.add(_text(name), _text(value))
        await response.prepare(request)
        try:
            while True:
                async with asyncio.timeout(self.idle_timeout):
                    chunk = await stream.read()
                if not chunk:
                    break
                await response.write(chunk)
                await session.consumed(stream, len(chunk))
        except (StreamFailed, TimeoutError) as exc:
            # Too late for an error status: cut the connection so the client
            # sees a truncated response instead of a complete-looking one.
            log.info("stream %s failed mid-response: %s", stream.id, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
