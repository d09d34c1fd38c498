"""One attempt to deliver a stored event: to an agent over its tunnel, or to a URL.

An attempt ends in an ``Outcome``; it never raises for anything the destination or the
network did. ``--timeout`` bounds the whole of an attempt up to the response head:
opening the stream, sending the body and waiting for the answer, so a stuck agent costs
a sender ``--timeout``, not the heartbeat's 30 s. The HTTP client for URL destinations
and its SSRF guard are ``ssrf.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from relay_protocol import BadHead, RequestHead, ResponseHead
from relay_protocol.frames import RESET_BAD_RESPONSE, RESET_CANCEL, RESET_REFUSED
from relay_protocol.headers import header_value, strip_hop_by_hop, without
from relay_protocol.limits import MAX_DATA_SIZE

from .retry import parse_retry_after
from .session import AgentSession, Stream, StreamFailed
from .ssrf import PrivateAddress
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
    except (TimeoutError, StreamFailed) as failed:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if stream is not None:
            if isinstance(failed, TimeoutError):  # the reason the agent's console shows
                stream.reset_reason = f"no answer within {timeout:g}s (--timeout)"
            await session.finish(stream)
        if isinstance(failed, TimeoutError):
            # Opened, so the agent had it: counted as the app's failure to answer.
            return Outcome(None, f"no answer within {timeout:g}s", reached=stream is not None), None
        reached = failed.code is not None and failed.code not in _NOT_FORWARDED
        who = "local-bad-response" if failed.code == RESET_BAD_RESPONSE else "agent"
        return Outcome(None, f"{who}: {failed}", reached=reached), None
    except BaseException as leaving:
        if pump is not None:
            pump.cancel()
        if stream is not None:
            await session.finish(stream)
        raise leaving  # named: compiled by mypyc, a bare raise after an await crashed
    retry_after = parse_retry_after(
        (header_value(answer.headers, b"retry-after") or b"").decode("latin-1"), time.time()
    )
    outcome = Outcome(answer.status, None, retry_after, answered_in=time.monotonic() - sent_at)
    return outcome, AgentExchange(session, stream, answer, pump)


async def _send_body(session: AgentSession, stream: Stream, body: bytes) -> None:
    with contextlib.suppress(StreamFailed):  # the head (or its absence) tells the outcome
        await session.send_body(stream, body, end=True)


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
            # share the server's one connection pool with every tenant's: ssrf.url_client).
            return Outcome(response.status, None, retry_after)
    except PrivateAddress as private:
        return Outcome(None, str(private))
    except TimeoutError:
        return Outcome(None, f"no answer within {timeout:g}s")
    except (aiohttp.ClientError, OSError) as error:
        return Outcome(None, clip_error(f"{type(error).__name__}: {error}"))
