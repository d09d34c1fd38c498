"""One attempt to deliver a stored event: to an agent over its tunnel, or to a URL.

An attempt ends in an ``Outcome``; it never raises for anything the destination or the
network did. ``--timeout`` bounds the whole of an attempt up to the response head:
opening the stream, sending the body and waiting for the answer, so a stuck agent costs
a sender ``--timeout``, not the heartbeat's 30 s. The SSRF-guarded HTTP client for URL
destinations lives here alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from relay_protocol import BadHead, RequestHead, ResponseHead
from relay_protocol.frames import RESET_BAD_RESPONSE, RESET_CANCEL, RESET_REFUSED
from relay_protocol.headers import header_value, strip_hop_by_hop, without
from relay_protocol.limits import MAX_DATA_SIZE

from .retry import parse_retry_after
from .session import AgentSession, Stream, StreamFailed
from .states import Outcome, clip_error, received_at_text
from .store import Event

#: Headers every delivery carries; the client's own values under these names are dropped.
EVENT_HEADERS = (b"x-relay-event-id", b"x-relay-attempt", b"x-relay-received-at")
#: Agent RESET codes that mean the request never reached the local app: the agent
#: refused the stream, or cancelled it before forwarding (shutting down).
_NOT_FORWARDED = frozenset({RESET_REFUSED, RESET_CANCEL})


def delivery_head(event: Event, attempt: int) -> RequestHead:
    """The stored request, unchanged, plus the three X-Relay-* headers of this attempt."""
    headers = (
        *without(event.headers, *EVENT_HEADERS),
        (b"X-Relay-Event-Id", event.id.encode()),
        (b"X-Relay-Attempt", str(attempt).encode()),
        (b"X-Relay-Received-At", received_at_text(event.received_at).encode()),
    )
    return RequestHead(event.method, event.target, headers, event.client, event.id)


@dataclass
class AgentExchange:
    """An attempt that got a response head from the agent: its stream is still open.

    The caller relays or drains the body, then calls ``finish``. ``pump`` is still
    sending the request body when the app answered before reading all of it.
    """

    session: AgentSession
    stream: Stream
    head: ResponseHead
    pump: asyncio.Task[None] | None

    async def finish(self) -> None:
        """Stop sending the body (if still going) and forget the stream."""
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump
        await self.session.finish(self.stream)

    async def drain(self, timeout: float) -> None:
        """Read and drop the answer's body (it is not kept) under flow control, then finish."""
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.stream.read():
                    await self.session.consumed(self.stream, len(chunk))
        except (StreamFailed, TimeoutError):
            pass
        finally:
            await self.finish()


async def attempt_agent(
    session: AgentSession, event: Event, attempt: int, timeout: float
) -> tuple[Outcome, AgentExchange | None]:
    """Send ``event`` to an agent; the outcome, and the exchange if a head came back."""
    stream: Stream | None = None
    pump: asyncio.Task[None] | None = None
    try:
        head = delivery_head(event, attempt)
    except BadHead as exc:  # with the X-Relay-* headers it no longer fits: it never will
        return Outcome(None, f"the stored request cannot be forwarded: {exc}", final=True), None
    sent_at = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            # A small body (a webhook's, as a rule) goes in the OPEN itself.
            small = len(event.body) <= MAX_DATA_SIZE
            try:
                stream = await session.open(head, small, event.body if small else b"")
            except BadHead as exc:
                return Outcome(None, f"the stored request cannot be forwarded: {exc}", final=True), None
            # A larger body goes right behind the OPEN as far as credit goes; the rest
            # concurrently with the wait for the head: an app may answer before it read
            # the whole body, and that answer is a success.
            taken = len(event.body) if small else session.send_body_now(stream, event.body, end=True)
            if taken < len(event.body):
                pump = asyncio.ensure_future(_send_body(session, stream, event.body[taken:]))
            answer = await asyncio.shield(stream.head)
    except (TimeoutError, StreamFailed) as exc:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if stream is not None:
            if isinstance(exc, TimeoutError):  # the reason the agent's console shows
                stream.reset_reason = f"no answer within {timeout:g}s (--timeout)"
            await session.finish(stream)
        if isinstance(exc, TimeoutError):
            # Opened, so the agent had it: counted as the app's failure to answer.
            return Outcome(None, f"no answer within {timeout:g}s", reached=stream is not None), None
        reached = exc.code is not None and exc.code not in _NOT_FORWARDED
        who = "local-bad-response" if exc.code == RESET_BAD_RESPONSE else "agent"
        return Outcome(None, f"{who}: {exc}", reached=reached), None
    except BaseException:
        if pump is not None:
            pump.cancel()
        if stream is not None:
            await session.finish(stream)
        raise
    retry_after = parse_retry_after(
        (header_value(answer.headers, b"retry-after") or b"").decode("latin-1"), time.time()
    )
    outcome = Outcome(answer.status, None, retry_after, answered_in=time.monotonic() - sent_at)
    return outcome, AgentExchange(session, stream, answer, pump)


async def _send_body(session: AgentSession, stream: Stream, body: bytes) -> None:
    with contextlib.suppress(StreamFailed):  # the head (or its absence) tells the outcome
        await session.send_body(stream, body, end=True)


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


#: IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits, which a
#: translator on the server's network would reach: NAT64 (RFC 6052 2.1, RFC 8215),
#: IPv4-translated (SIIT, RFC 2765 2.1) and IPv4-compatible (RFC 4291 2.5.5.1). Mapped,
#: 6to4 and Teredo addresses are read by ``ipaddress`` itself.
CARRIES_IPV4 = tuple(
    ipaddress.ip_network(prefix) for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")
)


def is_public(address: str) -> bool:
    """True if ``address`` (IPv4 or IPv6, a zone allowed) is globally reachable, and so
    is any IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64): a review
    reached 127.0.0.1 past the check as ``[64:ff9b::7f00:1]`` and ``[2002:7f00:1::]``.
    A translator on another prefix (an operator's own NAT64 prefix) cannot be told."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        carried = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in network for network in CARRIES_IPV4):
            carried.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public(str(v4)) for v4 in carried if v4 is not None)
    return True


def url_client(allow_private: bool) -> aiohttp.ClientSession:
    """The one client session for URL destinations (SSRF-guarded unless ``allow_private``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=None if allow_private else PublicOnlyResolver(), limit=100),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


async def attempt_url(
    http: aiohttp.ClientSession, url: str, event: Event, attempt: int, timeout: float
) -> Outcome:
    """POST (or whatever the method was) ``event`` to ``url`` + its path; the outcome."""
    try:
        head = delivery_head(event, attempt)
    except BadHead as exc:
        return Outcome(None, f"the stored request cannot be forwarded: {exc}", final=True)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in strip_hop_by_hop(without(head.headers, b"host", b"content-length")):
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    target = URL(url.rstrip("/") + event.target.decode("utf-8", "surrogateescape"), encoded=True)
    try:
        async with (
            asyncio.timeout(timeout),
            http.request(
                event.method, target, headers=headers, data=event.body or None, allow_redirects=False
            ) as response,
        ):
            await response.read()
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
            # No answered_in: a URL destination's auto slots stay at the floor (its attempts
            # share the server's one connection pool with every tenant's: attempts.url_client).
            return Outcome(response.status, None, retry_after)
    except PrivateAddress as exc:
        return Outcome(None, str(exc))
    except TimeoutError:
        return Outcome(None, f"no answer within {timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome(None, clip_error(f"{type(exc).__name__}: {exc}"))
