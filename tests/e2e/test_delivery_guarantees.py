"""Issue 7: retries follow time, not reconnects; the app back means at once; a full store.

Each test drives the real ``relay-server`` and ``relay-agent``; the local app is "down"
(nothing listens on its port) and later "up" (a service started on that very port). The
agent's connection goes through the chaos proxy of ``test_queue_durability``, which cuts
it at will, and the server is SIGKILLed and restarted on the same port and data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .framework import FORWARDING, Relay, RelayServer, Reply, TargetService, api, free_port, until
from .test_queue_durability import ChaosProxy, arrived, one_shot_session, post

#: Seconds every acknowledged webhook gets to reach the app once it is up.
DRAIN = 90.0
#: Link cuts in the flapping test: more than the 3 retries of its schedule + 1, so that on
#: the old code (a step spent per reconnect) every webhook was dead by the end.
CUTS = 6


class TargetAt(TargetService):
    """The echo target, started on a port chosen beforehand (so it can be "down" first)."""

    async def _start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()


def app_up(relay: Relay, port: int) -> TargetAt:
    target = TargetAt("alice", port=port)
    target.start()
    relay.targets.append(target)
    return target


def set_tunnel(relay: Relay, server: RelayServer, token: str, *options: str) -> None:
    result = relay.agent_cli(server, token, "tunnel", "set", "alice", "--mode", "queue", *options)
    assert result.returncode == 0, result.stderr


def events(relay: Relay, server: RelayServer, token: str, *args: str) -> list[dict[str, Any]]:
    result = relay.agent_cli(server, token, "events", "list", "--limit", "1000", "--json", *args)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def acknowledged(reply: Reply) -> str:
    """The event id of a webhook the relay took (202 queued: the app is down)."""
    assert reply.status == 202, (reply.status, reply.body)
    return str(reply.json()["event"])


@pytest.mark.slow(30)
@pytest.mark.timeout(240)
async def test_a_flapping_link_never_kills_a_webhook(relay: Relay) -> None:
    # Three retries: on the old code every reconnect spent one, and the ten webhooks
    # were dead after four reconnects (the issue: all 10 dead after 19 s).
    server = relay.server("--retry-schedule", "5s,30s,10m")
    token = server.token("alice")
    set_tunnel(relay, server, token)
    app_port = free_port()
    proxy = ChaosProxy(server.port)
    await proxy.start()
    agent = relay.agent(
        server, token, f"127.0.0.1:{app_port}", ready=False, server_url=f"http://127.0.0.1:{proxy.port}"
    )
    await agent.process.line(FORWARDING.pattern, count=2)
    try:
        sent: dict[str, bytes] = {}
        async with one_shot_session() as http:
            for i in range(10):
                body = json.dumps({"flap": i, "nonce": os.urandom(4).hex()}).encode()
                sent[acknowledged(await post(http, server, f"/flap/{i}", body))] = body
        # The link drops every 1-3 s, more often than the schedule has retries, while the
        # app stays down.
        connections = proxy.connections
        for _ in range(CUTS):
            await asyncio.sleep(random.uniform(1.0, 3.0))  # chaos pacing, not a wait for a state
            proxy.cut()
            await until(lambda c=proxy.connections: proxy.connections > c, 60, "the agent to reconnect")
        assert proxy.connections >= connections + CUTS
        assert events(relay, server, token, "--status", "dead") == []
        waiting = {e["id"]: e for e in events(relay, server, token)}
        assert set(waiting) == set(sent)
        for event in waiting.values():
            assert event["status"] == "retrying", event
            [delivery] = event["deliveries"]
            assert delivery["next_attempt_at"] and delivery["last_error"], delivery

        # The app comes up: every webhook arrives, once each, none died on the way.
        target = app_up(relay, app_port)
        await until(lambda: set(arrived(target)) >= set(sent), DRAIN, "all 10 webhooks")
        assert Counter(len(bodies) for bodies in arrived(target).values()) == {1: 10}
        assert events(relay, server, token, "--status", "dead") == []
    finally:
        await proxy.close()


@pytest.mark.slow(10)
@pytest.mark.timeout(240)
async def test_the_app_back_means_at_once_and_in_arrival_order(relay: Relay) -> None:
    # The next scheduled retry is ten minutes away: only the agent's probe of the app
    # (TARGET_UP) can bring them within the test's wait.
    server = relay.server("--retry-schedule", "10m")
    token = server.token("alice")
    set_tunnel(relay, server, token, "--max-concurrency", "1")
    app_port = free_port()
    relay.agent(server, token, f"127.0.0.1:{app_port}")
    ids = []
    async with one_shot_session() as http:
        for i in range(5):
            ids.append(acknowledged(await post(http, server, f"/back/{i}", b'{"n": %d}' % i)))
        listed = {e["id"]: e for e in events(relay, server, token, "--status", "retrying")}
        assert set(listed) == set(ids)  # retrying, with when and why
        for event in listed.values():
            [delivery] = event["deliveries"]
            assert delivery["next_attempt_at"] and "connection refused" in (delivery["last_error"] or ""), (
                delivery
            )
        target = app_up(relay, app_port)
        await until(lambda: len(target.requests) >= 5, DRAIN, "the five webhooks, at once")
        assert [s.header("X-Relay-Event-Id") for s in target.requests] == ids  # arrival order
        assert [s.raw_path for s in target.requests] == [f"/back/{i}" for i in range(5)]
        await until(
            lambda: len(events(relay, server, token, "--status", "delivered")) == 5, 30, "five delivered"
        )
        assert events(relay, server, token, "--status", "retrying") == []
        assert events(relay, server, token, "--status", "pending") == []


@pytest.mark.slow(35)
@pytest.mark.timeout(300)
async def test_chaos_link_cuts_and_server_kills_lose_no_acknowledged_webhook(relay: Relay) -> None:
    """The issue's "done when": link cut every 1-3 s, server SIGKILLed every ~7 s (the issue: ~10 s), for a
    bounded run with the app down, then the app up: every acknowledged webhook arrives."""
    server = relay.server("--retry-schedule", "5s,30s,10m")
    token = server.token("alice")
    set_tunnel(relay, server, token)
    app_port = free_port()
    proxy = ChaosProxy(server.port)
    await proxy.start()
    relay.agent(
        server, token, f"127.0.0.1:{app_port}", ready=False, server_url=f"http://127.0.0.1:{proxy.port}"
    )
    acked: dict[str, bytes] = {}
    refused = 0

    async def send(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal refused
        body = json.dumps({"chaos": i, "nonce": os.urandom(4).hex()}).encode()
        try:
            reply = await post(http, server, f"/chaos/{i}", body)
        except (aiohttp.ClientError, OSError):
            refused += 1  # the server was down: not acknowledged, nothing promised
            return
        if reply.status in (200, 202):
            acked[str(reply.json()["event"])] = body
        else:
            refused += 1

    async def cut_link(stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), random.uniform(1.0, 3.0))
            proxy.cut()

    stop = asyncio.Event()
    cutter = asyncio.create_task(cut_link(stop))
    try:
        async with one_shot_session() as http:
            for round_ in range(3):  # three server lives of ~7 s each
                loop = asyncio.get_running_loop()
                until_kill = loop.time() + random.uniform(6.0, 8.0)
                i = 0
                while loop.time() < until_kill:
                    await send(http, round_ * 1000 + i)
                    i += 1
                    await asyncio.sleep(0.2)  # the webhooks pace
                assert server.kill() == -signal.SIGKILL
                server = server.restarted()
        stop.set()
        await cutter
        assert acked, "no webhook was acknowledged"
        assert events(relay, server, token, "--status", "dead") == []

        target = app_up(relay, app_port)
        await until(
            lambda: set(arrived(target)) >= set(acked), DRAIN, f"all {len(acked)} acknowledged webhooks"
        )
        found = arrived(target)
        for event_id, body in acked.items():
            assert set(found[event_id]) == {body}
        # The app was down through the chaos: nothing was in flight at it, so no duplicates.
        assert sum(len(bodies) - 1 for bodies in found.values()) == 0
        assert events(relay, server, token, "--status", "dead") == []
    finally:
        stop.set()
        await proxy.close()


async def test_a_store_full_of_delivered_webhooks_makes_room_instead_of_refusing(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # 512 KiB of store, 40 KiB webhooks: a dozen fit. 60 delivered webhooks in a row all
    # get the app's 200: the oldest delivered ones are purged to make room (before their
    # 7-day retention); on the old code the 13th or so got 503 store-unavailable.
    server = relay.server("--store-max-bytes", str(512 * 1024))
    token = server.token("alice")
    set_tunnel(relay, server, token)
    target = relay.target("alice")
    agent = relay.agent(server, token, target.forward)
    body = b"x" * (40 * 1024)
    statuses = Counter()
    for i in range(60):
        reply = await post(http, server, f"/full/{i}", body)
        statuses[reply.status] += 1
    assert statuses == {200: 60}
    assert len(target.requests) == 60
    kept = events(relay, server, token)
    assert 0 < len(kept) < 60  # some were purged to make room
    newest = [e["target"] for e in kept]  # newest first
    assert newest == [f"/full/{i}" for i in range(59, 59 - len(kept), -1)]  # the oldest went first
    # Waiting webhooks are never purged: with the agent gone they are answered 202 until
    # the store is full of waiting ones, then 503, never a false 2xx.
    agent.process.kill()

    async def offline() -> bool:
        reply = await api(http, server, token, "GET", "tunnels/alice")
        return bool(reply.json()["agents"] == 0)

    await until(offline, 30, "the agent to be gone")
    waiting = []
    for i in range(40):
        reply = await post(http, server, f"/wait/{i}", body)
        if reply.status == 503:
            assert reply.relay_error == "store-unavailable"
            break
        waiting.append(acknowledged(reply))
    else:
        pytest.fail("a 512 KiB store took 40 waiting webhooks of 40 KiB")
    assert waiting
    assert {e["id"] for e in events(relay, server, token, "--status", "pending")} == set(waiting)


class EarlyAnswerApp:
    """A raw HTTP app that answers every request as soon as its head arrived, then never
    reads the body (nor closes): the agent's upload to it stalls for good."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nearly")
            await writer.drain()

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()


