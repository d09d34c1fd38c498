"""Durable delivery when processes die and networks break (issue 4, "How to show it").

A webhook answered 200 or 202 has reached the app or the store: it must reach the app
whatever happens next. The server is SIGKILLed (a power cut as far as SQLite can tell)
and restarted on the same port and data dir; the agent's connection goes through a TCP
proxy of the test's own that cuts it at random. Duplicates are allowed only as the same
event delivered again (same ``X-Relay-Event-Id``), for events in flight at a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from .framework import FORWARDING, Relay, RelayServer, Reply, Seen, TargetService, fetch, until

#: Deliveries in flight to one app at once (the tunnel's max-concurrency, set by ``claim``:
#: the default, auto, could grow it with a fast app): the most events a kill can catch
#: between "the app got it" and "the store knows".
MAX_IN_FLIGHT = 8
#: Seconds the app gets to receive everything once the agent is back.
DRAIN = 90.0


@contextlib.asynccontextmanager
async def one_shot_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a connection per request: a killed server leaves no stale
    pooled connection for the next request to trip over."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        timeout=aiohttp.ClientTimeout(total=60),
        auto_decompress=False,
    ) as session:
        yield session


def claim(relay: Relay, server: RelayServer, token: str) -> None:
    """Claim alice's tunnel (queue mode) without an agent, so that it takes webhooks."""
    result = relay.agent_cli(
        server, token, "tunnel", "set", "alice", "--mode", "queue", "--max-concurrency", str(MAX_IN_FLIGHT)
    )
    assert result.returncode == 0, result.stderr


async def post(http: aiohttp.ClientSession, server: RelayServer, path: str, body: bytes) -> Reply:
    return await fetch(
        http,
        "POST",
        server.url(path),
        f"alice.{server.apex}",
        headers=[("Content-Type", "application/json")],
        body=body,
    )


def queued_id(reply: Reply) -> str:
    assert reply.status == 202, (reply.status, reply.body)
    assert reply.header("X-Relay-Event") == reply.json()["event"]
    return str(reply.json()["event"])


def arrived(target: TargetService) -> dict[str, list[bytes]]:
    """Event id -> the bodies the app got under it (more than one: a duplicate)."""
    found: dict[str, list[bytes]] = {}
    for seen in list(target.requests):
        found.setdefault(seen.header("X-Relay-Event-Id") or "", []).append(seen.body)
    return found


