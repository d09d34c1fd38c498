"""What the inspector remembers: the last exchanges the agent forwarded, as they happen.

Recording sits on the path of every forwarded request, so all it does there is: one
``Exchange`` appended to a bounded deque, each body chunk kept by reference (never
copied, unless cut at the cap) up to ``MAX_BODY``, and a reference to the exchange put on
each subscriber's queue when it starts and when it ends. No decoding, no JSON, no
logging: the inspector's pages do that when they ask. With ``--no-inspect`` there is no
recorder at all and the tunnel forwards its streams as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable

from relay_protocol import RequestHead, ResponseHead
from relay_protocol.headers import header_value

from ..forward import Link

#: Exchanges kept, newest first: what fits on one page of the inspector (ngrok keeps a
#: few hundred too); the oldest one goes when another arrives.
MAX_EXCHANGES = 500
#: Bytes of one body kept for the detail view, replay and curl: any webhook fits; a
#: larger body is shown by its size, and its exchange cannot be replayed.
MAX_BODY = 1024 * 1024
#: Body bytes kept across all exchanges: 500 exchanges of 1 MiB each way would be 1 GiB,
#: more than an agent on a laptop should hold for a debugging aid. Over it, the bodies of
#: the oldest exchanges are dropped first (their heads and sizes stay).
MAX_KEPT = 64 * 1024 * 1024
#: Pages following the list at once (event streams): each notice is written to every
#: one, so their number multiplies the cost of every forwarded request; a person has a
#: few tabs open. One more is refused (``TooManySubscribers``).
MAX_SUBSCRIBERS = 16
#: Notices waiting for one subscriber (a page's event stream): one that does not read
#: them is dropped, and the page reconnects and reloads the list.
MAX_NOTICES = 1000


class TooManySubscribers(Exception):
    """``Recorder.subscribe`` when ``MAX_SUBSCRIBERS`` already follow."""


class Capture:
    """One body as it went past: ``chunks`` up to the recorder's cap, the whole ``size``,
    ``ended`` once its last byte passed, ``dropped`` once the recorder let it go."""

    __slots__ = ("chunks", "dropped", "ended", "kept", "size")

    def __init__(self, ended: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.kept = 0
        self.size = 0
        self.ended = ended
        self.dropped = False

    @property
    def complete(self) -> bool:
        """Every byte of the body is kept: it can be shown whole, replayed and copied."""
        return self.ended and not self.dropped and self.kept == self.size

    def data(self) -> bytes:
        return b"".join(self.chunks)


class Exchange:
    """One request forwarded to the local service (or replayed to it) and what came back.

    ``status`` is None while it runs, then the status the public client saw (502 or 504
    when the local service failed, whose reason is ``error``) or how the stream ended
    (``"reset"``, ``"cancelled"``). Times: ``received_at`` is the wall clock; the
    ``response_after`` and ``duration`` seconds are measured from the start.
    """

    __slots__ = (
        "duration",
        "error",
        "head",
        "id",
        "received_at",
        "replay_of",
        "request",
        "response",
        "response_after",
        "response_head",
        "started",
        "status",
    )

    def __init__(self, exchange_id: int, head: RequestHead, has_body: bool, replay_of: int | None) -> None:
        self.id = exchange_id
        self.head = head
        self.replay_of = replay_of
        self.received_at = time.time()
        self.started = time.monotonic()
        self.request = Capture(ended=not has_body)
        self.response = Capture()
        self.response_head: ResponseHead | None = None
        self.response_after: float | None = None
        self.duration: float | None = None
        self.status: int | str | None = None
        self.error = ""

    @property
    def attempt(self) -> int | None:
        """The relay's attempt number of a queued webhook (``X-Relay-Attempt``), else None."""
        value = header_value(self.head.headers, b"x-relay-attempt")
        return int(value) if value is not None and value.isdigit() else None


