"""Processes that die, restart, hang or are not there: what public clients see meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket

import aiohttp
import pytest

from .framework import FORWARDING, REQUEST_LINE, Relay, Reply, Tunnel, fetch, free_port, through, until

FORMS = ["subdomain", "path"]

#: Seconds an agent gets to reconnect by itself after a server restart: its backoff
#: starts at 0.5 s and doubles, so a few attempts fit.
RECONNECT = 15.0


async def serves(http: aiohttp.ClientSession, tunnel: Tunnel, form: str = "subdomain") -> Reply | None:
    """The reply if the tunnel serves a request right now, else None (for polling)."""
    reply = await through(http, tunnel, form, "GET", "/alive")
    return reply if reply.status == 200 else None


def server_saw_disconnects(tunnel: Tunnel, count: int = 1) -> None:
    """Wait until the server has noticed ``count`` agent disconnects (its log says so)."""
    assert tunnel.server.process is not None
    tunnel.server.process.wait_for_line(r"agent disconnected", stream="stderr", count=count)


@pytest.mark.parametrize("form", FORMS)
async def test_killed_agent_gives_a_fast_503(relay: Relay, http: aiohttp.ClientSession, form: str) -> None:
    tunnel = relay.tunnel()
    assert await serves(http, tunnel, form)

    tunnel.agent.process.send(signal.SIGKILL)
    assert await tunnel.agent.process.exited() == -signal.SIGKILL
    # (a GET: in queue mode a POST would be stored and answered 202, see test_queue.py)
    # "Fast" as a client sees it: a 503 tunnel-offline says the relay knew the agent was
    # gone; a relay that kept forwarding to the dead connection would hang until its
    # --timeout and answer 504 local-timeout instead (no wall clock to read on a slow CI).
    reply = await through(http, tunnel, form, "GET", "/hook")
    assert reply.status == 503
    assert reply.relay_error == "tunnel-offline"
    assert "Traceback" not in reply.body.decode()

    # It stays a 503, not a hang (a 504), for every later request.
    for _ in range(3):
        reply = await through(http, tunnel, form, "GET", "/again")
        assert (reply.status, reply.relay_error) == (503, "tunnel-offline")


async def test_agent_stopped_with_sigterm_exits_0_and_gives_503(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    tunnel = relay.tunnel()
    tunnel.agent.process.send(signal.SIGTERM)
    assert await tunnel.agent.process.exited() == 0
    reply = await through(http, tunnel, "path", "GET", "/")
    assert (reply.status, reply.relay_error) == (503, "tunnel-offline")  # not a hang's 504


async def test_restarted_agent_serves_the_same_urls(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    first_urls = tunnel.agent.ready()
    tunnel.agent.process.kill()
    assert (await through(http, tunnel, "subdomain", "GET", "/")).status == 503

    again = relay.agent(tunnel.server, tunnel.token, tunnel.target.forward)
    assert again.ready() == first_urls
    for form in FORMS:
        reply = await through(http, tunnel, form, "GET", "/back?x=1")
        assert reply.status == 200
        assert reply.json()["path"] == "/back?x=1"


async def test_two_agents_on_one_name_both_serve_in_turn(relay: Relay, http: aiohttp.ClientSession) -> None:
    server = relay.server()
    token = server.token("alice")
    first = relay.tunnel(server, token=token, target=relay.target("first"))
    second = relay.agent(server, token, relay.target("second").forward)
    assert [url for url, _ in second.ready()] == [url for url, _ in first.agent.ready()]  # same URLs

    labels = [
        (await through(http, first, FORMS[i % 2], "GET", f"/turn/{i}")).json()["target"] for i in range(10)
    ]
    assert sorted(labels) == ["first"] * 5 + ["second"] * 5
    assert all(a != b for a, b in itertools.pairwise(labels)), labels  # they alternate

    # Zero-downtime restart: once the first agent is gone, the second serves everything.
    first.agent.process.kill()
    await asyncio.to_thread(server_saw_disconnects, first)
    for i in range(6):
        reply = await through(http, first, FORMS[i % 2], "GET", f"/after/{i}")
        assert reply.status == 200
        assert reply.json()["target"] == "second"


async def test_agent_reconnects_by_itself_after_a_server_restart(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    tunnel = relay.tunnel()
    urls = tunnel.agent.forwarding()
    assert await serves(http, tunnel)

    assert tunnel.server.stop(signal.SIGTERM) == 0
    # Same port, same data dir: the secret, the token and the claimed name carry over.
    restarted = relay.server(port=tunnel.server.port, data_dir=tunnel.server.data_dir)
    tunnel.server = restarted
    reply = await until(lambda: serves(http, tunnel), RECONNECT, "the agent to reconnect")
    assert reply.json()["target"] == "alice"
    assert (await serves(http, tunnel, "path")) is not None

    assert tunnel.agent.process.running()  # the very same agent process
    assert tunnel.agent.forwarding() == urls  # and its URLs did not change


async def test_sigterm_finishes_the_request_in_flight(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    held = asyncio.create_task(through(http, tunnel, "subdomain", "POST", "/hold?key=term", body=b"x"))
    await until(lambda: tunnel.target.seen("/hold"), 10, "the held request to reach the target")

    tunnel.server.process.send(signal.SIGTERM)  # type: ignore[union-attr]

    async def draining() -> bool:
        reply = await fetch(http, "GET", tunnel.server.url("/readyz"), tunnel.server.apex)
        return reply.relay_error == "not-ready"

    await until(draining, 10, "the server to start draining")
    tunnel.target.release("term")
    reply = await held
    assert reply.status == 200
    assert reply.body == b"released"
    assert await tunnel.server.process.exited() == 0  # type: ignore[union-attr]
    await tunnel.agent.process.line(r"disconnected from the server \(1001\b", stream="stderr")


async def test_sigterm_tells_the_agent_going_away_and_it_comes_back(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    tunnel = relay.tunnel()
    assert await serves(http, tunnel)

    tunnel.server.process.send(signal.SIGTERM)  # type: ignore[union-attr]
    assert await tunnel.server.process.exited() == 0  # type: ignore[union-attr]
    # The agent was told the server is going away (1001), and keeps trying to come back.
    await tunnel.agent.process.line(r"disconnected from the server \(1001\b", stream="stderr")
    assert tunnel.agent.process.running()
    tunnel.server = relay.server(port=tunnel.server.port, data_dir=tunnel.server.data_dir)
    await until(lambda: serves(http, tunnel), RECONNECT, "the agent to reconnect")


@pytest.mark.parametrize("form", FORMS)
async def test_local_service_down_gives_502(relay: Relay, http: aiohttp.ClientSession, form: str) -> None:
    server = relay.server()
    closed = free_port()  # nothing listens here
    agent = relay.agent(server, server.token("alice"), f"127.0.0.1:{closed}")
    assert agent.ready()[0][1] == f"http://127.0.0.1:{closed}"
    tunnel = Tunnel(server, None, agent, "alice", "")  # type: ignore[arg-type]

    reply = await through(http, tunnel, form, "GET", "/hook")
    assert reply.status == 502
    assert reply.relay_error == "local-unreachable"
    assert "Traceback" not in reply.body.decode()
    await agent.process.line(REQUEST_LINE.format(method="GET", path="/hook", status=502))
    assert agent.process.running()  # a dead target is no reason for the agent to quit


@pytest.mark.parametrize("form", FORMS)
async def test_local_service_too_slow_gives_504(relay: Relay, http: aiohttp.ClientSession, form: str) -> None:
    server = relay.server("--timeout", "1")
    tunnel = relay.tunnel(server)
    reply = await through(http, tunnel, form, "GET", "/slow?seconds=5")
    # The relay's --timeout 1 ended it, not the target: its own answer after 5 s would be
    # a 200 "slept 5" (the agent leaves the head timeout to the server); the body names 1 s.
    assert reply.status == 504
    assert reply.relay_error == "local-timeout"
    assert "within 1s" in reply.body.decode(), reply.body
    assert [s.raw_path for s in tunnel.target.requests] == ["/slow?seconds=5"]  # it did reach it
    # The tunnel is fine afterwards.
    assert await serves(http, tunnel, form)


async def test_a_killed_server_is_reported_as_a_lost_connection_and_the_agent_comes_back(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # With no close frame the agent logged "disconnected from the server (None no close
    # frame received or sent)": a code that does not exist and the library's words.
    tunnel = relay.tunnel()
    assert await serves(http, tunnel)
    assert tunnel.server.kill() == -signal.SIGKILL
    pattern = r"WARNING relay.agent: lost the connection to the server \(it ended without a close frame\)$"
    await tunnel.agent.process.line(pattern, stream="stderr")
    tunnel.server = tunnel.server.restarted()
    await until(lambda: serves(http, tunnel), RECONNECT, "the agent to reconnect")


async def test_a_stale_connection_does_not_hold_the_name(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    # A frozen agent keeps its TCP connection open but answers nothing: a half-open peer.
    tunnel.agent.process.send(signal.SIGSTOP)
    try:
        fresh = relay.agent(tunnel.server, tunnel.token, relay.target("fresh").forward)
        assert [url for url, _ in fresh.ready()] == [url for url, _ in tunnel.agent.ready()]
    finally:
        tunnel.agent.process.send(signal.SIGCONT)
    tunnel.agent.process.kill()
    await asyncio.to_thread(server_saw_disconnects, tunnel)
    reply = await through(http, tunnel, "path", "GET", "/who")
    assert reply.status == 200
    assert reply.json()["target"] == "fresh"


@pytest.mark.slow(18)
async def test_a_frozen_server_is_noticed_within_the_heartbeat_timeout(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # A half-open connection: the server's process is frozen, its socket stays open. The
    # agent pings every 5 s, the shortest interval (the default is 10 s: the same rule).
    tunnel = relay.tunnel(agent_extra=("--heartbeat-interval", "5"))
    assert await serves(http, tunnel, "path")
    assert tunnel.server.process is not None
    tunnel.server.process.send(signal.SIGSTOP)
    try:
        # The agent gives the server up by its heartbeat, nothing else: the frozen process
        # never closes the socket. That this happens exactly three intervals after the last
        # frame is the pure schedule's to prove, on a fake clock (tests/protocol/test_heartbeat.py);
        # a wall-clock bound here would depend on the machine's load.
        await tunnel.agent.process.line(r"no frame from the server for 15s", stream="stderr", timeout=60)
    finally:
        tunnel.server.process.send(signal.SIGCONT)
    # And it reconnects by itself once the server answers again.
    assert await until(lambda: serves(http, tunnel, "path"), 60, "the agent to reconnect")
    # Having dropped the connection itself, it does not blame the network next (a review).
    assert not [line for line in tunnel.agent.process.stderr_lines if "lost the connection" in line]


class SlowLink:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` that carries each direction of
    each connection at ``rate`` bytes a second, with small socket buffers: a slow link
    (a poor mobile connection) that holds little in flight."""

    CHUNK = 4096
    BUFFER = 16 * 1024

    def __init__(self, upstream: int, rate: float) -> None:
        self.upstream, self.rate, self.port = upstream, rate, 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=self.CHUNK)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _small(self, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, self.BUFFER)
        writer.transport.set_write_buffer_limits(self.CHUNK)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream, limit=self.CHUNK)
        for end in (writer, up_writer):
            self._small(end)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)
            for end in (writer, up_writer):
                end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        started, carried = loop.time(), 0
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(self.CHUNK):
                carried += len(data)
                # Sleep until the link would have carried this much at its rate.
                await asyncio.sleep(max(0.0, started + carried / self.rate - loop.time()))
                writer.write(data)
                await writer.drain()


