"""Forward one stream's request to the local target with the shared aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import aiohttp
from yarl import URL

from relay_protocol import RelayError, RequestHead, ResponseHead
from relay_protocol.frames import (
    RESET_BAD_RESPONSE,
    RESET_REFUSED,
    RESET_TARGET_ERROR,
    RESET_TARGET_TIMEOUT,
    RESET_TARGET_UNREACHABLE,
)
from relay_protocol.headers import (
    WEBSOCKET_HANDSHAKE,
    header_value,
    is_websocket_upgrade,
    strip_hop_by_hop,
    transfer_coding_problem,
    without,
)
from relay_protocol.heads import Headers, check_response_head_size
from relay_protocol.limits import MAX_CONCURRENT_STREAMS, MAX_DATA_SIZE, MAX_WEBSOCKET_MESSAGE
from relay_protocol.messages import Kind, Message, MessageDecoder, encode_message

from .client import (
    CONNECT_TIMEOUT,
    MAX_RESPONSE_HEADER_LINE,
    MAX_RESPONSE_HEADERS,
    READ_TIMEOUT,
    BadResponse,
    BodyCut,
    ClosedUnanswered,
    ConnectFailed,
    ConnectTimeout,
    LocalClient,
    LocalError,
    ReadTimeout,
    TlsFailed,
    chunk,
    request_head,
)
from .config import AgentConfig
from .exact_request import ExactRequest, UnsendableHead, exact_headers, install_exact_serializer
from .pool import connector, explain_connect_failure
from .target import tls_name
from .tls import speaks_tls, tls_problem

#: Methods whose request may reach the service twice with the effect of once (RFC 9110
#: 9.2.2): the only ones sent again after the service closed the connection unanswered.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: How a certificate error with the local service can be mended.
FORWARD_CA_HINT = "without --forward-ca or --forward-verify it is not checked; to verify it, --forward-ca"
FORWARD_NAME_HINT = "check the --forward host, or --host-header"

#: Characters of a failure kept for the RESET reason and the log: the target's
#: garbage (a bad status line) must not flood either.
MAX_REASON = 400

# aiohttp adds these when the request lacks them; a tunnel must not.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# RFC 9110 5.5: a field value may not hold controls other than HTAB (nor DEL).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


#: Seconds to wait for the other side's CLOSE once one side of a websocket closed.
CLOSE_GRACE = 5.0
#: Close codes that report a condition and may not be sent in a CLOSE frame (RFC 6455 7.4.1).
_NOT_SENDABLE = frozenset({1005, 1006, 1015})
_KIND_OF = {
    aiohttp.WSMsgType.TEXT: Kind.TEXT,
    aiohttp.WSMsgType.BINARY: Kind.BINARY,
    aiohttp.WSMsgType.PING: Kind.PING,
    aiohttp.WSMsgType.PONG: Kind.PONG,
}


class Link(Protocol):
    """What the forwarder needs from the tunnel connection for one stream."""

    def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> Awaitable[None]:
        """Send the response head, and ``body`` (at most ``MAX_DATA_SIZE``) right with it;
        ``end``: nothing follows them."""

    def send_body(self, chunk: bytes, end: bool = False) -> Awaitable[None]: ...
    def reset(self, code: int, reason: str) -> Awaitable[None]: ...
    def body(self) -> AsyncIterator[bytes]: ...
    def whole_body(self) -> bytes | None:
        """The whole request body if its end has arrived (taken: ``body`` yields no
        more), else None."""


class ForwardFailed(Exception):
    """The target failed; ``code`` is the RESET code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason[:MAX_REASON] + ("..." if len(reason) > MAX_REASON else ""))
        self.code = code

    @property
    def status(self) -> int:
        """The status the public client sees: 504 for a timeout, else 502."""
        return 504 if self.code == RESET_TARGET_TIMEOUT else 502


# -- websocket upgrades: what the target answered, when it was not 101 -----------------

