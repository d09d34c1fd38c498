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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import HttpVersion11, web

from relay_protocol import LocalProtocolError, RelayError, RequestHead, ResponseHead, TooManyStreams
from relay_protocol.frames import RESET_BAD_RESPONSE, RESET_TARGET_TIMEOUT, RESET_TARGET_UNREACHABLE
from relay_protocol.headers import (
    WEBSOCKET_HANDSHAKE,
    header_value,
    is_websocket_upgrade,
    strip_hop_by_hop,
    transfer_coding_problem,
    without,
)
from relay_protocol.limits import MAX_DATA_SIZE, MAX_HEAD_SIZE, MAX_HEADER_COUNT

from .access import REQUEST_ID, ROUTE, TUNNEL
from .attempts import EVENT_HEADERS
from .config import Network
from .connections import forwarded_client, forwarded_for, trusts
from .delivery import Deliveries
from .expect import send_continue
from .names import BadHost, PublicOrigin, is_valid_name, normalize_host
from .public_errors import relay_error
from .registry import InFlight, Registry
from .relayed import RelayedResponse
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
#: Most header fields in one public request; the protocol allows 256, and the relay
#: adds X-Request-Id, up to four X-Forwarded-* fields (and a queued delivery three X-Relay-*).
MAX_REQUEST_HEADERS = 240
#: Longest request target (path and query): RFC 9112 asks for at least 8000 octets,
#: and with it the target, the 32 KiB of headers and what the relay adds always fit
#: in the protocol's MAX_HEAD_SIZE. Longer ones get 414 before a stream is opened.
MAX_REQUEST_TARGET = 8 * 1024
#: Bytes and fields of every forwarded head kept free for what a queued delivery adds
#: to it (X-Relay-Event-Id, X-Relay-Attempt, X-Relay-Received-At): a request that is
#: forwarded once can be delivered again.
HEAD_RESERVE = 512
HEADER_COUNT_RESERVE = len(EVENT_HEADERS)

#: Methods a tunnel never forwards: CONNECT would open a raw tunnel through
#: the agent, TRACE reflects headers (cross-site tracing).
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

#: Headers that say where a request came from. From a peer that is not a trusted
#: proxy they are dropped (with every other X-Forwarded-*): the relay sets its own.
_PROXY_HEADERS = (b"forwarded", b"x-real-ip")
#: What the relay sets itself from a trusted proxy's headers (the rest of theirs pass).
_FORWARDED_SET = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix")
# Consumed by the relay: it answers "Expect: 100-continue" itself (expect.py), and the
# X-Relay-* headers of a delivery are the relay's alone (apps deduplicate on them).
_CONSUMED = (b"expect", *EVENT_HEADERS)
#: Request headers never forwarded as the client sent them (besides hop-by-hop ones):
#: the relay sets X-Request-Id and X-Forwarded-* itself. From a peer that is not a
#: trusted proxy, every X-Forwarded-* (a prefix) and the other proxy headers go too.
_DROPPED_BEHIND_PROXY = frozenset({*_CONSUMED, b"x-request-id", *_FORWARDED_SET})
_DROPPED = frozenset({*_CONSUMED, b"x-request-id", *_PROXY_HEADERS})
#: Response headers the relay never passes on: X-Relay-Error names the relay's own
#: errors, so an agent or app may not forge one.
_RELAY_ONLY_RESPONSE = (b"x-relay-error",)
# A field value as RFC 9110 5.5 allows it: VCHAR, obs-text, SP and HTAB. Anything
# else (control characters) is refused, both ways.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
#: Statuses whose responses never have a body (RFC 9110 6.4.1), besides any answer to HEAD.
_NO_BODY_STATUSES = frozenset({204, 304})

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


class Refused(RelayError):
    """A public request the relay refuses with the relay error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def response(self) -> web.Response:
        return relay_error(self.code, str(self))


class BadResponse(RelayError):
    """The agent's response head cannot be framed for the public client (a 502)."""