@pytest.mark.slow(10)
async def test_a_slow_link_under_the_shortest_heartbeat_is_not_taken_for_a_dead_agent(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # The server pings every 5 s (the shortest interval), the agent every 10 s (the sides
    # need not agree), and two uploads keep a 40 KB/s link busy for seconds on end: the
    # server holds its PINGs back while its frames wait, its PINGs then wait behind the
    # backlog in the socket buffers, and the agent, busy receiving, has no reason to
    # talk. At 1 s (no longer accepted) the server dropped the agent and both got 503.
    server = relay.server("--heartbeat-interval", "5")
    token = server.token("alice")
    target = relay.target("alice")
    link = SlowLink(server.port, rate=40_000)
    await link.start()
    try:
        slow = f"http://127.0.0.1:{link.port}"
        # Not waited for inside: the link runs on this test's event loop.
        agent = relay.agent(
            server, token, target.forward, ready=False, extra=("--mode", "live"), server_url=slow
        )
        await agent.process.line(FORWARDING.pattern, count=2)
        body = b"u" * 150_000
        url, host = server.url("/t/alice/digest"), server.apex
        replies = await asyncio.gather(*(fetch(http, "POST", url, host, body=body) for _ in range(2)))
        assert [r.status for r in replies] == [200] * 2, [(r.status, r.relay_error) for r in replies]
        assert all(r.json()["length"] == len(body) for r in replies)
        assert server.process is not None
        assert "dropping it" not in server.process.stderr
    finally:
        await link.close()