#: The target's answer to an upgrade when it is not a 101 (status, raw headers, body):
#: kept by the trace callbacks below, in the forwarding task's context.
_refusal: contextvars.ContextVar[tuple[int, Headers, bytes] | None] = contextvars.ContextVar(
    "relay_refusal", default=None
)


#: The headers of the target's 101, as it sent them (``_keep_answer``).
_upgraded: contextvars.ContextVar[Headers] = contextvars.ContextVar("relay_upgraded", default=())


class _NotUpgraded(Exception):
    """The target answered an upgrade with a redirect: it is not followed (the agent dials
    only its target), it goes back to the client."""


async def _keep_answer(
    session: aiohttp.ClientSession,
    context: object,
    params: aiohttp.TraceRequestEndParams | aiohttp.TraceRequestRedirectParams,
) -> None:
    """aiohttp trace callback (``on_request_end``, ``on_request_redirect``): keep the
    headers of a 101 and an answer that is not a 101, body included (``ws_connect`` keeps
    neither), and stop a redirect."""
    response = params.response
    if response.status == 101:
        _upgraded.set(tuple(response.raw_headers))
        return
    _refusal.set((response.status, tuple(response.raw_headers), await response.read()))
    if isinstance(params, aiohttp.TraceRequestRedirectParams):
        raise _NotUpgraded()


def _upgrade_traces() -> list[aiohttp.TraceConfig]:
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_keep_answer)
    trace.on_request_redirect.append(_keep_answer)
    return [trace]


def client_session(config: AgentConfig) -> aiohttp.ClientSession:
    """The agent's aiohttp session, for WebSocket upgrades to ``config.target`` (every
    other request goes through ``client.LocalClient``)."""
    install_exact_serializer()
    return aiohttp.ClientSession(
        connector=connector(config.forward_tls, MAX_CONCURRENT_STREAMS),
        auto_decompress=False,  # bodies pass byte for byte, Content-Encoding and all
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the public clients, not to us
        # No total limit: the server bounds the wait for a response head
        # (--timeout) and resets the stream; this only catches a dead target.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
        skip_auto_headers=_NO_AUTO_HEADERS,
        request_class=ExactRequest,
        trace_configs=_upgrade_traces(),
        max_line_size=MAX_RESPONSE_HEADER_LINE,
        max_field_size=MAX_RESPONSE_HEADER_LINE,
        max_headers=MAX_RESPONSE_HEADERS,
    )


def outgoing_headers(head: RequestHead, config: AgentConfig) -> Headers:
    """The request's headers as they go to the target: hop-by-hop ones removed, Host
    set by ``--host-header`` (in the place the client's Host had), all else as sent."""
    headers = strip_hop_by_hop(head.headers)
    if config.host_header == "preserve":
        return headers
    if config.host_header == "rewrite":
        host = config.target.authority.encode("latin-1")
    else:
        host = config.host_header.encode("utf-8")
    rewritten: list[tuple[bytes, bytes]] = []
    has_host = False
    for name, value in headers:
        if name.lower() == b"host":
            if has_host:
                continue  # only ever one Host
            has_host = True
            value = host
        rewritten.append((name, value))
    if not has_host:
        rewritten.insert(0, (b"Host", host))
    return tuple(rewritten)


def _response_head(status: int, headers: Headers, *, has_body: bool = True) -> ResponseHead:
    """The target's response head as it came, less hop-by-hop headers. Raises
    ``ForwardFailed`` if the protocol cannot carry it (over MAX_HEAD_SIZE, bad name), or
    its body is in a transfer coding the relay would undo unnamed (``has_body``: an
    answer to HEAD, a 204 or a 304 has none, and may name one: RFC 9112 6.1)."""
    if has_body and (problem := transfer_coding_problem(headers)):
        raise ForwardFailed(
            RESET_BAD_RESPONSE,
            f"the response cannot be relayed: {problem} (only chunked; a compressed body is"
            " sent with Content-Encoding)",
        )
    try:
        head = ResponseHead(status, strip_hop_by_hop(headers))
        check_response_head_size(head)
    except RelayError as exc:
        raise ForwardFailed(RESET_BAD_RESPONSE, f"the response head cannot be relayed: {exc}") from exc
    return head