def encoded_head_size(head: RequestHead) -> int:
    """Bytes of ``head`` in an OPEN frame (relay_protocol.heads' layout), without building it."""
    fields = 1 + len(head.method) + 2 + len(head.target) + 1 + len(head.client) + 1 + len(head.event_id)
    return fields + 2 + sum(4 + len(name) + len(value) for name, value in head.headers)


def check_head_fits(head: RequestHead) -> None:
    """Raise ``Refused`` (414 or 431) unless ``head``, plus what a queued delivery adds,
    fits in one OPEN frame: checked before a stream is opened, so a public request can
    never make the relay spend a stream id on a head it cannot send."""
    if len(head.target) > MAX_REQUEST_TARGET:
        raise Refused("uri-too-long", f"request target over {MAX_REQUEST_TARGET} bytes")
    if len(head.headers) > MAX_HEADER_COUNT - HEADER_COUNT_RESERVE:
        raise Refused("headers-too-large", "too many request headers")
    size = encoded_head_size(head)
    if size > MAX_HEAD_SIZE - HEAD_RESERVE:
        raise Refused("headers-too-large", f"request head of {size} bytes is over the relay's limit")


def response_framing(method: str, head: ResponseHead) -> tuple[bool, int | None]:
    """Whether the response to a ``method`` request has a body, and its Content-Length
    (None: delimited by the end of the stream). The relay frames every response
    itself: an agent cannot smuggle a second response into a client's connection.

    Raises ``BadResponse`` for a 1xx final status, conflicting or invalid
    Content-Length values, Content-Length together with Transfer-Encoding, or a body in
    a transfer coding other than chunked (``transfer_coding_problem``).
    (A 101 answering a WebSocket upgrade never gets here.)
    """
    if head.status < 200:
        raise BadResponse(f"status {head.status} is not a final answer to this request")
    lengths = {
        item.strip()
        for name, value in head.headers
        if name.lower() == b"content-length"
        for item in value.split(b",")
    }
    coded = any(name.lower() == b"transfer-encoding" for name, _ in head.headers)
    if coded and lengths:
        raise BadResponse("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise BadResponse("conflicting Content-Length values")
    length = None
    if lengths:
        (text,) = lengths
        if not text.isdigit() or len(text) > 18:
            raise BadResponse(f"invalid Content-Length {text[:32]!r}")
        length = int(text)
    has_body = method != "HEAD" and head.status not in _NO_BODY_STATUSES
    if coded and has_body and (problem := transfer_coding_problem(head.headers)):
        raise BadResponse(problem)  # relay-agent never sends one: another agent might
    return has_body, length


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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        trusted_proxies: tuple[Network, ...] = (),
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
        self.trusted_proxies = trusted_proxies

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_target = request.raw_path
        if request.method in REFUSED_METHODS:
            return relay_error("method-not-allowed", f"{request.method} is not forwarded")
        if not raw_target.startswith("/"):
            # aiohttp would route "GET http://bob.example/x" by the URL's host,
            # not by the Host header: refuse absolute-form and asterisk-form.
            return relay_error("bad-request", "the request target must be a path (origin-form)")
        if len(raw_target) > MAX_REQUEST_TARGET:
            return relay_error("uri-too-long", f"request target over {MAX_REQUEST_TARGET} bytes")
        if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > MAX_REQUEST_HEAD:
            return relay_error("headers-too-large", f"request headers over {MAX_REQUEST_HEAD} bytes")
        if (bad := _control_characters(request.raw_headers)) is not None:
            return relay_error("bad-request", f"control characters in header {bad}")
        if "Transfer-Encoding" in request.headers and (refused := _framing_refusal(request)) is not None:
            # Nothing after this request is read as another: aiohttp reads what is left
            # of its body (for its lingering time at most) and closes the connection.
            refused.force_close()
            return refused
        try:
            host = normalize_host(_host_header(request).decode("latin-1"))
            where = route(host, raw_target, self.origin)
        except (BadHost, BadTarget) as exc:
            return relay_error("bad-request", str(exc))
        if isinstance(where, ApexRoute):
            if where.path.startswith(API_PREFIX):
                request[ROUTE] = "api"
                return await self.api(request)
            handler = self.apex_routes.get(where.path)
            if handler is None:
                return relay_error("not-found", "no such page on the relay server")
            return await handler(request)
        request[ROUTE] = "tunnel"
        if not is_valid_name(where.name):
            return relay_error("unknown-tunnel", f"no tunnel is named {where.name[:64]!r}")
        if self.inflight.draining:
            return relay_error("tunnel-offline", "the relay server is shutting down")
        session = self.registry.pick(where.name)
        owner = session.user if session else await asyncio.to_thread(self.store.name_owner, where.name)
        if owner is None:
            return relay_error("unknown-tunnel", f"no tunnel is named {where.name!r}")
        request[TUNNEL] = where.name
        with self.inflight.track():
            upgrade = is_websocket_upgrade(request.method, tuple(request.raw_headers))
            if upgrade and request.body_exists:
                # RFC 9110 7.8: the protocol switches after the request's last byte. Relayed,
                # its body would reach the stream as websocket messages of the client's making.
                refused = relay_error("bad-request", "a WebSocket upgrade request carries no body")
                refused.force_close()
                return refused
            settings = await self.deliveries.settings(where.name)
            read_ahead = b""
            if self.deliveries.is_event(request, settings, upgrade):
                try:
                    head = self._request_head(request, where, upgrade)
                except Refused as refusal:
                    return refusal.response()
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
        """The head to forward: the client's headers, byte for byte, less hop-by-hop
        and relay-owned ones, plus X-Forwarded-*. Raises ``Refused`` (400, 414, 431)
        for a head the protocol cannot carry, before any stream exists."""
        raw = tuple(request.raw_headers)
        peer = request.remote or ""
        host = _host_header(request)
        drop_prefixes: tuple[bytes, ...]
        if trusts(self.trusted_proxies, peer):
            # A front proxy we trust: its chain is kept and it is appended, and what it
            # says about the scheme and host the client used is believed.
            chain = forwarded_for(raw)
            for_chain = b", ".join([*chain, peer.encode()])
            proto = header_value(raw, b"x-forwarded-proto") or self.origin.scheme.encode()
            forwarded_host = header_value(raw, b"x-forwarded-host") or host
            client = forwarded_client(self.trusted_proxies, peer, chain)
            drop, drop_prefixes = _DROPPED_BEHIND_PROXY, ()
        else:
            # Anyone else's say on where the request came from is dropped.
            for_chain, proto, forwarded_host, client = (
                peer.encode(),
                self.origin.scheme.encode(),
                host,
                peer,
            )
            drop, drop_prefixes = _DROPPED, (b"x-forwarded-",)
        if upgrade:  # the agent runs its own handshake with the local service
            drop = drop.union(WEBSOCKET_HANDSHAKE)
        headers = strip_hop_by_hop(raw, drop=drop, drop_prefixes=drop_prefixes)
        if upgrade:
            headers += ((b"Upgrade", b"websocket"),)
        added = [
            (b"X-Request-Id", request[REQUEST_ID].encode()),
            (b"X-Forwarded-For", for_chain),
            (b"X-Forwarded-Proto", proto),
            (b"X-Forwarded-Host", forwarded_host),
        ]
        if where.prefix:
            added.append((b"X-Forwarded-Prefix", where.prefix.encode()))
        try:
            head = RequestHead(
                method=request.method,
                target=where.target.encode("utf-8", "surrogateescape"),
                headers=headers + tuple(added),
                client=client,
            )
        except LocalProtocolError as exc:  # BadHead: a head the protocol cannot carry
            raise _refusal(exc) from exc
        except RelayError as error:
            raise Refused("bad-request", f"request cannot be forwarded: {error}") from error
        check_head_fits(head)
        return head

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
        except Refused as exc:
            return exc.response()
        has_body = request.body_exists or bool(read_ahead)
        whole = b""
        if has_body and not upgrade and request.content.is_eof():
            # A small body that came whole with its head (a webhook's, as a rule) goes in
            # the OPEN itself: one frame, no task, no 100 Continue (RFC 9110 10.1.1: the
            # server may omit it once the body came). A larger one is sent below.
            read_ahead += request.content.read_nowait()
            # An empty body (chunked, "0"): OPEN and an empty DATA, as the protocol has no
            # other way to say a body was framed (the app then gets it chunked, as sent).
            if 0 < len(read_ahead) <= MAX_DATA_SIZE:
                whole, read_ahead, has_body = read_ahead, b"", False
        # --timeout covers opening the stream too: an agent that stops reading
        # makes ``open`` wait, and the client must still get its 504 in time.
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            # An upgrade keeps the request half open: websocket messages follow the 101.
            end_stream = not (has_body or upgrade)
            if session.can_open_now:  # no wait, no timer (a timeout is 5 % of a request)
                stream = await session.open(head, end_stream, whole)
            else:
                async with asyncio.timeout_at(deadline):
                    stream = await session.open(head, end_stream, whole)
        except TimeoutError:
            return self._timed_out()
        except StreamFailed as failed:
            if session.closed:
                return relay_error("tunnel-offline", f"no agent is connected for {where.name!r}")
            return relay_error("too-many-requests", f"the agent is busy: {failed}")
        except LocalProtocolError as unsendable:
            # Refused before a stream id was spent (the head was checked above; this
            # is the protocol's own word on it): the tunnel is untouched.
            if session.closed:
                return relay_error("tunnel-offline", f"no agent is connected for {where.name!r}")
            return _refusal(unsendable).response()
        pump = None
        # From here on the stream is the relay's to finish, however this ends (a client
        # gone before its 100 Continue could be written leaked it: an attacker's review).
        try:
            if has_body:
                await send_continue(request)  # the stream is open: now the body is wanted
                pump = asyncio.create_task(self._pump_body(request, session, stream, read_ahead))
            try:
                async with asyncio.timeout_at(deadline):
                    # Not shielded: only this handler waits on the head, and a head that
                    # comes after it gave up finds the future done and is dropped.
                    response_head = await stream.head
            except TimeoutError:
                stream.reset_reason = f"no response head within {self.timeout:g}s (--timeout)"
                return self._timed_out()
            except StreamFailed as failed:
                return self._failure_response(failed, where.name)
            if upgrade and response_head.status == 101:
                # Checked as any relayed head is (a second review found the 101 was not):
                # a custom agent may send what relay-agent never does.
                headers = without(response_head.headers, *_RELAY_ONLY_RESPONSE, b"content-length")
                if (bad := _control_characters(headers)) is not None:
                    log.info("stream %s: bad 101 from the agent: control characters in %s", stream.id, bad)
                    return relay_error(
                        "local-bad-response",
                        f"the local service's response cannot be relayed: control characters in {bad}",
                    )
                response_head = ResponseHead(101, headers)
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
        if exc.code == RESET_BAD_RESPONSE:
            return relay_error("local-bad-response", f"the local service's response cannot be relayed: {exc}")
        return relay_error("local-unreachable", f"the request failed at the agent: {exc}")

    async def _write_response(
        self,
        request: web.Request,
        session: AgentSession,
        stream: Stream,
        head: ResponseHead,
    ) -> web.StreamResponse:
        """Write the agent's response, framed by the relay: no body where HTTP allows
        none (HEAD, 204, 304), exactly Content-Length bytes where one is given (the
        connection is closed on any mismatch), and a 502 for a head that cannot be
        framed, so nothing an agent sends can reach another request on the connection."""
        headers = strip_hop_by_hop(head.headers, drop=_RELAY_ONLY_RESPONSE)
        try:
            has_body, length = response_framing(request.method, head)
            if (bad := _control_characters(headers)) is not None:
                raise BadResponse(f"control characters in response header {bad}")
        except BadResponse as exc:
            log.info("stream %s: bad response from the agent: %s", stream.id, exc)
            return relay_error("local-bad-response", f"the local service's response cannot be relayed: {exc}")
        response = RelayedResponse(status=head.status)
        if has_body and length is None and request.version < HttpVersion11:
            # A body without a length to an HTTP/1.0 client ends with the connection
            # (RFC 9112 6.3). aiohttp drops the client's "Connection: keep-alive" from the
            # head then, but keeps the connection: the client would wait for the end, and a
            # pipelined request's answer would run on from this body.
            response.force_close()
        length_written = False
        for name, value in headers:
            if name.lower() == b"content-length":
                if length_written:
                    continue  # repeats of the same value (checked above) become one
                length_written = True
                value = str(length).encode()
            response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
        await response.prepare(request)
        if not has_body:
            # Whatever body the agent sends is dropped (the stream is reset on finish).
            await response.write_eof()
            return response
        whole = stream.take_whole(length)
        if whole is not None:  # a small answer, come whole: head and body in one write
            await response.write_eof(whole)
            return response
        sent = 0
        try:
            while True:
                if stream.has_chunk():
                    chunk = stream.read_nowait()
                else:
                    response.send_head()
                    async with asyncio.timeout(self.idle_timeout):
                        chunk = await stream.read()
                if not chunk:
                    break
                if length is not None and sent + len(chunk) > length:
                    await response.write(chunk[: length - sent])
                    return self._cut(
                        request, response, stream, f"body longer than its Content-Length {length}"
                    )
                await response.write(chunk)
                sent += len(chunk)
                await session.consumed(stream, len(chunk))
        except TimeoutError:
            stream.reset_reason = f"no body bytes for {self.idle_timeout:g}s (--idle-timeout)"
            return self._cut(request, response, stream, f"failed mid-response: {stream.reset_reason}")
        except StreamFailed as failed:
            # Too late for an error status: cut the connection so the client
            # sees a truncated response instead of a complete-looking one.
            return self._cut(request, response, stream, f"failed mid-response: {failed}")
        if length is not None and sent != length:
            return self._cut(request, response, stream, f"body of {sent} bytes, Content-Length {length}")
        await response.write_eof()
        return response

    def _cut(
        self, request: web.Request, response: web.StreamResponse, stream: Stream, why: str
    ) -> web.StreamResponse:
        """End a response that cannot be completed: close the client's connection, so it
        sees a truncated response and never reads what follows as another one."""
        log.info("stream %s: %s; closing the client's connection", stream.id, why)
        if isinstance(response, RelayedResponse):
            response.send_head()  # what was relayed of it, the head at least, reaches the client
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response


def _control_characters(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The name of the first header whose value has a control character (RFC 9110 5.5),
    printable, or None if none has. All values are matched at once, joined (the pattern
    is one character class repeated), then walked one by one only to name the culprit."""
    headers = tuple(headers)
    if _FIELD_VALUE.fullmatch(b"".join([value for _, value in headers])):
        return None
    name = next(name for name, value in headers if not _FIELD_VALUE.fullmatch(value))
    return name[:64].decode("latin-1")


def _framing_refusal(request: web.Request) -> web.Response | None:
    """The answer to a request whose Transfer-Encoding the relay cannot carry, or None:
    400 in HTTP/1.0 (RFC 9112 6.1: its framing is faulty; a proxy that took it would
    desync), 501 for a coding other than chunked (``transfer_coding_problem``)."""
    if request.version < HttpVersion11:
        return relay_error("bad-request", "Transfer-Encoding in an HTTP/1.0 request")
    if problem := transfer_coding_problem(tuple(request.raw_headers)):
        return relay_error("unsupported-transfer-coding", f"{problem} is not supported: only chunked")
    return None


def _host_header(request: web.Request) -> bytes:
    """The raw Host header; ``BadHost`` if there are several (RFC 9112 3.2)."""
    hosts = [value for name, value in request.raw_headers if name.lower() == b"host"]
    if len(hosts) > 1:
        raise BadHost("more than one Host header")
    return hosts[0].strip() if hosts else b""


def _refusal(exc: LocalProtocolError) -> Refused:
    """The public answer to a head the protocol refused to carry (``BadHead``)."""
    if isinstance(exc, TooManyStreams):
        return Refused("too-many-requests", f"the agent is busy: {exc}")
    part = getattr(exc, "part", None)  # HeadTooLarge says what was too large
    if part == "target":
        return Refused("uri-too-long", f"request cannot be forwarded: {exc}")
    if part is not None:
        return Refused("headers-too-large", f"request cannot be forwarded: {exc}")
    return Refused("bad-request", f"request cannot be forwarded: {exc}")
