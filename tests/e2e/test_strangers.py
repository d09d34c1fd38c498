"""Strangers get bounded memory and time, and one public request cannot hurt a tunnel
(issue 8, §2 and §4): the hostile-client suite.

- A head the relay could not send to the agent (target, headers and Host each near
  their limit; the Host is copied into X-Forwarded-Host) is a 4xx before any stream is
  opened: the agent's connection, and a request in flight on it, are untouched.
- Slow-loris connections (a request head one byte at a time) are closed after
  ``--head-timeout``; connections over ``--max-connections-per-client`` are refused
  at once; a client at another address is served all along.

Every wait is bounded (``WAIT``) and every count is fixed; no verdict depends on speed.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from .framework import Relay, Tunnel, fetch, raw_exchange, through

#: Seconds any one wait of these tests may take before it fails the test (a bound, not
#: a measurement): far above the head timeout the servers below run with.
WAIT = 60.0
#: Slow-loris connections, their server's per-address cap and head timeout.
LORIS = 50
PER_CLIENT = 30
HEAD_TIMEOUT = "2"
#: The slow clients' address: another loopback address than the normal client's.
LORIS_ADDRESS = "127.0.0.2"


# -- §2: a head the relay cannot forward -------------------------------------------------


@pytest.fixture(scope="module")
def alice(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="alice", agent_extra=("--mode", "live"))


def fill_headers(total: int, *, line: int = 8000) -> list[bytes]:
    """Header lines (each under aiohttp's 16 KiB line limit) of about ``total`` bytes."""
    lines = []
    i = 0
    while total > 0:
        size = min(line, total)
        lines.append(b"X-Fill-%d: " % i + b"f" * max(1, size - 14))
        total -= size
        i += 1
    return lines


def raw_request(target: bytes, host: bytes, headers: list[bytes]) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: " + host, *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def near_limit_requests(tunnel: Tunnel) -> dict[str, bytes]:
    apex = tunnel.server.apex.encode()
    long_target = b"/t/alice/" + b"p" * 16_000  # near aiohttp's 16 KiB request line
    long_host = b"h" * 15_000 + b":%d" % tunnel.server.port  # near the 16 KiB field limit
    return {
        # The reported one: target, headers and Host each near their limit.
        "all-near-limit": raw_request(long_target, long_host, fill_headers(32 * 1024 - 15_100)),
        "long-target-long-headers": raw_request(long_target, apex, fill_headers(32 * 1024 - 200)),
        "long-host-long-headers": raw_request(b"/t/alice/x", long_host, fill_headers(32 * 1024 - 15_100)),
        "long-target": raw_request(b"/t/alice/" + b"q" * 9_000, apex, []),
        "long-target-subdomain": raw_request(b"/" + b"q" * 9_000, b"alice." + apex, []),
    }


async def test_a_head_too_large_to_forward_is_a_4xx_and_the_tunnel_survives(
    alice: Tunnel, http: aiohttp.ClientSession
) -> None:
    # One request in flight on the agent's connection the whole time.
    held = asyncio.create_task(through(http, alice, "path", "GET", "/hold?key=strangers"))
    async with asyncio.timeout(WAIT):
        while not alice.target.seen("/hold"):
            await asyncio.sleep(0.05)
    for label, request in near_limit_requests(alice).items():
        reply, _ = await raw_exchange(alice.server.port, request, timeout=WAIT)
        assert 400 <= reply.status < 500, (label, reply)
        assert reply.status in (400, 414, 431), (label, reply)
        assert reply.relay_error in ("bad-request", "uri-too-long", "headers-too-large"), (label, reply)
    alice.target.release("strangers")
    in_flight = await held
    assert in_flight.status == 200, in_flight
    assert in_flight.body == b"released"
    after = await through(http, alice, "path", "GET", "/after")
    assert after.status == 200, after
    assert after.json()["path"] == "/after"
    assert alice.agent.process.running()
    assert "expected" not in alice.agent.process.stderr  # no "OPEN on stream 3, expected 2"


async def test_the_target_limit_is_414(alice: Tunnel) -> None:
    request = raw_request(b"/t/alice/" + b"q" * 9_000, alice.server.apex.encode(), [])
    reply, _ = await raw_exchange(alice.server.port, request, timeout=WAIT)
    assert reply.status == 414
    assert reply.relay_error == "uri-too-long"


async def test_a_big_head_that_fits_is_forwarded(alice: Tunnel) -> None:
    # 8 KiB of target and 31 KiB of headers: with the X-Forwarded-* it still fits.
    target = b"/t/alice/" + b"r" * (8 * 1024 - 20)
    request = raw_request(target, alice.server.apex.encode(), fill_headers(31 * 1024))
    reply, _ = await raw_exchange(alice.server.port, request, timeout=WAIT)
    assert reply.status == 200, reply
    assert reply.json()["path"] == target[len(b"/t/alice") :].decode()


# -- §4: slow heads and too many connections ---------------------------------------------


async def loris(port: int, refused: list[bytes], closed: list[bool]) -> None:
    """Open a connection from ``LORIS_ADDRESS`` and send a request head one byte at a
    time, forever; return once the server closed it (what it sent goes to ``refused``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(LORIS_ADDRESS, 0))
    head = b"GET /t/alice/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 100_000

    async def trickle() -> None:
        # A moment first: a refused connection gets its 503 before a byte is sent back.
        await asyncio.sleep(0.5)
        with contextlib.suppress(OSError, RuntimeError):
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.25)

    sender = asyncio.create_task(trickle())
    try:
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received += chunk
        if received:
            refused.append(received)
        closed.append(True)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()


async def test_slow_heads_are_closed_and_others_are_served(relay: Relay, http: aiohttp.ClientSession) -> None:
    server = relay.server("--head-timeout", HEAD_TIMEOUT, "--max-connections-per-client", str(PER_CLIENT))
    tunnel = relay.tunnel(server=server, user="alice", agent_extra=("--mode", "live"))
    refused: list[bytes] = []
    closed: list[bool] = []
    slow = [asyncio.create_task(loris(server.port, refused, closed)) for _ in range(LORIS)]
    try:
        # Over the cap: answered 503 and closed at once, while the others hold their slots.
        async with asyncio.timeout(WAIT):
            while len(refused) < LORIS - PER_CLIENT:
                await asyncio.sleep(0.05)
        assert all(b" 503 " in r and b"X-Relay-Error: too-many-connections" in r for r in refused)
        # Another address is served meanwhile, through the tunnel and on the apex.
        reply = await through(http, tunnel, "path", "GET", "/still-served")
        assert reply.status == 200, reply
        health = await fetch(http, "GET", server.url("/healthz"), server.apex)
        assert health.status == 200
        # Every slow connection is closed by the server, though each keeps sending.
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*slow)
        assert len(closed) == LORIS
        assert len(refused) == LORIS - PER_CLIENT  # the others got nothing: no head, no answer
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    # Their slots are free again: the slow address is served like anyone else.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(LORIS_ADDRESS, 0))
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {server.apex}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert server.process is not None and "Traceback" not in server.process.stderr


async def test_an_idle_connection_is_closed_after_the_head_timeout(relay: Relay) -> None:
    server = relay.server("--head-timeout", HEAD_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # closed without a word: no request, no answer
    finally:
        writer.close()


async def test_a_kept_alive_connection_gets_the_same_head_timeout(relay: Relay) -> None:
    server = relay.server("--head-timeout", HEAD_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {server.apex}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(3)  # "ok\n"
            writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # the next head never completes
            assert await reader.read() == b""
    finally:
        writer.close()
