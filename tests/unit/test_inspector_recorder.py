"""The inspector's recorder: what it keeps, what it lets go, and who it tells."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay_agent.inspector.recorder import MAX_BODY, MAX_EXCHANGES, MAX_KEPT, MAX_NOTICES, Recorder
from relay_agent.inspector.views import replay_refusal, summary
from relay_protocol import RequestHead, ResponseHead

HEAD = RequestHead(
    "POST", b"/hook", ((b"Content-Type", b"application/json"), (b"X-Relay-Attempt", b"3")), event_id="evt_1"
)


class Far:
    """The other end of a link: yields ``chunks`` as the request body, keeps what it is sent."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.sent: list[tuple[bytes, bool]] = []
        self.head: ResponseHead | None = None

    async def body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    def whole_body(self) -> bytes | None:
        return None

    async def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        self.head = head
        if body:
            self.sent.append((body, end))

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        self.sent.append((chunk, end))

    async def reset(self, code: int, reason: str) -> None:
        pass


async def test_a_recording_link_passes_everything_through_and_keeps_it() -> None:
    recorder = Recorder()
    far = Far(b"hello ", b"world")
    link = recorder.record(HEAD, True, far)
    assert [chunk async for chunk in link.body()] == [b"hello ", b"world"]
    await link.respond(ResponseHead(201, ((b"X-A", b"1"),)), end=False)
    await link.send_body(b"created")
    await link.send_body(b"", end=True)
    link.finish(201, "")
    assert far.head == ResponseHead(201, ((b"X-A", b"1"),))
    assert far.sent == [(b"created", False), (b"", True)]
    [exchange] = recorder.newest_first()
    assert exchange.request.data() == b"hello world" and exchange.request.complete
    assert exchange.response.data() == b"created" and exchange.response.complete
    assert (exchange.status, exchange.attempt) == (201, 3)
    shown = summary(exchange)
    assert (shown["event_id"], shown["request_size"], shown["response_size"]) == ("evt_1", 11, 7)
    assert shown["duration_ms"] is not None
    assert replay_refusal(exchange) is None


async def test_chunks_are_kept_by_reference_not_copied() -> None:
    recorder = Recorder()
    chunk = b"x" * 1000
    link = recorder.record(HEAD, True, Far(chunk))
    _ = [c async for c in link.body()]
    assert link.exchange.request.chunks[0] is chunk


async def test_a_body_over_the_cap_keeps_its_start_and_its_whole_size() -> None:
    recorder = Recorder(max_body=10)
    link = recorder.record(HEAD, True, Far(b"0123456", b"789abcdef"))
    _ = [c async for c in link.body()]
    capture = link.exchange.request
    assert (capture.data(), capture.size, capture.complete) == (b"0123456789", 16, False)
    assert replay_refusal(link.exchange) == "its body of 16 bytes was not kept whole"
    assert recorder.kept == 10


def test_the_default_caps_are_the_documented_ones() -> None:
    assert (MAX_EXCHANGES, MAX_BODY, MAX_KEPT) == (500, 1024 * 1024, 64 * 1024 * 1024)


def test_only_the_last_exchanges_are_kept_and_their_bytes_let_go() -> None:
    recorder = Recorder(max_exchanges=3)
    links = [recorder.record(HEAD, False, Far()) for _ in range(5)]
    for link in links:
        recorder.keep(link.exchange.response, b"12345")
    assert [e.id for e in recorder.newest_first()] == [5, 4, 3]
    assert recorder.get(1) is None and recorder.get(3) is links[2].exchange
    assert recorder.kept == 15  # the first two exchanges' bytes are no longer counted
    recorder.keep(links[0].exchange.response, b"more")  # a forgotten exchange still running
    assert recorder.kept == 15


def test_over_the_total_the_oldest_bodies_go_first_and_their_sizes_stay() -> None:
    recorder = Recorder(max_body=100, max_kept=250)
    links = [recorder.record(HEAD, True, Far()) for _ in range(3)]
    for link in links:
        recorder.keep(link.exchange.request, b"a" * 100)
    first, second, third = (link.exchange for link in links)
    assert first.request.dropped and not second.request.dropped and not third.request.dropped
    assert (first.request.data(), first.request.size) == (b"", 100)
    assert recorder.kept == 200
    assert replay_refusal(first) == "its body of 100 bytes was not kept whole"


def test_a_request_without_a_body_is_complete_at_once() -> None:
    link = Recorder().record(RequestHead("GET", b"/", ()), False, Far())
    assert link.exchange.request.complete
    assert replay_refusal(link.exchange) is None


def test_subscribers_hear_of_each_exchange_when_it_starts_and_when_it_ends() -> None:
    recorder = Recorder()
    queue = recorder.subscribe()
    link = recorder.record(HEAD, False, Far())
    link.finish(200, "")
    assert [queue.get_nowait(), queue.get_nowait()] == [link.exchange, link.exchange]
    recorder.unsubscribe(queue)
    recorder.record(HEAD, False, Far())
    assert queue.empty()


def test_a_subscriber_that_falls_behind_is_dropped_not_buffered_without_bound() -> None:
    recorder = Recorder()
    slow = recorder.subscribe()
    for _ in range(MAX_NOTICES + 5):
        recorder.record(HEAD, False, Far())
    assert slow.qsize() == MAX_NOTICES + 1
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert items[-1] is None  # told it was dropped: the page reloads the list


def test_closing_ends_every_subscription() -> None:
    recorder = Recorder()
    queues = [recorder.subscribe(), recorder.subscribe()]
    recorder.close()
    assert [q.get_nowait() for q in queues] == [None, None]


@pytest.mark.parametrize(("value", "attempt"), [(b"2", 2), (b"", None), (b"two", None), (None, None)])
def test_the_attempt_comes_from_the_relays_header(value: bytes | None, attempt: int | None) -> None:
    headers = () if value is None else ((b"X-Relay-Attempt", value),)
    link = Recorder().record(RequestHead("POST", b"/", headers), False, Far())
    assert link.exchange.attempt == attempt