@dataclass
class HoldingTarget(TargetService):
    """Answers the first ``hold_after`` requests at once and holds every later one until
    ``release`` is set: the queue cannot drain past that point, however fast the machine,
    before the test has acted."""

    hold_after: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    async def _respond(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        if len(self.requests) > self.hold_after:
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        return await super()._respond(request, seen)


def check_arrivals(target: TargetService, sent: dict[str, bytes]) -> int:
    """Every sent event arrived, each arrival is a sent event with its own body;
    returns the number of duplicates."""
    found = arrived(target)
    assert set(found) == set(sent), f"missing {len(set(sent) - set(found))}, unknown {set(found) - set(sent)}"
    for event_id, bodies in found.items():
        assert set(bodies) == {sent[event_id]}, f"{event_id} arrived with another body"
    return sum(len(bodies) - 1 for bodies in found.values())


@pytest.mark.slow(10)
@pytest.mark.timeout(240)
async def test_1000_webhooks_survive_sigkills(relay: Relay) -> None:
    server = relay.server()
    token = server.token("alice")
    target = relay.target("alice", kind=HoldingTarget)
    assert isinstance(target, HoldingTarget)
    target.hold_after = 300
    claim(relay, server, token)

    # The agent is offline: 1,000 webhooks, 50 senders at a time, each answered 202.
    sent: dict[str, bytes] = {}
    senders = asyncio.Semaphore(50)

    async def send(http: aiohttp.ClientSession, i: int) -> None:
        body = json.dumps({"n": i, "nonce": os.urandom(8).hex()}).encode()
        async with senders:
            reply = await post(http, server, f"/hook/{i}", body)
        sent[queued_id(reply)] = body

    async with one_shot_session() as http:
        await asyncio.gather(*(send(http, i) for i in range(1000)))
    assert len(sent) == 1000

    # Killed right after the last 202; restarted on the same port and data dir.
    assert server.kill() == -signal.SIGKILL
    server = server.restarted()
    agent = relay.agent(server, token, target.forward)

    # Killed again while the queue drains: the app answered 300 events and holds the
    # ones after them, so some are in flight at the kill whatever the machine's speed.
    await until(lambda: len(arrived(target)) > 300, DRAIN, "events after the first 300 to arrive")
    assert server.kill() == -signal.SIGKILL
    at_kill = len(target.requests)
    assert at_kill <= 300 + MAX_IN_FLIGHT, f"{at_kill} arrivals: more than {MAX_IN_FLIGHT} in flight"
    target.release.set()
    server = server.restarted()  # the very same agent reconnects by itself

    await until(lambda: set(arrived(target)) >= set(sent), DRAIN, "all 1,000 events to arrive")
    duplicates = check_arrivals(target, sent)
    # At most the deliveries in flight at the second kill come again, not the 300+ before it.
    assert duplicates <= MAX_IN_FLIGHT, f"{duplicates} duplicates; at most {MAX_IN_FLIGHT} were in flight"
    assert agent.process.running()


#: Server lives, each ended by a SIGKILL right after the one 202 it gave. Each is the same
#: race (the kill against the commit of the event just answered), each costs a server
#: start (about a second on a loaded machine); a 202 sent before its commit loses the event
#: whenever the kill, milliseconds later, beats that commit, so it shows within a few dozen
#: lives. 40 rather than 200: the suite's time on two cores is better spent elsewhere.
SIGKILL_LOOPS = 40


@pytest.mark.slow(40)
@pytest.mark.timeout(300)
async def test_sigkills_right_after_202_lose_nothing(relay: Relay) -> None:
    server = relay.server()
    token = server.token("alice")
    target = relay.target("alice")
    claim(relay, server, token)

    sent: dict[str, bytes] = {}
    async with one_shot_session() as http:
        for i in range(SIGKILL_LOOPS):
            if i:
                server = server.restarted()
            body = json.dumps({"loop": i, "nonce": os.urandom(8).hex()}).encode()
            sent[queued_id(await post(http, server, f"/loop/{i}", body))] = body
            assert server.kill() == -signal.SIGKILL  # no time for anything after the 202

    server = server.restarted()
    relay.agent(server, token, target.forward)
    await until(lambda: set(arrived(target)) >= set(sent), DRAIN, f"all {SIGKILL_LOOPS} events to arrive")
    assert len(set(sent.values())) == SIGKILL_LOOPS
    assert check_arrivals(target, sent) == 0  # nothing was in flight at any kill


# -- a flaky network between agent and server ---------------------------------------------------


class ChaosProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``; ``cut()`` aborts every
    connection through it at once (RST both ways), as a dropped Wi-Fi would."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.connections = 0
        self.cuts = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cuts += 1
        for link in list(self.links):
            self.links.discard(link)  # at once: ``links`` then holds only connections made since
            for writer in link:
                writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self.links.add(link)
        self.connections += 1
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.links.discard(link)
            for task in pipes:
                task.cancel()
            for end in link:
                end.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


#: Cuts of the agent's connection, each after it carried traffic for a random while, and
#: the webhooks per second sent throughout. The chaos ends after a number of cuts, each
#: of a live connection, not after a number of seconds: how many cuts fit in a minute
#: depends on the machine, and a cut while the agent is still reconnecting cuts nothing.
#: 12 cuts of 0.5-2.5 s lives (about 30 s, some 600 webhooks) hit deliveries inline and
#: queued as surely as the earlier 60 s with cuts 0.5-5 s apart did.
CUTS = 12
RATE = 20
LIVE_FOR = (0.5, 2.5)
#: Seconds the agent gets to come back through the proxy after a cut (backoff from 0.5 s).
RECONNECT = 30.0


@pytest.mark.slow(25)
@pytest.mark.timeout(240)
async def test_connections_cut_at_random_under_load_lose_nothing(relay: Relay) -> None:
    server = relay.server()
    token = server.token("alice")
    target = relay.target("alice")
    proxy = ChaosProxy(server.port)
    await proxy.start()
    agent = relay.agent(
        server, token, target.forward, ready=False, server_url=f"http://127.0.0.1:{proxy.port}"
    )
    await agent.process.line(FORWARDING.pattern, count=2)

    outcomes: dict[bytes, Reply | BaseException] = {}

    async def send(http: aiohttp.ClientSession, i: int) -> None:
        body = json.dumps({"chaos": i, "nonce": os.urandom(8).hex()}).encode()
        try:
            outcomes[body] = await post(http, server, f"/chaos/{i}", body)
        except (aiohttp.ClientError, TimeoutError) as exc:  # e.g. a 200 cut mid-body
            outcomes[body] = exc

    async def cutter() -> None:
        for _ in range(CUTS):
            await until(lambda: proxy.links, RECONNECT, "the agent to connect through the proxy")
            await asyncio.sleep(random.uniform(*LIVE_FOR))
            proxy.cut()

    cutting = asyncio.create_task(cutter())
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=90)
        ) as http:
            sends = []
            while not cutting.done():
                sends.append(asyncio.create_task(send(http, len(sends))))
                await asyncio.sleep(1 / RATE)
            await cutting  # the network is good again (and the cutter raised nothing)
            await asyncio.gather(*sends)

        # What the senders were told: the app's own 200, or 202 queued; nothing else.
        statuses = Counter(o.status if isinstance(o, Reply) else type(o).__name__ for o in outcomes.values())
        assert set(statuses) <= {200, 202, "ClientPayloadError"}, statuses
        assert statuses[200] and statuses[202], statuses  # the cuts did hit deliveries
        # Every cut hit a live connection, and the agent came back after each one.
        assert proxy.cuts == CUTS and proxy.connections >= CUTS

        sent: dict[str, bytes] = {}
        for body, outcome in outcomes.items():
            if isinstance(outcome, Reply) and outcome.status == 202:
                sent[queued_id(outcome)] = body
            elif isinstance(outcome, Reply):
                headers = dict(outcome.json()["headers"])  # the app's echo
                sent[headers["X-Relay-Event-Id"]] = body

        await until(lambda: set(arrived(target)) >= set(sent), DRAIN, f"all {len(sent)} answered webhooks")
        found = arrived(target)
        for event_id, body in sent.items():
            assert set(found[event_id]) == {body}
        assert agent.process.running()
    finally:
        cutting.cancel()
        await proxy.close()