def server_name(config: AgentConfig, headers: Headers) -> str | None:
    """The TLS server name (SNI, and the name the certificate must carry when verified)
    for an https:// target: it follows ``--host-header``, as the Host header does.
    None: the target's own host (``rewrite``), or an IP address (never sent as SNI).
    Raises ``ForwardFailed`` for a Host that is not a DNS name (``preserve``)."""
    if config.target.scheme != "https" or config.host_header == "rewrite":
        return None
    if config.host_header == "preserve":
        value = header_value(headers, b"host")
        host = value.decode("latin-1") if value else ""
    else:
        host = config.host_header
    if not host.strip():
        return None
    try:
        return tls_name(host)
    except ValueError as exc:
        raise ForwardFailed(RESET_REFUSED, f"no TLS server name: {exc}") from exc


def _closed_unanswered(exc: BaseException) -> bool:
    """The service closed or reset the connection before any byte of an answer."""
    if isinstance(exc, ClosedUnanswered | aiohttp.ServerDisconnectedError):
        return True
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
        and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )


def _failure(exc: BaseException, config: AgentConfig) -> ForwardFailed | None:
    """The ``ForwardFailed`` a client error means, with a reason a user can act on (what
    was tried, how it failed; no exception names), or None for an error of our own."""
    base = config.target.base_url
    if isinstance(exc, ConnectTimeout | ConnectFailed | aiohttp.ConnectionTimeoutError):
        if isinstance(exc, ConnectFailed):
            return ForwardFailed(RESET_TARGET_UNREACHABLE, explain_connect_failure(exc.error, config.target))
        return ForwardFailed(RESET_TARGET_UNREACHABLE, f"no connection to {base} within {CONNECT_TIMEOUT:g}s")
    if isinstance(exc, ReadTimeout | TimeoutError):
        return ForwardFailed(RESET_TARGET_TIMEOUT, f"no answer within {READ_TIMEOUT:g}s")
    if isinstance(exc, TlsFailed | aiohttp.ClientSSLError):
        if isinstance(exc, TlsFailed):
            error: BaseException = exc.error
        else:
            error = getattr(exc, "certificate_error", None) or exc.os_error
        problem = tls_problem(error, base, FORWARD_CA_HINT, FORWARD_NAME_HINT)
        return ForwardFailed(RESET_TARGET_ERROR, problem or f"TLS with {base} failed: {error}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ForwardFailed(RESET_TARGET_UNREACHABLE, explain_connect_failure(exc.os_error, config.target))
    if isinstance(exc, BadResponse):
        return ForwardFailed(RESET_BAD_RESPONSE, str(exc))
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's parser refused the response head (a line or field over the limits,
        # a bad status line): the target answered, with something the agent cannot relay.
        return ForwardFailed(RESET_BAD_RESPONSE, f"the agent cannot parse the response: {exc.message}")
    if _closed_unanswered(exc):
        return ForwardFailed(RESET_TARGET_ERROR, "the local service closed the connection without answering")
    if isinstance(exc, BodyCut | aiohttp.ClientPayloadError):
        return ForwardFailed(RESET_TARGET_ERROR, "the local service's response ended before its end")
    if isinstance(exc, OSError) and exc.strerror:
        return ForwardFailed(RESET_TARGET_ERROR, f"the connection to the local service broke: {exc.strerror}")
    if isinstance(exc, aiohttp.ClientError | OSError | LocalError):
        why = str(exc) or type(exc).__name__
        return ForwardFailed(RESET_TARGET_ERROR, f"the request to the local service failed: {why}")
    if isinstance(exc, UnsendableHead):  # a byte HTTP forbids: the relay should have refused it
        return ForwardFailed(RESET_REFUSED, f"unforwardable request head: {exc}")
    return None


async def forward(
    local: LocalClient,
    session: aiohttp.ClientSession,
    config: AgentConfig,
    head: RequestHead,
    has_body: bool,
    link: Link,
) -> int:
    """Send ``head`` (and the body ``link`` yields) to the target, stream the answer
    back through ``link``. Returns the status. Raises ``ForwardFailed``.

    ``local`` carries every request but WebSocket upgrades, which go through ``session``."""
    if is_websocket_upgrade(head.method, head.headers):
        return await forward_websocket(session, config, head, link)
    headers = outgoing_headers(head, config)
    if _CONTROL_BYTES.search(b"".join(value for _, value in headers)):
        # A byte HTTP forbids (the relay should have refused it): never split a head.
        raise ForwardFailed(RESET_REFUSED, "unforwardable request head: a control character in a header")
    sized = any(name.lower() == b"content-length" for name, _ in headers)
    body: bytes | AsyncIterator[bytes] | None = None
    if has_body:
        whole = link.whole_body()
        if whole is None:
            body = _Framed(link.body(), sized)
        else:
            body = whole if sized else (chunk(whole) if whole else b"") + chunk(b"")
    request = request_head(head.method, head.target, headers, chunked=has_body and not sized)
    sni = server_name(config, head.headers)
    # Sent again once if the service closed the connection without a word of answer: only
    # a bodiless request of an idempotent method (RFC 9110 9.2.2), which may safely reach
    # the service twice. (A pooled connection found closed is never used: client.py.)
    retries = 0 if has_body or head.method not in IDEMPOTENT_METHODS else 1
    try:
        while True:
            try:
                response, writer = await local.request(head.method, request, body, sni)
                break
            except ClosedUnanswered:
                if not retries:
                    raise
                retries -= 1
        try:
            no_body = head.method == "HEAD" or response.status in (204, 304)
            response_head = _response_head(response.status, response.headers, has_body=not no_body)
            # A small answer that came whole with its head (a webhook's, as a rule) goes
            # back in one frame with it.
            whole = None if no_body else response.take_whole(MAX_DATA_SIZE)
            await link.respond(response_head, end=no_body or whole is not None, body=whole or b"")
            if not no_body and whole is None:
                # Each chunk goes as it arrives (an event stream is never batched); the
                # body's end rides on the last one when it came with it.
                while data := await response.read():
                    end = response.at_end()
                    await link.send_body(data, end=end)
                    if end:
                        break
                else:
                    await link.send_body(b"", end=True)
        finally:
            if writer is not None and not writer.done():
                writer.cancel()  # answered before the body was sent: the connection is not reused
            if writer is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer  # its failure is the response's business, already reported
            local.release(response, sni)
        return response.status
    except (LocalError, OSError) as exc:
        failure = _failure(exc, config)
        if failure is None:
            raise exc  # named, as every raise in a handler that awaits (a bare one can crash compiled)
        target = config.target
        # Not HTTP on an http:// target: an HTTPS dev server behind the wrong scheme?
        not_http = isinstance(exc, ClosedUnanswered | BadResponse) and target.scheme == "http"
        if not_http and await speaks_tls(target.host, target.port):
            why = f"{target.authority} speaks TLS: forward to https://{target.authority}"
            raise ForwardFailed(RESET_TARGET_ERROR, why) from exc
        raise failure from exc


class _Framed:
    """A request body as it goes on the wire: as is with a Content-Length, else chunked.

    An iterator class, not an async generator: mypyc compiles no async generators."""

    def __init__(self, body: AsyncIterator[bytes], sized: bool) -> None:
        self._body = body
        self._sized = sized
        self._ended = False

    def __aiter__(self) -> _Framed:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        try:
            data = await anext(self._body)
        except StopAsyncIteration:
            self._ended = True
            if self._sized:
                raise
            return chunk(b"")  # the last chunk
        return data if self._sized else chunk(data)


async def forward_websocket(
    session: aiohttp.ClientSession, config: AgentConfig, head: RequestHead, link: Link
) -> int:
    """Open a websocket to the target for an upgrade request and relay its messages
    through ``link`` until either side closes. Returns 101, or the refusal status."""
    url = URL(config.target.url_for(head.target, websocket=True), encoded=True)
    offered = header_value(head.headers, b"sec-websocket-protocol") or b""
    protocols = [p.strip() for p in offered.decode("latin-1").split(",") if p.strip()]
    # aiohttp runs its own handshake with the target (key, version, the offered
    # protocols); every other header goes as the client sent it, byte for byte.
    handshake = (*WEBSOCKET_HANDSHAKE, b"sec-websocket-protocol", b"upgrade")
    exact = exact_headers.set(without(outgoing_headers(head, config), *handshake))
    _refusal.set(None)
    _upgraded.set(())
    try:
        ws = await session.ws_connect(
            url,
            protocols=protocols,
            autoping=False,  # pings and pongs are relayed end to end, not answered here
            max_msg_size=MAX_WEBSOCKET_MESSAGE,
            compress=0,
            server_hostname=server_name(config, head.headers),
        )
    except (aiohttp.WSServerHandshakeError, _NotUpgraded):
        # The target answered with something else than 101 (a 404, a redirect, which is
        # never followed): that answer goes back as it came, head and body.
        status, headers, body = _refusal.get() or (502, (), b"")
        await link.respond(_response_head(status, headers, has_body=status not in (204, 304)), end=not body)
        if body:
            await link.send_body(body, end=True)
        return status
    except (aiohttp.ClientError, OSError, TimeoutError, UnsendableHead) as exc:
        failure = _failure(exc, config)
        if failure is None:
            raise exc  # named, as every raise in a handler that awaits (a bare one can crash compiled)
        raise failure from exc
    finally:
        exact_headers.reset(exact)
    async with ws:
        # The target's own 101 headers go back (a Set-Cookie, say) but for the handshake's,
        # which the relay's two handshakes make: the protocol is the one it chose.
        chosen = ((b"Sec-WebSocket-Protocol", ws.protocol.encode("latin-1")),) if ws.protocol else ()
        own = without(strip_hop_by_hop(_upgraded.get()), *handshake, b"content-length")
        await link.respond(ResponseHead(101, (*own, *chosen)), end=False)
        to_target = asyncio.create_task(_server_to_target(ws, link))
        try:
            await _target_to_server(ws, link)
            # The target closed: the server may still be relaying the client's last words.
            await asyncio.wait({to_target}, timeout=CLOSE_GRACE)
        finally:
            to_target.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await to_target
    return 101


async def _server_to_target(ws: aiohttp.ClientWebSocketResponse, link: Link) -> None:
    decoder = MessageDecoder()
    async for data in link.body():
        for message in decoder.feed(data):
            if message.kind is Kind.CLOSE:
                code, reason = message.close_code()
                await ws.close(code=code if code not in _NOT_SENDABLE else 1000, message=reason.encode())
                return
            await ws.send_frame(message.payload, aiohttp.WSMsgType(message.kind))


async def _target_to_server(ws: aiohttp.ClientWebSocketResponse, link: Link) -> None:
    while True:
        msg = await ws.receive()
        if msg.type in _KIND_OF:
            data = (
                msg.data.encode() if msg.type is aiohttp.WSMsgType.TEXT else bytes(msg.data)
            )  # a ping: bytearray
            await link.send_body(encode_message(Message(_KIND_OF[msg.type], data)))
            continue
        if msg.type is aiohttp.WSMsgType.CLOSE:
            close = Message.close(msg.data, msg.extra or "")
        else:  # CLOSING, CLOSED (our own close completed), ERROR
            close = Message.close(ws.close_code or 1000)
        await link.send_body(encode_message(close), end=True)
        return