class RecordingLink:
    """A ``forward.Link`` that records into ``exchange`` what passes through ``inner``."""

    def __init__(self, recorder: Recorder, exchange: Exchange, inner: Link) -> None:
        self.recorder = recorder
        self.exchange = exchange
        self.inner = inner

    async def body(self) -> AsyncIterator[bytes]:
        capture = self.exchange.request
        known = capture.ended  # recorded already (a replay's body)
        async for chunk in self.inner.body():
            if not known:
                self.recorder.keep(capture, chunk)
            yield chunk
        capture.ended = True

    def whole_body(self) -> bytes | None:
        whole = self.inner.whole_body()
        if whole is not None and not self.exchange.request.ended:
            if whole:
                self.recorder.keep(self.exchange.request, whole)
            self.exchange.request.ended = True
        return whole

    # respond, send_body and reset record, then hand back the inner link's own awaitable:
    # no coroutine of their own on the path of every stream.

    def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> Awaitable[None]:
        # Recorded first: a head the tunnel cannot carry is worth seeing most of all.
        self.exchange.response_head = head
        self.exchange.response_after = time.monotonic() - self.exchange.started
        if body:
            self.recorder.keep(self.exchange.response, body)
        self.exchange.response.ended = end
        return self.inner.respond(head, end, body)

    def send_body(self, chunk: bytes, end: bool = False) -> Awaitable[None]:
        if chunk:
            self.recorder.keep(self.exchange.response, chunk)
        if end:
            self.exchange.response.ended = True
        return self.inner.send_body(chunk, end)

    def reset(self, code: int, reason: str) -> Awaitable[None]:
        return self.inner.reset(code, reason)

    def finish(self, status: int | str, error: str) -> None:
        """The stream ended: ``status`` as the public client saw it, ``error`` why it failed."""
        self.recorder.finish(self.exchange, status, error)


class Recorder:
    """The bounded record of exchanges, and the subscribers told about each one."""

    def __init__(
        self, max_exchanges: int = MAX_EXCHANGES, max_body: int = MAX_BODY, max_kept: int = MAX_KEPT
    ):
        self.max_exchanges = max_exchanges
        self.max_body = max_body
        self.max_kept = max_kept
        self.kept = 0  # body bytes held, all exchanges
        self._exchanges: deque[Exchange] = deque()
        self._by_id: dict[int, Exchange] = {}
        self._last_id = 0
        self._subscribers: set[asyncio.Queue[Exchange | None]] = set()

    def record(
        self,
        head: RequestHead,
        has_body: bool,
        inner: Link,
        replay_of: int | None = None,
        body: bytes | None = None,
    ) -> RecordingLink:
        """Start recording one exchange; forward through the link this returns, and call
        its ``finish`` when the stream ends. ``body``, a request body known whole from the
        start (a replay's), is kept at once: the first notice already gives its size."""
        if len(self._exchanges) >= self.max_exchanges:
            self._forget(self._exchanges.popleft())
        self._last_id += 1
        exchange = Exchange(self._last_id, head, has_body, replay_of)
        if body is not None:
            if body:
                self.keep(exchange.request, body)
            exchange.request.ended = True
        self._exchanges.append(exchange)
        self._by_id[exchange.id] = exchange
        self._notify(exchange)
        return RecordingLink(self, exchange, inner)

    def keep(self, capture: Capture, chunk: bytes) -> None:
        """Count ``chunk`` into ``capture``, and keep it (by reference) within the caps."""
        capture.size += len(chunk)
        room = self.max_body - capture.kept
        if room <= 0 or capture.dropped:
            return
        piece = chunk if len(chunk) <= room else chunk[:room]
        capture.chunks.append(piece)
        capture.kept += len(piece)
        self.kept += len(piece)
        if self.kept > self.max_kept:
            self._drop_oldest_bodies()

    def finish(self, exchange: Exchange, status: int | str, error: str) -> None:
        exchange.status = status
        exchange.error = error
        exchange.duration = time.monotonic() - exchange.started
        self._notify(exchange)

    def get(self, exchange_id: int) -> Exchange | None:
        return self._by_id.get(exchange_id)

    def newest_first(self) -> list[Exchange]:
        return list(reversed(self._exchanges))

    def subscribe(self) -> asyncio.Queue[Exchange | None]:
        """A queue that gets every exchange when it starts and when it ends, then None
        when the subscriber is dropped (it fell ``MAX_NOTICES`` behind) or the recorder
        closes. Call ``unsubscribe`` when done with it. Raises ``TooManySubscribers``
        when ``MAX_SUBSCRIBERS`` already follow."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"{MAX_SUBSCRIBERS} pages already follow the list; close one")
        queue: asyncio.Queue[Exchange | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Exchange | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (the agent is stopping)."""
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._subscribers.clear()

    def _notify(self, exchange: Exchange) -> None:
        if not self._subscribers:
            return  # no page open: the common case, on the path of every stream
        for queue in list(self._subscribers):
            if queue.qsize() >= MAX_NOTICES:
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(exchange)

    def _forget(self, exchange: Exchange) -> None:
        del self._by_id[exchange.id]
        self._drop(exchange.request)
        self._drop(exchange.response)

    def _drop(self, capture: Capture) -> None:
        self.kept -= capture.kept
        capture.chunks = []
        capture.kept = 0
        capture.dropped = True

    def _drop_oldest_bodies(self) -> None:
        for exchange in self._exchanges:
            if self.kept <= self.max_kept:
                return
            for capture in (exchange.request, exchange.response):
                if capture.kept:
                    self._drop(capture)
