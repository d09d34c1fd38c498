"""The agent's HTTP/1.1 client to the local service (relay_agent/client.py), against raw
asyncio apps that answer exactly the bytes each test gives them."""

from __future__ import annotations

import asyncio
import select
from collections.abc import AsyncIterator, Callable

import pytest

from relay_agent.client import (
    MAX_RESPONSE_HEADER_LINE,
    BadResponse,
    BodyCut,
    ClosedUnanswered,
    LocalClient,
    chunk,
    request_head,
)
from relay_agent.target import Target

App = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


class RawApp:
    """A raw app: ``answers`` are the bytes written for each request, in turn."""

    def __init__(self, *answers: bytes, close_after: bool = False) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_after = close_after
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                if b"transfer-encoding: chunked" in head.lower():
                    body = await reader.readuntil(b"0\r\n\r\n")
                self.requests.append(head + body)
                writer.write(self.answers.pop(0))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _client(app: RawApp) -> tuple[LocalClient, asyncio.Server]:
    server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return LocalClient(Target("http", "127.0.0.1", port), False), server


async def _exchange(client: LocalClient, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    head = request_head(method, b"/x", ((b"Host", b"app"),), chunked=False)
    response, writer = await client.request(method, head, body, None)
    assert writer is None
    data = b""
    while piece := await response.read():
        data += piece
    client.release(response, None)
    return response.status, data


async def test_heads_go_as_given_and_connections_are_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nContent-Length: 2\r\n\r\nok"
    app = RawApp(answer, answer)
    client, server = await _client(app)
    try:
        assert await _exchange(client) == (200, b"ok")
        assert await _exchange(client, "POST", b"") == (200, b"ok")
    finally:
        await client.close()
        server.close()
    assert app.requests[0] == b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n"  # nothing added
    assert app.connections == 1


async def test_head_then_reuse_with_no_body_read() -> None:
    app = RawApp(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",  # HEAD: the length of a body never sent
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    )
    client, server = await _client(app)
    try:
        assert await _exchange(client, "HEAD") == (200, b"")
        assert await _exchange(client) == (204, b"")
        assert await _exchange(client) == (200, b"abc")
    finally:
        await client.close()
        server.close()
    assert app.connections == 1


async def test_interim_answers_are_skipped_and_chunked_bodies_decoded() -> None:
    app = RawApp(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    client, server = await _client(app)
    try:
        head = request_head("POST", b"/x", ((b"Host", b"app"),), chunked=True)
        response, _ = await client.request("POST", head, chunk(b"hi") + chunk(b""), None)
        assert response.status == 201
        assert response.headers == ((b"Transfer-Encoding", b"chunked"),)  # no Link: that was interim
        data = b""
        while piece := await response.read():
            data += piece
        assert data == b"abcde"
    finally:
        await client.close()
        server.close()
    assert app.requests[0].endswith(b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")


async def test_a_body_without_a_length_ends_with_the_connection() -> None:
    app = RawApp(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=True)
    client, server = await _client(app)
    try:
        assert await _exchange(client) == (200, b"until the end")
    finally:
        await client.close()
        server.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", BodyCut),
        (b"", ClosedUnanswered),
        (b"garbage\r\n\r\n", BadResponse),
        (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * MAX_RESPONSE_HEADER_LINE + b"\r\n\r\n", BadResponse),
        (b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n", BadResponse),
    ],
)
async def test_broken_answers_are_named(answer: bytes, error: type[Exception]) -> None:
    app = RawApp(answer, close_after=True)
    client, server = await _client(app)
    try:
        with pytest.raises(error):
            await _exchange(client)
    finally:
        await client.close()
        server.close()


async def test_a_pooled_connection_the_app_closed_is_never_used() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    app = RawApp(answer, answer)
    client, server = await _client(app)
    try:
        assert await _exchange(client) == (200, b"ok")
        [pooled] = client._idle[None]
        app.writers[0].transport.close()  # the app gives the idle connection up
        await asyncio.sleep(0)  # its FIN leaves the app's loop ...
        sock = pooled.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert select.select([sock.fileno()], [], [], 5)[0]
        assert not pooled.closed  # ... but the agent's loop has not read it yet
        assert await _exchange(client) == (200, b"ok")  # a new connection, not the closed one
    finally:
        await client.close()
        server.close()
    assert app.connections == 2


async def test_a_streamed_body_goes_as_it_comes() -> None:
    app = RawApp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client, server = await _client(app)

    async def body() -> AsyncIterator[bytes]:
        yield b"12"
        yield b"345"

    try:
        head = request_head("PUT", b"/x", ((b"Host", b"app"), (b"Content-Length", b"5")), chunked=False)
        response, writer = await client.request("PUT", head, body(), None)
        assert writer is not None
        await writer
        assert await response.read() == b"ok"
    finally:
        await client.close()
        server.close()
    assert app.requests[0].endswith(b"Content-Length: 5\r\n\r\n12345")


async def test_a_body_that_came_whole_is_taken_in_one_piece_and_the_connection_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    app = RawApp(answer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client, server = await _client(app)
    try:
        head = request_head("GET", b"/x", ((b"Host", b"app"),), chunked=False)
        response, _ = await client.request("GET", head, None, None)
        async with asyncio.timeout(10):
            while not response._connection.message_done:  # the body may come a read later
                await asyncio.sleep(0)
        assert response.take_whole(4) is None  # over the limit: nothing taken
        whole = response.take_whole(1024)
        assert whole == b"abcde"  # the chunks, joined, once
        assert await response.read() == b"" and response.at_end()
        client.release(response, None)
        assert await _exchange(client) == (200, b"ok")
    finally:
        await client.close()
        server.close()
    assert app.connections == 1
