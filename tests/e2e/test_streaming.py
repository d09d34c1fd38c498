"""Streaming through the tunnel: event streams, 64 MiB bodies under flow control,
backpressure both ways without head-of-line blocking, cancellation and timeouts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from relay_protocol.limits import MAX_WINDOW

from .framework import Relay, RelayServer, Seen, TargetService, client_session, until
from .streaming_targets import BLOCK, MIB, StreamingTarget

#: The issue's bound on how much the peak RSS of server and agent may grow during a
#: 64 MiB transfer: flow control must keep bodies streaming, never buffered whole.
MAX_RSS_GROWTH = 48 * MIB
TRANSFER_MIB = 64

#: Most body bytes of one stalled stream held between the kernel's socket queues and the
#: test's own reads: the receiving relay process's window for the stream, plus the
#: other's read-ahead (the agent reads 256 KiB and one 256 KiB read ahead of its credit,
#: and holds the chunk it is sending) and each process's transport buffers. Measured:
#: 3.3-4.8 MB for a download, 4.0-4.4 MB for an upload, against 4.2 MB of window.
MAX_HELD = MAX_WINDOW + 2 * MIB


@dataclass
class GatedEvents(TargetService):
    """``/events?n=N``: an event stream that sends event 0 at once and holds the other
    N - 1 until the test opens ``gate``; records whether the request was cancelled. The
    test, not the clock, decides when the service speaks."""

    gate: threading.Event = field(default_factory=threading.Event)
    events_sent: int = 0
    cancelled: bool = False

    async def _respond(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        if request.path != "/events":
            return await super()._respond(request, seen)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(int(request.query.get("n", "5"))):
                while i and not self.gate.is_set():
                    await asyncio.sleep(0.02)
                # Counted before it is written: the client may have it before this
                # coroutine resumes (a CI run read 0 after the client had event 0).
                self.events_sent = i + 1
                await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await response.write_eof()
        return response


def _stack(
    relay: Relay, target: StreamingTarget | TargetService, *server_options: str
) -> tuple[RelayServer, int]:
    server = relay.server(*server_options)
    # Live mode: these tests are about streaming; in queue mode a chunked POST of up
    # to 10 MiB is read whole first, to be stored (tests/e2e/test_queue.py).
    agent = relay.agent(server, server.token("bulk"), target.forward, extra=["--mode", "live"])
    assert server.process is not None
    return server, agent.process.pid


def _url(server: RelayServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}/t/bulk{path}"


def _headers(server: RelayServer) -> dict[str, str]:
    return {"Host": server.apex}


class Peak:
    """Peak resident memory of a process since ``reset()``, from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _field(self, name: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {name} for pid {self.pid}")

    def reset(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        self.start = self._field("VmRSS")

    @property
    def growth(self) -> int:
        return self._field("VmHWM") - self.start


def _queued_in_kernel(*ports: int) -> int:
    """Bytes in the kernel's queues (sent and not yet acknowledged, or received and not
    yet read) of every established TCP connection with an end on one of ``ports``, both
    ends of each, from /proc/net/tcp (Linux; columns per proc_net_tcp.rst).

    A stalled transfer's bytes wait there as well as in the relay: how much depends on
    the machine's buffer autotuning (``net.ipv4.tcp_rmem`` lets a loopback receive
    buffer grow to 32 MiB on some hosts), so a test bounds what the relay holds, which
    is what is sent minus what is read minus this."""
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):  # a kernel booted without IPv6
            continue
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, remote, state, queues = row.split()[1:5]
                ends = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if state == "01" and ends & set(ports):  # 01: ESTABLISHED
                    tx, rx = queues.split(":")
                    queued += int(tx, 16) + int(rx, 16)
    return queued


async def _blocks(mib: int, sent: list[int]) -> AsyncIterator[bytes]:
    for _ in range(mib * 16):
        sent[0] += len(BLOCK)
        yield BLOCK


async def _settled(count: Callable[[], int], bound: int) -> int:
    """Wait until ``count()`` stops growing (unchanged over 0.5 s: the pipeline is full)
    or reaches ``bound`` (the whole transfer: the socket buffers took it). No deadline of
    its own: the verdict is the caller's byte bound, and a slow machine only makes this
    wait longer (pytest-timeout ends a real hang)."""
    last = -1
    while (now := count()) != last and now < bound:
        last = now
        await asyncio.sleep(0.5)
    return now


async def test_events_arrive_as_they_are_sent(relay: Relay) -> None:
    events = relay.target("events", kind=GatedEvents)
    server, _ = _stack(relay, events, "--timeout", "1")
    async with client_session() as http:
        async with http.get(_url(server, "/events?n=6"), headers=_headers(server)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            # The service holds events 1-5 until the client has event 0: a relay that
            # buffered the response would never hand it over (and this would time out).
            async with asyncio.timeout(30):
                first = await resp.content.readuntil(b"\n\n")
            assert events.events_sent == 1
            # Silent for longer than --timeout 1, which bounds the wait for the head
            # only: the started stream is not cut (a sleep that shows nothing happens).
            await asyncio.sleep(1.5)
            events.gate.set()
            rest = await resp.read()
    assert first == b"id: 0\ndata: event 0\n\n"
    assert rest.count(b"data: event") == 5
    assert events.events_sent == 6


async def test_a_silent_stream_is_cut_after_the_idle_limit(relay: Relay) -> None:
    events = relay.target("events", kind=GatedEvents)  # the gate stays shut: silent after event 0
    server, _ = _stack(relay, events, "--idle-timeout", "1")
    async with client_session() as http:
        async with http.get(_url(server, "/events?n=3"), headers=_headers(server)) as resp:
            assert await resp.content.readuntil(b"\n\n") == b"id: 0\ndata: event 0\n\n"
            # Only the idle limit can end it: the service would stay silent forever.
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert events.events_sent == 1
    await until(lambda: events.cancelled, 20, "the agent to cancel the silent local request")


async def test_64_mib_download_streams_in_bounded_memory(relay: Relay, target: StreamingTarget) -> None:
    server, agent_pid = _stack(relay, target)
    assert server.process is not None
    peaks = [Peak(server.process.pid), Peak(agent_pid)]
    for peak in peaks:
        peak.reset()
    digest = hashlib.sha256()
    length = 0
    async with client_session() as http:
        async with http.get(_url(server, f"/down?mib={TRANSFER_MIB}"), headers=_headers(server)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(TRANSFER_MIB * MIB)
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
                length += len(chunk)
    assert length == TRANSFER_MIB * MIB
    assert digest.hexdigest() == hashlib.sha256(BLOCK * TRANSFER_MIB * 16).hexdigest()
    for peak in peaks:
        assert peak.growth < MAX_RSS_GROWTH, f"pid {peak.pid} grew by {peak.growth / MIB:.1f} MiB"


async def test_64_mib_upload_streams_in_bounded_memory(relay: Relay, target: StreamingTarget) -> None:
    server, agent_pid = _stack(relay, target)
    assert server.process is not None
    peaks = [Peak(server.process.pid), Peak(agent_pid)]
    for peak in peaks:
        peak.reset()
    sent = [0]
    async with (
        client_session() as http,
        http.post(_url(server, "/up"), headers=_headers(server), data=_blocks(TRANSFER_MIB, sent)) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    assert answer == {
        "length": TRANSFER_MIB * MIB,
        "sha256": hashlib.sha256(BLOCK * TRANSFER_MIB * 16).hexdigest(),
    }
    for peak in peaks:
        assert peak.growth < MAX_RSS_GROWTH, f"pid {peak.pid} grew by {peak.growth / MIB:.1f} MiB"


async def test_a_stalled_download_slows_the_service_and_blocks_no_other_stream(
    relay: Relay, target: StreamingTarget
) -> None:
    server, agent_pid = _stack(relay, target)
    assert server.process is not None
    peaks = [Peak(server.process.pid), Peak(agent_pid)]
    for peak in peaks:
        peak.reset()
    async with client_session() as http:
        resp = await http.get(_url(server, f"/down?mib={TRANSFER_MIB}"), headers=_headers(server))
        first = await resp.content.readexactly(MIB)  # then stop reading
        assert first == (BLOCK * 16)[:MIB]
        # The service stops being read: what it has sent waits in socket buffers and
        # at most one window in the relay, instead of piling up in the relay.
        await until(lambda: target.bytes_sent > 2 * MIB, 30, "the service to start sending")
        await _settled(lambda: target.bytes_sent, TRANSFER_MIB * MIB)
        queued = _queued_in_kernel(server.port, target.port)
        held = target.bytes_sent - resp.content.total_bytes - queued  # the client reads ahead
        assert held < MAX_HELD, f"the relay holds {held} bytes ({queued} more in socket buffers)"
        # Another stream on the same agent completes while the big one is stalled.
        async with http.get(_url(server, "/small"), headers=_headers(server)) as small:
            assert small.status == 200
            assert await small.read() == b"small"
        for peak in peaks:  # nobody holds the rest of the body in memory meanwhile
            assert peak.growth < MAX_RSS_GROWTH, f"pid {peak.pid} grew by {peak.growth / MIB:.1f} MiB"
        rest = await resp.read()
        resp.release()
    assert len(first) + len(rest) == TRANSFER_MIB * MIB


async def test_a_slow_reading_service_slows_the_upload_and_blocks_no_other_stream(
    relay: Relay, target: StreamingTarget
) -> None:
    server, _ = _stack(relay, target)
    target.hold_uploads.set()  # the service accepts the request but reads nothing
    sent = [0]
    async with client_session() as http:
        upload = asyncio.create_task(
            http.post(_url(server, "/up"), headers=_headers(server), data=_blocks(TRANSFER_MIB, sent))
        )
        await until(lambda: sent[0] > 2 * MIB, 30, "the client to start sending")
        await _settled(lambda: sent[0], TRANSFER_MIB * MIB)
        # The client is held back too: what it sent waits in socket buffers and at most
        # one window in the relay.
        queued = _queued_in_kernel(server.port, target.port)
        held = sent[0] - target.bytes_fed - queued  # the service reads ahead
        assert held < MAX_HELD, f"the relay holds {held} bytes ({queued} more in socket buffers)"
        async with http.get(_url(server, "/small"), headers=_headers(server)) as small:
            assert await small.read() == b"small"
        target.hold_uploads.clear()
        resp = await upload
        answer = await resp.json()
        resp.release()
    assert answer["length"] == TRANSFER_MIB * MIB


async def test_a_client_that_goes_away_cancels_the_local_request(
    relay: Relay, target: StreamingTarget
) -> None:
    server, _ = _stack(relay, target)
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /t/bulk/hang HTTP/1.1\r\nHost: {server.apex}\r\n\r\n".encode())
    await writer.drain()
    await until(lambda: target.hanging == ["/hang"], 20, "the request to reach the service")
    writer.close()
    await until(lambda: target.cancelled == ["/hang"], 20, "the local request to be cancelled")


async def test_a_hanging_service_gets_504_after_the_timeout(relay: Relay, target: StreamingTarget) -> None:
    server, _ = _stack(relay, target, "--timeout", "1")
    async with client_session() as http:
        async with http.get(_url(server, "/hang"), headers=_headers(server)) as resp:
            assert resp.status == 504
            assert resp.headers["X-Relay-Error"] == "local-timeout"
    await until(lambda: target.cancelled == ["/hang"], 20, "the agent to cancel the local request")


async def test_expect_100_continue_is_answered_before_the_body(relay: Relay, target: StreamingTarget) -> None:
    server, _ = _stack(relay, target)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        body = b"sent only after 100 Continue"
        writer.write(
            f"POST /t/bulk/up HTTP/1.1\r\nHost: {server.apex}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert hashlib.sha256(body).hexdigest().encode() in answer