async def test_an_app_that_answers_before_reading_the_body_is_a_success(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # On the old code the relay sent the whole body before waiting for the answer: the
    # upload stalled, the agent reset the stream once the answer was relayed, and the
    # attempt counted as failed (202, retried until dead).
    server = relay.server("--timeout", "5")
    token = server.token("alice")
    set_tunnel(relay, server, token)
    app = EarlyAnswerApp()
    await app.start()
    try:
        relay.agent(server, token, f"127.0.0.1:{app.port}")
        reply = await post(http, server, "/early", os.urandom(8 * 1024 * 1024))
        assert (reply.status, reply.body) == (200, b"early")

        async def delivered() -> bool:
            return bool(events(relay, server, token, "--status", "delivered"))

        await until(delivered, 30, "the event recorded delivered")
        [event] = events(relay, server, token)
        assert (event["status"], event["deliveries"][0]["attempts"]) == ("delivered", 1)
        assert len(app.heads) == 1
    finally:
        await app.close()


@pytest.mark.slow(10)
async def test_a_frozen_agent_costs_a_sender_the_timeout_not_the_heartbeat(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # The agent is SIGSTOPped: it reads nothing, so a body over the flow-control window
    # cannot be sent. --timeout (2 s) covers opening the stream and sending the body: the
    # attempt ends as "no answer within 2s" and the sender gets 202. On the old code the
    # send waited for the heartbeat to drop the agent (30 s), and the attempt was recorded
    # as "agent disconnected".
    server = relay.server("--timeout", "2")
    token = server.token("alice")
    set_tunnel(relay, server, token)
    target = relay.target("alice")
    agent = relay.agent(server, token, target.forward)
    agent.process.send(signal.SIGSTOP)
    try:
        reply = await post(http, server, "/frozen", os.urandom(2 * 1024 * 1024))
        event_id = acknowledged(reply)

        async def recorded() -> dict[str, Any] | None:
            [event] = events(relay, server, token)
            return event if event["deliveries"][0]["attempts"] else None

        event = await until(recorded, 30, "the attempt to be recorded")
        assert event["id"] == event_id
        assert event["deliveries"][0]["last_error"] == "no answer within 2s"
    finally:
        agent.process.send(signal.SIGCONT)
    await until(lambda: event_id in arrived(target), DRAIN, "the event once the agent thaws")
