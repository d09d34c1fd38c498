"""HTTP/1.1 to the local service: the agent's own client for forwarded requests.

aiohttp's client did this before, and a third of the agent's time on a small webhook went
to it (a ClientRequest, a ClientResponse, a payload object, timers and traces per request,
measured with py-spy). Here a request head goes out as the bytes it was given, with its body
in the same write when the whole body is already at hand, and the answer is parsed by
llhttp (``httptools``, as uvicorn does), over pooled keep-alive connections that follow
``pool.py``'s rules (both loopbacks for ``localhost``, happy eyeballs, an idle connection
closed after ``REUSE_IDLE``, a closed one found by a peek before anything is written on it).
WebSocket upgrades still go through aiohttp's ``ws_connect`` (``forward.py``).

What it guarantees, as aiohttp's client did: header names and values byte for byte and in
order (nothing added but ``Transfer-Encoding: chunked`` when a body of unknown length goes
to the service); no body read after HEAD, 204 or 304; 1xx interim answers skipped (101
excepted); bodies decoded from chunked and streamed as they arrive, with back-pressure both
ways; the response head within ``MAX_RESPONSE_HEADER_LINE`` per field and
``MAX_RESPONSE_HEADERS`` fields, else ``BadResponse``.

Errors, each with a message a user can act on (``forward.py`` turns them into RESET codes):
``ConnectFailed`` (every address refused, or the name does not resolve), ``ConnectTimeout``,
``TlsFailed``, ``ClosedUnanswered`` (the service closed the connection before a byte of an
answer), ``BadResponse``, ``BodyCut`` (the answer ended before its length), ``ReadTimeout``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohappyeyeballs
import httptools

from relay_protocol.heads import Headers

from .pool import HAPPY_EYEBALLS_DELAY, REUSE_IDLE, addresses, closed_by_peer
from .target import Target

#: Seconds to connect to the local service (every address, TLS included) before giving up.
CONNECT_TIMEOUT = 10.0
#: Seconds the local service may stay silent mid-request before the agent gives up (504).
#: Longer than the server's default idle limit, which acts first.
READ_TIMEOUT = 600.0
#: Longest response header field (name and value), as the relay's limit on a request
#: header line (``MAX_HEADER_LINE`` of relay_server.ingress): an answer as large as a
#: request the relay takes passes.
MAX_RESPONSE_HEADER_LINE = 16 * 1024
#: Most header fields in a response: the relay's limit on a request
#: (``MAX_REQUEST_HEADERS`` of relay_server.ingress), below the protocol's MAX_HEADER_COUNT.
MAX_RESPONSE_HEADERS = 240
#: Response body bytes read from the service and not yet taken by the relay, above which
#: the agent stops reading its socket (back-pressure up to the local service): one
#: stream window of the protocol.
READ_HIGH_WATER = 256 * 1024
#: Seconds a name's addresses are reused before it is resolved again.
ADDRESS_TTL = 10.0
#: Methods whose response never has a body (RFC 9110 9.3.2).
_NO_BODY_METHODS = frozenset({"HEAD"})
_CRLF = b"\r\n"


class LocalError(Exception):
    """The request to the local service failed; the message says how, for a user."""


class ConnectFailed(LocalError):
    """No connection: every address refused or unreachable, or the name does not resolve.
    ``error`` is the OSError (``socket.gaierror`` for a name)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class ConnectTimeout(LocalError):
    """No connection within ``CONNECT_TIMEOUT``."""


class TlsFailed(LocalError):
    """The TLS handshake failed; ``error`` is the ``ssl.SSLError``."""

    def __init__(self, error: ssl.SSLError) -> None:
        super().__init__(str(error))
        self.error = error


class ClosedUnanswered(LocalError):
    """The service closed (or reset) the connection before a byte of an answer."""


class BadResponse(LocalError):
    """The service answered with something that is not HTTP/1.1 the agent can relay."""


class BodyCut(LocalError):
    """The answer's body ended before its length (the connection closed)."""


class ReadTimeout(LocalError):
    """The service said nothing for ``READ_TIMEOUT`` seconds."""


@dataclass
class Response:
    """A response head from the local service, and its body as it arrives (``chunks``)."""

    status: int
    headers: Headers
    _connection: LocalConnection = field(repr=False)

    async def read(self) -> bytes:
        """The next body bytes as they arrive; b"" at the body's end. Raises ``LocalError``."""
        return await self._connection.read()

    def at_end(self) -> bool:
        """True if the body's end arrived and every byte of it was read."""
        return self._connection.message_done and not self._connection._chunks

    def take_whole(self, limit: int) -> bytes | None:
        """The body's bytes not read yet, if its end arrived and they are at most ``limit``
        bytes (``read`` then returns b""); else None, and nothing changes."""
        return self._connection.take_whole(limit)


