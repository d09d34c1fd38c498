"""The agent's connections to the local service (relay_agent/pool.py): what a name
means, which pooled connections are closed, what a failed connect says, the TLS name."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from relay_agent import client as client_module
from relay_agent.client import ConnectFailed, LocalClient, request_head
from relay_agent.config import AgentConfig
from relay_agent.forward import server_name
from relay_agent.pool import (
    LOOPBACK,
    REUSE_IDLE,
    LocalConnector,
    LocalResolver,
    addresses,
    closed_by_peer,
    connector,
    explain_connect_failure,
    is_localhost,
)
from relay_agent.target import Target


@pytest.mark.parametrize("name", ["localhost", "LocalHost", "localhost.", "app.localhost", "a.b.LOCALHOST."])
def test_localhost_names(name: str) -> None:
    assert is_localhost(name)


@pytest.mark.parametrize("name", ["localhost.example.com", "notlocalhost", "localhostx", "127.0.0.1", "::1"])
def test_not_localhost_names(name: str) -> None:
    assert not is_localhost(name)


async def test_localhost_is_both_loopbacks_whatever_the_hosts_file_says() -> None:
    results = await LocalResolver().resolve("localhost", 8080)
    assert [(r["host"], r["port"], r["family"]) for r in results] == [
        ("::1", 8080, socket.AF_INET6),
        ("127.0.0.1", 8080, socket.AF_INET),
    ]
    assert await addresses("App.Localhost.", 1) == [(a, 1) for a in LOOPBACK]
    assert await addresses("127.0.0.1", 9) == [("127.0.0.1", 9)]
    assert await addresses("::1", 9) == [("::1", 9)]


async def test_other_names_get_every_address_without_addrconfig() -> None:
    # A numeric name goes through getaddrinfo too: one result, no duplicates.
    results = await LocalResolver().resolve("127.0.0.1", 80)
    assert [(r["host"], r["port"]) for r in results] == [("127.0.0.1", 80)]
    with pytest.raises(OSError):
        await LocalResolver().resolve("no-such-host.invalid", 80)


# -- closed_by_peer ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _pair() -> AsyncIterator[tuple[asyncio.StreamWriter, socket.socket]]:
    """A client connection (its asyncio writer) and the accepted server socket (blocking)."""
    listener = socket.create_server(("127.0.0.1", 0))
    _, writer = await asyncio.open_connection(*listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    try:
        yield writer, peer
    finally:
        writer.close()
        peer.close()


def _wait_readable(writer: asyncio.StreamWriter) -> None:
    """Block the loop (so that it cannot read the socket itself) until the peer's bytes or
    end of file are there to be peeked."""
    sock = writer.get_extra_info("socket")
    readable, _, _ = select.select([sock.fileno()], [], [], 5)
    assert readable


async def test_an_idle_open_connection_is_not_closed() -> None:
    async with _pair() as (writer, _):
        assert not closed_by_peer(writer.transport)


async def test_end_of_file_a_reset_or_unasked_bytes_mean_closed() -> None:
    async with _pair() as (writer, peer):
        peer.shutdown(socket.SHUT_WR)
        _wait_readable(writer)
        assert closed_by_peer(writer.transport)
    async with _pair() as (writer, peer):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # linger 0: a reset
        _wait_readable(writer)
        assert closed_by_peer(writer.transport)
    async with _pair() as (writer, peer):
        peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        _wait_readable(writer)
        assert closed_by_peer(writer.transport)
        # Peeking consumed nothing: the bytes are still there for whoever reads.
        sock = socket.socket(fileno=writer.get_extra_info("socket").fileno())
        try:
            assert sock.recv(8, socket.MSG_PEEK) == b"HTTP/1.1"
        finally:
            sock.detach()


class _FakeTLS(asyncio.BaseTransport):
    def __init__(self, sock: Any) -> None:
        super().__init__()
        self._sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self._sock, "sslcontext": ssl.create_default_context()}.get(name, default)


async def test_a_tls_session_ticket_is_not_a_close_but_an_alert_is() -> None:
    async with _pair() as (writer, peer):
        transport = _FakeTLS(writer.get_extra_info("socket"))
        peer.sendall(b"\x16\x03\x03\x00\x01x")  # a handshake record: a TLS 1.3 session ticket
        _wait_readable(writer)
        assert not closed_by_peer(transport)
    async with _pair() as (writer, peer):
        transport = _FakeTLS(writer.get_extra_info("socket"))
        peer.sendall(b"\x15\x03\x03\x00\x02\x01\x00")  # an alert record: close_notify
        _wait_readable(writer)
        assert closed_by_peer(transport)


def test_no_socket_is_not_taken_for_closed() -> None:
    assert not closed_by_peer(None)


# -- the connector ---------------------------------------------------------------------------


async def test_the_pool_never_hands_out_a_connection_its_service_closed() -> None:
    """TCPConnector._get is overridden (private API: this pins it). The service closes
    a pooled connection; before the loop has read the end of file, the next request
    gets a new connection, not that one."""
    accepted: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            peer, _ = await loop.sock_accept(listener)
            accepted.append(peer)
            await loop.sock_recv(peer, 65536)
            await loop.sock_sendall(peer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = asyncio.create_task(serve())
    pool = connector(False, 10)
    assert isinstance(pool, LocalConnector)
    try:
        async with aiohttp.ClientSession(connector=pool) as session:
            async with session.get(f"http://127.0.0.1:{port}/") as reply:
                assert await reply.read() == b"ok"
            [key] = list(pool._conns)
            [(protocol, _)] = list(pool._conns[key])
            accepted[0].shutdown(socket.SHUT_WR)  # the service gives up the idle connection
            readable, _, _ = select.select([protocol.transport.get_extra_info("socket").fileno()], [], [], 5)
            assert readable and protocol.is_connected()  # aiohttp has not noticed: the loop is held
            assert await pool._get(key, []) is None  # ... but the pool does not hand it out
            assert not protocol.is_connected()
            async with session.get(f"http://127.0.0.1:{port}/") as reply:
                assert await reply.read() == b"ok"
            assert len(accepted) == 2
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        for peer in accepted:
            peer.close()
        listener.close()


def test_idle_connections_are_closed_before_common_services_close_them() -> None:
    assert REUSE_IDLE < 1.0  # below apps that set 1 s, gunicorn's 2 s, Node's 5 s


async def test_a_new_connection_tries_the_address_reached_last_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``localhost`` is ::1 then 127.0.0.1; an app listening on IPv4 only refused ::1 on
    # every new connection (a failed attempt first, each time). After one connection
    # reached 127.0.0.1, the next tries it first.
    tried: list[str] = []
    start_connection = client_module.aiohappyeyeballs.start_connection

    async def recording(infos: list[Any], **kwargs: Any) -> socket.socket:
        tried.append(infos[0][4][0])
        return await start_connection(infos, **kwargs)

    monkeypatch.setattr(client_module.aiohappyeyeballs, "start_connection", recording)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = LocalClient(Target("http", "localhost", port), False)
    try:
        for _ in range(2):  # "Connection: close": each request on a new connection
            response, _ = await client.request(
                "GET", request_head("GET", b"/", (), chunked=False), None, None
            )
            assert response.status == 204
            client.release(response, None)
    finally:
        server.close()
        await server.wait_closed()
    assert tried == ["::1", "127.0.0.1"]


async def test_a_connection_reset_right_after_its_connect_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by a review: the address reached was read (getpeername) before the socket was
    # in the hands that close it on failure; a reset right after connect leaked it.
    class ResetAtOnce(socket.socket):
        def getpeername(self) -> Any:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    made: list[socket.socket] = []

    async def connected(infos: list[Any], **kwargs: Any) -> socket.socket:
        made.append(ResetAtOnce(socket.AF_INET, socket.SOCK_STREAM))
        return made[-1]

    monkeypatch.setattr(client_module.aiohappyeyeballs, "start_connection", connected)
    client = LocalClient(Target("http", "127.0.0.1", 9), False)
    with pytest.raises(ConnectFailed):
        await client.request("GET", request_head("GET", b"/", (), chunked=False), None, None)
    assert made and made[0].fileno() == -1


# -- what a failed connect says -----------------------------------------------------------------


async def test_a_refused_connect_names_every_address() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    target = Target("http", "localhost", port)
    client = LocalClient(target, False)
    with pytest.raises(ConnectFailed) as caught:
        await client.request("GET", request_head("GET", b"/", (), chunked=False), None, None)
    text = explain_connect_failure(caught.value.error, target)
    assert text.startswith("connection refused on ")
    assert f"127.0.0.1:{port}" in text
    assert f"[::1]:{port}" in text or "on [::1]" not in text  # an IPv6-less host names its own failure


def test_mixed_failures_are_grouped_by_cause() -> None:
    error = OSError(
        "Multiple exceptions: [Errno 99] Connect call failed ('::1', 80, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 80)"
    )
    text = explain_connect_failure(error, Target("http", "localhost", 80))
    assert text == "cannot assign requested address on [::1]:80; connection refused on 127.0.0.1:80"


def test_an_unknown_failure_names_the_target() -> None:
    text = explain_connect_failure(OSError(113, "No route to host"), Target("http", "app", 80))
    assert text == "cannot connect to http://app: no route to host"


def test_a_name_that_does_not_resolve() -> None:
    error = socket.gaierror(-2, "Name or service not known")
    text = explain_connect_failure(error, Target("http", "nope.invalid", 80))
    assert text == "cannot resolve nope.invalid: name or service not known"


# -- the TLS server name ----------------------------------------------------------------------


def _config(scheme: str, host_header: str) -> AgentConfig:
    target = Target(scheme, "localhost", 8443)
    return AgentConfig(server="http://r", token="t", target=target, host_header=host_header)


@pytest.mark.parametrize(
    ("scheme", "host_header", "host", "expected"),
    [
        ("https", "rewrite", b"alice.relay.test", None),  # aiohttp uses the target's own host
        ("https", "myapp.test", b"alice.relay.test", "myapp.test"),
        ("https", "myapp.test:8443", b"alice.relay.test", "myapp.test"),
        ("https", "preserve", b"alice.relay.test:443", "alice.relay.test"),
        ("https", "preserve", b"127.0.0.1:8443", None),  # never an IP address as SNI
        ("https", "[::1]:8443", b"x", None),
        ("http", "myapp.test", b"x", None),  # no TLS
    ],
)
def test_the_tls_server_name_follows_the_host_header(
    scheme: str, host_header: str, host: bytes, expected: str | None
) -> None:
    assert server_name(_config(scheme, host_header), ((b"Host", host),)) == expected