class LocalConnection(asyncio.Protocol):
    """One connection to the local service; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[tuple[int, Headers]] | None = None
        self._head_only = False  # HEAD: the head is the whole answer
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._error: LocalError | None = None
        self._eof_body = False  # neither Content-Length nor chunked: the body ends at close
        self.message_done = False
        self.keep_alive = False
        #: The whole request (head and body) was written: set by the caller.
        self.request_done = False
        self._read_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass: no isinstance).
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        parser = self._parser
        if parser is None or self.message_done:
            self._fail(BadResponse("the local service sent bytes nobody asked for"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self._fail(self._error or BadResponse("the agent cannot parse the response"))
        except httptools.HttpParserUpgrade:
            pass  # a 101: the head is out, the rest is not HTTP (the relay refuses it)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"the agent cannot parse the response: {exc}"))

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._ended(exc)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._timer is not None:
            self._timer.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- llhttp callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) + 2 > MAX_RESPONSE_HEADER_LINE:
            self._error = BadResponse(
                f"the agent cannot parse the response: a header over {MAX_RESPONSE_HEADER_LINE} bytes"
            )
            raise ValueError("header too long")
        if len(self._headers) >= MAX_RESPONSE_HEADERS:
            self._error = BadResponse(
                f"the agent cannot parse the response: over {MAX_RESPONSE_HEADERS} header fields"
            )
            raise ValueError("too many headers")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._head is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []  # an interim answer (100 Continue, 103): the final one follows
            return
        headers = tuple(self._headers)
        names = {name.lower() for name, _ in headers}
        # RFC 9112 6.1: an HTTP/1.0 answer with Transfer-Encoding has faulty framing; the
        # connection is closed after it, never used for another request.
        self.keep_alive = (
            status != 101
            and self._parser.should_keep_alive()
            and not (b"transfer-encoding" in names and self._parser.get_http_version() == "1.0")
        )
        self._eof_body = b"content-length" not in names and b"transfer-encoding" not in names
        if not self._head.done():
            self._head.set_result((status, headers))
        if self._head_only or status in (204, 304) or status == 101:
            self._done()

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            return
        self._chunks.append(body)
        self._queued += len(body)
        if self._queued > READ_HIGH_WATER and not self._read_paused and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is not None and self._head.done():
            self._done()

    # -- the exchange ---------------------------------------------------------------------

    def start(self, method: str) -> asyncio.Future[tuple[int, Headers]]:
        """Get ready for the answer to a request about to be written."""
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._head = self.loop.create_future()
        self._head_only = method in _NO_BODY_METHODS
        self._chunks.clear()
        self._queued = 0
        self._error = None
        self.message_done = False
        self.keep_alive = False
        self.request_done = False
        self._last_read = self.loop.time()
        self._watch()
        return self._head

    async def write(self, data: bytes) -> None:
        """Write request bytes, waiting while the service does not take them."""
        if self.closed or self.transport is None:
            raise self._error or ClosedUnanswered("the local service closed the connection")
        self.transport.write(data)
        if self._write_paused:
            self._drained = self.loop.create_future()
            await self._drained
            self._drained = None
            if self.closed:
                raise self._error or BodyCut("the local service closed the connection")

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= len(chunk)
                if self._read_paused and self._queued <= READ_HIGH_WATER // 2 and self.transport is not None:
                    self.transport.resume_reading()
                    self._read_paused = False
                return chunk
            if self.message_done:
                return b""
            if self._error is not None:
                raise self._error
            self._wakeup = self.loop.create_future()
            await self._wakeup
            self._wakeup = None

    def take_whole(self, limit: int) -> bytes | None:
        """``Response.take_whole``."""
        if not self.message_done or self._queued > limit:
            return None
        whole = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._queued = 0
        if self._read_paused and self.transport is not None:
            self.transport.resume_reading()
            self._read_paused = False
        return whole

    def _done(self) -> None:
        self.message_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: LocalError) -> None:
        if self._error is None:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(self._error)
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _ended(self, exc: Exception | None = None) -> None:
        """The service closed the connection (or it broke)."""
        head = self._head
        if head is None or self.message_done:
            return
        if not head.done():
            head.set_exception(ClosedUnanswered("the local service closed the connection without answering"))
        elif self._eof_body:
            self._done()  # a body without a length ends when the connection does
            return
        elif self._error is None:
            why = f": {exc}" if exc else ""
            self._error = BodyCut(f"the local service's response ended before its end{why}")
        self._wake()

    def _watch(self) -> None:
        """One timer per exchange: moved on lazily, never re-armed per read."""
        if self._timer is None:
            self._timer = self.loop.call_at(self._last_read + READ_TIMEOUT, self._check_silence)

    def _check_silence(self) -> None:
        self._timer = None
        if self.message_done or self.closed:
            return
        if self.loop.time() - self._last_read >= READ_TIMEOUT:
            self._fail(ReadTimeout(f"no answer within {READ_TIMEOUT:g}s"))
            return
        self._watch()

    def reusable(self) -> bool:
        return (
            self.message_done
            and self.request_done
            and self.keep_alive
            and not self.closed
            and self._error is None
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class LocalClient:
    """Requests to one local service (``target``) over pooled keep-alive connections."""

    def __init__(self, target: Target, tls: ssl.SSLContext | bool) -> None:
        self.target = target
        self.tls = tls
        self._idle: dict[str | None, list[LocalConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._addresses: list[tuple[str, int]] = []
        self._resolved_at = -ADDRESS_TTL
        #: The address the last new connection reached: tried first by the next one (for
        #: ``localhost``, ``::1`` comes first, and an app listening on IPv4 only refused
        #: it on every new connection: a failed attempt and, under uvloop, a thread hop).
        self._reached: str | None = None
        self._unverified = _unverified()

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()

    async def request(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        server_hostname: str | None,
    ) -> tuple[Response, asyncio.Task[None] | None]:
        """Send ``head`` (the request line and headers, exact bytes, ending with the blank
        line) and ``body`` (whole bytes, already framed, or chunks to send as they come);
        return the response head once it arrives, with the task still writing the body
        (None if it went with the head). Raises ``LocalError``."""
        connection = await self._connection(server_hostname)
        head_future = connection.start(method)
        writer: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                await connection.write(head + body if body else head)
                connection.request_done = True
            else:
                await connection.write(head)
                writer = asyncio.create_task(_write_body(connection, body))
            status, headers = await head_future
        except BaseException:
            connection.close()
            if writer is not None:
                writer.cancel()
            raise
        return Response(status, headers, connection), writer

    def release(self, response: Response, server_hostname: str | None) -> None:
        """Give a response's connection back: pooled if it may carry another request."""
        connection = response._connection
        if not connection.reusable():
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(server_hostname, []).append(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(REUSE_IDLE, self._close_idle)

    def _close_idle(self) -> None:
        """Close connections idle for ``REUSE_IDLE``: before the service closes them."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connections in self._idle.values():
            while connections and now - connections[0].idle_since >= REUSE_IDLE:
                connections.pop(0).close()
        if any(self._idle.values()):
            self._sweep = loop.call_later(REUSE_IDLE, self._close_idle)

    async def _connection(self, server_hostname: str | None) -> LocalConnection:
        idle = self._idle.get(server_hostname)
        loop = asyncio.get_running_loop()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if (
                connection.closed
                or loop.time() - connection.idle_since >= REUSE_IDLE
                or closed_by_peer(connection.transport)
            ):
                connection.close()
                continue
            return connection
        return await self._connect(server_hostname)

    async def _connect(self, server_hostname: str | None) -> LocalConnection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if self.target.scheme == "https":
            tls = self.tls if isinstance(self.tls, ssl.SSLContext) else self._unverified
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                infos = await self._address_infos(loop)
                sock = await aiohappyeyeballs.start_connection(
                    infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
                )
                try:
                    self._reached = sock.getpeername()[0]
                    _, connection = await loop.create_connection(
                        lambda: LocalConnection(loop),
                        sock=sock,
                        ssl=tls,
                        server_hostname=(server_hostname or self.target.host) if tls else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError as exc:
            why = f"no connection to {self.target.base_url} within {CONNECT_TIMEOUT:g}s"
            raise ConnectTimeout(why) from exc
        except ssl.SSLError as tls_error:
            raise TlsFailed(tls_error) from tls_error
        except OSError as error:
            raise ConnectFailed(error) from error
        return connection

    async def _address_infos(self, loop: asyncio.AbstractEventLoop) -> list[aiohappyeyeballs.AddrInfoType]:
        if loop.time() - self._resolved_at >= ADDRESS_TTL or not self._addresses:
            self._addresses = await addresses(self.target.host, self.target.port)
            self._resolved_at = loop.time()
        infos: list[aiohappyeyeballs.AddrInfoType] = []
        tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        for address, port in self._addresses:
            if ":" in address:
                host, _, scope = address.partition("%")
                scope_id = socket.if_nametoindex(scope) if scope and not scope.isdigit() else int(scope or 0)
                infos.append((socket.AF_INET6, *tcp, (host, port, 0, scope_id)))
            else:
                infos.append((socket.AF_INET, *tcp, (address, port)))
        # The address reached last goes first; the others keep their order behind it.
        infos.sort(key=lambda info: info[4][0] != self._reached)
        return infos


async def _write_body(connection: LocalConnection, body: AsyncIterator[bytes]) -> None:
    """Stream a request body (already framed by the caller's iterator)."""
    async for chunk in body:
        await connection.write(chunk)
    connection.request_done = True


def _unverified() -> ssl.SSLContext:
    """TLS to a local service whose certificate is not checked (the default: pool.py)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def request_head(method: str, target: bytes, headers: Headers, chunked: bool) -> bytes:
    """The request line and header block, as bytes: every header exactly as given, in
    order, then ``Transfer-Encoding: chunked`` if ``chunked``, then the blank line."""
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in headers)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"")
    lines.append(b"")
    return _CRLF.join(lines)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (RFC 9112 7.1); b"" is the last chunk."""
    if not data:
        return b"0\r\n\r\n"
    return b"%x\r\n%s\r\n" % (len(data), data)
