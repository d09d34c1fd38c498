"""Durable delivery (issue 4), as a webhook sender, the local app and the CLI user see it.

Every test runs its own ``relay-server`` (the options differ: a short retry schedule, tiny
quotas, a tiny store) with a real SQLite store. Tunnels are queue mode by default: a POST
is an event, stored before it is answered, and delivered with ``X-Relay-Event-Id``,
``X-Relay-Attempt`` and ``X-Relay-Received-At``. Waits are polls with timeouts; the only
sleeps are the ones that show something does *not* happen (no further attempt).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay_server.concurrency import AUTO_MAX, AUTO_MIN

from .framework import (
    Agent,
    Relay,
    RelayServer,
    Reply,
    Seen,
    TargetService,
    Tunnel,
    api,
    fetch,
    free_port,
    through,
    until,
)

#: Seconds a queued event gets to reach the app once it is due (an agent is there).
DELIVERED = 20.0
#: A retry schedule short enough to watch: attempts 2, 3, ... one second apart (±10 %).
SHORT = "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s"


# -- a local app whose answers a test scripts ------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One scripted answer of the app: after ``delay`` seconds, ``status`` with ``headers``."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    #: Served one at a time, as a single-worker app does: each waits for the one before.
    one_at_a_time: bool = False


@dataclass
class ScriptedTarget(TargetService):
    """The echo target, plus: per-path scripted answers, arrival times, and how many
    requests it was serving at once (the most ever, for max-concurrency)."""

    #: path -> answers; each request takes the first, the last one repeats.
    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    arrivals: list[tuple[float, Seen]] = field(default_factory=list)
    active: int = 0
    most_active: int = 0
    worker: asyncio.Lock = field(default_factory=asyncio.Lock)

    def script(self, path: str, *answers: int | Answer) -> None:
        self.scripts[path] = [a if isinstance(a, Answer) else Answer(a) for a in answers]

    def attempts(self, path: str) -> list[tuple[float, Seen]]:
        """Arrivals at ``path``, one per (event id, attempt number): the first. A repeat of
        the same attempt is a duplicate, which one test counts on its own
        (test_no_duplicate_deliveries_while_the_agent_stays_connected)."""
        firsts: dict[tuple[str | None, str | None], tuple[float, Seen]] = {}
        for t, s in self.arrivals:
            if s.raw_path == path:
                firsts.setdefault((s.header("X-Relay-Event-Id"), s.header("X-Relay-Attempt")), (t, s))
        return list(firsts.values())

    async def _respond(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        self.arrivals.append((time.monotonic(), seen))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            answers = self.scripts.get(request.path)
            if answers:
                answer = answers[0] if len(answers) == 1 else answers.pop(0)
                if answer.one_at_a_time:
                    async with self.worker:
                        await asyncio.sleep(answer.delay)
                else:
                    await asyncio.sleep(answer.delay)
                return web.Response(
                    status=answer.status, text=f"scripted {answer.status}", headers=dict(answer.headers)
                )
            return await super()._respond(request, seen)
        finally:
            self.active -= 1


# -- helpers -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A server, alice's token and her app; the agent comes and goes."""

    relay: Relay
    server: RelayServer
    token: str
    target: ScriptedTarget
    name: str = "alice"

    def host(self) -> str:
        return f"{self.name}.{self.server.apex}"

    async def post(
        self,
        http: aiohttp.ClientSession,
        path: str,
        body: bytes | AsyncIterator[bytes] | None = b"{}",
        *,
        method: str = "POST",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        return await fetch(http, method, self.server.url(path), self.host(), headers=headers, body=body)

    def agent(self, *extra: str, ready: bool = True) -> Agent:
        return self.relay.agent(self.server, self.token, self.target.forward, ready=ready, extra=extra)

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.relay.agent_cli(self.server, token or self.token, *args)

    def cli_ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, f"relay-agent {' '.join(args)}: {result.stderr}"
        return str(result.stdout)

    def events(self, *args: str) -> list[dict[str, Any]]:
        """``relay-agent events list --json`` (newest first)."""
        return list(json.loads(self.cli_ok("events", "list", "--limit", "1000", "--json", *args)))

    async def event(self, http: aiohttp.ClientSession, event_id: str) -> dict[str, Any]:
        reply = await api(http, self.server, self.token, "GET", f"events/{event_id}")
        assert reply.status == 200, reply.body
        return dict(reply.json())

    async def event_in(self, http: aiohttp.ClientSession, event_id: str, status: str) -> dict[str, Any]:
        """Poll the API until ``event_id`` is in ``status``; returns the event."""
        return await self.event_when(http, event_id, lambda e: e["status"] == status, status)

    async def event_when(
        self, http: aiohttp.ClientSession, event_id: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Poll the API until ``check(event)`` holds (the relay records attempts in the
        background, a moment after passing the app's answer on); returns the event."""

        async def found() -> dict[str, Any] | None:
            event = await self.event(http, event_id)
            return event if check(event) else None

        return dict(await until(found, DELIVERED, f"event {event_id}: {what}"))


def scripted_target(relay: Relay) -> ScriptedTarget:
    target = relay.target("alice", ScriptedTarget)
    assert isinstance(target, ScriptedTarget)
    return target


def make_stack(relay: Relay, *server_options: str, settings: tuple[str, ...] = ()) -> Stack:
    """A server with ``server_options``; alice's tunnel claimed (and set) with the CLI,
    so that it takes webhooks before any agent ever connected."""
    server = relay.server(*server_options)
    stack = Stack(relay, server, server.token("alice"), scripted_target(relay))
    stack.cli_ok("tunnel", "set", "alice", "--mode", "queue", *settings)
    return stack


def queued_id(reply: Reply) -> str:
    """The event id of a 202 "queued" answer, checking that body and header agree."""
    assert reply.status == 202, (reply.status, reply.body)
    data = reply.json()
    assert data["queued"] is True
    assert reply.header("X-Relay-Event") == data["event"]
    assert data["event"].startswith("evt_")
    return str(data["event"])


def delivered_ids(target: TargetService) -> list[str]:
    return [s.header("X-Relay-Event-Id") or "" for s in target.requests if s.header("X-Relay-Event-Id")]


def parse_received_at(value: str) -> float:
    assert value.endswith("Z"), value  # UTC, ISO 8601
    return datetime.fromisoformat(value[:-1] + "+00:00").astimezone(UTC).timestamp()


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- transparent when up, durable when down -----------------------------------------------------


async def test_transparent_when_the_app_is_up(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay)
    tunnel = Tunnel(stack.server, stack.target, stack.agent(), "alice", stack.token)
    reply = await through(
        http,
        tunnel,
        "subdomain",
        "POST",
        "/hooks/github?x=1",
        headers=[("X-Hub-Signature", "sha1=abc"), ("Content-Type", "application/json")],
        body=b'{"action": "opened"}',
    )
    # The app's own answer: status, headers and body, no relay envelope.
    assert reply.status == 200
    assert reply.header("X-Target") == "alice"
    assert reply.header("X-Relay-Event") is None
    echo = reply.json()
    headers = dict(echo["headers"])
    event_id = headers["X-Relay-Event-Id"]
    assert headers["X-Relay-Attempt"] == "1"
    assert headers["X-Hub-Signature"] == "sha1=abc"
    assert echo["path"] == "/hooks/github?x=1"

    # Statuses the tunnel does not retry are the app's own answer too.
    for status in (201, 404, 500):
        reply = await through(http, tunnel, "path", "POST", f"/status/{status}", body=b"x")
        assert (reply.status, reply.body) == (status, f"target says {status}".encode())
        assert reply.relay_error is None and reply.header("X-Relay-Event") is None

    # (the relay may record an answered attempt just after passing the answer on)
    await until(
        lambda: [e["status"] for e in stack.events()] == ["delivered"] * 4, DELIVERED, "4 delivered events"
    )
    listed = {e["id"]: e for e in stack.events()}
    [delivery] = listed[event_id]["deliveries"]
    assert (delivery["attempts"], delivery["last_status"]) == (1, 200)
    assert sorted(e["deliveries"][0]["last_status"] for e in listed.values()) == [200, 201, 404, 500]
    assert all(e["status"] == "delivered" for e in listed.values())


async def test_offline_webhooks_are_queued_then_delivered_in_arrival_order(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # One delivery at a time, so the app's arrival order is the relay's sending order.
    stack = make_stack(relay, settings=("--max-concurrency", "1"))
    sent: list[tuple[str, str, bytes, tuple[float, float]]] = []  # id, method, body, sent..answered
    for i in range(12):
        body = os.urandom(700) + bytes(range(256)) + f"#{i}".encode()
        method = ("POST", "PUT", "PATCH", "DELETE")[i % 4]
        headers: tuple[tuple[str, str], ...] = (
            ("Content-Type", "application/octet-stream"),
            ("X-Seq", str(i)),
        )
        if i == 3:  # a sender cannot forge the relay's own headers
            headers += (("X-Relay-Event-Id", "evt_forged"), ("X-Relay-Attempt", "99"))
        before = time.time()
        reply = await stack.post(http, f"/hook/{i}?q=a%20b", body, method=method, headers=headers)
        sent.append((queued_id(reply), method, body, (before, time.time())))
    ids = [s[0] for s in sent]
    assert len(set(ids)) == 12
    assert {e["id"] for e in stack.events("--status", "pending")} == set(ids)
    assert stack.target.requests == []

    stack.agent()
    await until(lambda: len(set(delivered_ids(stack.target))) >= 12, DELIVERED, "12 deliveries")
    # Arrival order (a repeat may only be the same event: see the duplicates test).
    assert list(dict.fromkeys(delivered_ids(stack.target))) == ids
    firsts = {s.header("X-Relay-Event-Id"): s for s in reversed(stack.target.requests)}
    received = []
    for i, (event_id, method, body, (before, answered)) in enumerate(sent):
        seen = firsts[event_id]
        assert seen.method == method
        assert seen.raw_path == f"/hook/{i}?q=a%20b"
        assert seen.body == body  # byte for byte
        assert seen.getall("X-Seq") == [str(i)]
        assert seen.getall("Content-Type") == ["application/octet-stream"]
        assert seen.getall("X-Relay-Event-Id") == [event_id]
        assert seen.getall("X-Relay-Attempt") == ["1"]
        [stamp] = seen.getall("X-Relay-Received-At")
        received.append(parse_received_at(stamp))
        # Stamped between sending and the 202 (to the millisecond): an order, not a speed.
        assert before - 0.001 <= received[-1] <= answered + 0.001
    assert received == sorted(received)
    await until(lambda: all(e["status"] == "delivered" for e in stack.events()), DELIVERED, "all delivered")


async def test_app_answering_503_is_retried_until_it_recovers(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    stack.agent()
    stack.target.script("/flaky", 503)
    body = b'{"payment": "succeeded"}'
    event_id = queued_id(await stack.post(http, "/flaky", body))  # the app's 503 is not shown

    await until(lambda: len(stack.target.attempts("/flaky")) >= 3, DELIVERED, "three attempts")
    event = await stack.event(http, event_id)
    assert event["status"] == "retrying"
    assert event["deliveries"][0]["last_status"] == 503
    assert event["deliveries"][0]["next_attempt_at"] is not None

    stack.target.script("/flaky", 200)  # the app is back
    event = await stack.event_in(http, event_id, "delivered")
    tries = stack.target.attempts("/flaky")
    assert event["deliveries"][0]["attempts"] == len(tries)
    assert event["deliveries"][0]["last_status"] == 200
    assert [s.header("X-Relay-Attempt") for _, s in tries] == [str(n) for n in range(1, len(tries) + 1)]
    assert {s.header("X-Relay-Event-Id") for _, s in tries} == {event_id}
    assert all(s.body == body for _, s in tries)
    # Retries follow the short schedule (1 s ±10 %), not the default 5 s, 30 s, ...
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(tries)]
    assert all(0.8 <= gap <= 4.0 for gap in gaps), gaps


@pytest.mark.slow(16)
async def test_410_gone_makes_the_event_dead_at_once(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    stack.agent()
    # Straight away: the sender gets the app's 410 and the relay never tries again.
    reply = await stack.post(http, "/status/410", b"x")
    assert (reply.status, reply.body) == (410, b"target says 410")
    # After a retried 503: the 410 on attempt 2 ends it.
    stack.target.script("/gone", 503, 410)
    event_id = queued_id(await stack.post(http, "/gone", b"y"))
    event = await stack.event_in(http, event_id, "dead")
    assert (event["deliveries"][0]["attempts"], event["deliveries"][0]["last_status"]) == (2, 410)

    await asyncio.sleep(3)  # three schedule steps: no further attempt may come
    assert len(stack.target.attempts("/gone")) == 2
    assert len(stack.target.seen("/status/410")) == 1
    assert {e["status"] for e in stack.events()} == {"dead"}
    # Why it is dead, in the CLI's own words (list and show).
    assert event["deliveries"][0]["dead_reason"] == "the destination answered 410 Gone"
    assert "dead: the destination answered 410 Gone" in stack.cli_ok("events", "show", event_id)
    assert "dead: the destination answered 410 Gone" in stack.cli_ok("events", "list", "--status", "dead")


async def test_retry_after_is_honoured(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    stack.agent()
    stack.target.script("/later", Answer(503, (("Retry-After", "2"),)), 200)
    event_id = queued_id(await stack.post(http, "/later", b"z"))
    await stack.event_in(http, event_id, "delivered")
    first, second = stack.target.attempts("/later")
    # The schedule says 1 s (±10 %); the app asked for 2 s.
    assert 1.8 <= second[0] - first[0] <= 8, second[0] - first[0]
    assert second[1].header("X-Relay-Attempt") == "2"


@pytest.mark.slow(14)
async def test_exhausted_event_is_dead_and_replay_delivers_it(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--retry-schedule", "1s,1s")
    stack.agent()
    stack.target.script("/down", 503)
    body = b"\x00\x01 a body that must survive replay \xff"
    event_id = queued_id(await stack.post(http, "/down", body))
    event = await stack.event_in(http, event_id, "dead")
    # Three attempts: the first, then one per schedule step.
    assert event["deliveries"][0]["attempts"] == 3
    assert [s.header("X-Relay-Attempt") for _, s in stack.target.attempts("/down")] == ["1", "2", "3"]
    assert [e["id"] for e in stack.events("--status", "dead")] == [event_id]
    shown = stack.cli_ok("events", "show", event_id)
    assert "dead after 3 attempt(s)" in shown and "503" in shown

    stack.target.script("/down", 201)  # the app is fixed
    replayed = stack.cli_ok("events", "replay", event_id)
    assert event_id in replayed and "agent:*" in replayed
    event = await stack.event_in(http, event_id, "delivered")
    tries = stack.target.attempts("/down")
    assert len(tries) == 4
    last = tries[-1][1]
    assert last.getall("X-Relay-Event-Id") == [event_id]  # same id
    assert last.getall("X-Relay-Attempt") == ["4"]  # next attempt number
    assert last.body == body
    assert last.header("X-Relay-Received-At") == tries[0][1].header("X-Relay-Received-At")
    assert (event["deliveries"][0]["attempts"], event["deliveries"][0]["last_status"]) == (4, 201)


async def test_a_replay_while_an_attempt_runs_is_a_conflict(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # The attempt's outcome, recorded when it ends, would overwrite the replay: refused.
    stack = make_stack(relay)
    stack.agent()
    stack.target.script("/busy", Answer(200, delay=60))
    sending = asyncio.create_task(stack.post(http, "/busy", b"r"))
    try:
        [event] = await until(lambda: stack.events(), DELIVERED, "the event stored")
        await until(lambda: stack.target.seen("/busy"), DELIVERED, "the attempt at the app")
        reply = await api(http, stack.server, stack.token, "POST", f"events/{event['id']}/replay")
        assert (reply.status, reply.relay_error) == (409, "conflict")
        assert len(stack.target.seen("/busy")) == 1
    finally:
        sending.cancel()


async def test_app_down_or_too_slow_gives_202_and_it_is_delivered_later(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--timeout", "1", "--retry-schedule", SHORT)
    # The agent is up, the app is not: nothing listens on its port.
    nowhere = relay.agent(stack.server, stack.token, f"127.0.0.1:{free_port()}")
    refused = queued_id(await stack.post(http, "/refused", b"r"))
    event = await stack.event_in(http, refused, "retrying")
    assert event["deliveries"][0]["last_status"] is None
    assert event["deliveries"][0]["last_error"]
    nowhere.process.kill()

    stack.agent()
    # Answering later than the relay's --timeout is "not now" too.
    stack.target.script("/slow-app", Answer(200, delay=3), 200)
    # The relay's 1 s timeout answered 202, not the app's 200 after 3 s.
    late = queued_id(await stack.post(http, "/slow-app", b"s"))
    event = await stack.event_in(http, late, "retrying")
    assert event["deliveries"][0]["last_error"] == "no answer within 1s"

    for event_id, path, body in ((refused, "/refused", b"r"), (late, "/slow-app", b"s")):
        await stack.event_in(http, event_id, "delivered")
        last = stack.target.seen(path)[-1]
        assert (last.header("X-Relay-Event-Id"), last.body) == (event_id, body)
        assert int(last.header("X-Relay-Attempt") or 0) >= 2


async def test_agent_killed_mid_request_gives_202_and_the_next_agent_gets_it(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    agent = stack.agent()
    stack.target.script("/hook", Answer(200, delay=30), 200)  # the first attempt hangs
    sending = asyncio.create_task(stack.post(http, "/hook", b"in flight"))
    await until(lambda: stack.target.seen("/hook"), DELIVERED, "the first attempt at the app")
    agent.process.kill()
    event_id = queued_id(await asyncio.wait_for(sending, DELIVERED))
    assert stack.target.seen("/hook")[0].header("X-Relay-Event-Id") == event_id

    stack.agent()
    await stack.event_in(http, event_id, "delivered")
    again = stack.target.seen("/hook")[-1]
    assert again.header("X-Relay-Event-Id") == event_id
    assert again.body == b"in flight"
    assert int(again.header("X-Relay-Attempt") or 0) >= 2


async def test_which_statuses_are_retried_is_a_setting(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    out = stack.cli_ok("tunnel", "set", "alice", "--retry-on", "500,418")
    assert "retry-on=418,500" in out
    stack.agent()
    # 503 is no longer "try again": the sender gets it, the event is done.
    reply = await stack.post(http, "/status/503", b"a")
    assert (reply.status, reply.body) == (503, b"target says 503")
    # 500 now is: queued and retried.
    stack.target.script("/teapot", 500, 418, 200)
    event_id = queued_id(await stack.post(http, "/teapot", b"b"))
    event = await stack.event_in(http, event_id, "delivered")
    assert event["deliveries"][0]["attempts"] == 3
    assert json.loads(stack.cli_ok("tunnel", "show", "alice", "--json"))["settings"]["retry_on"] == [418, 500]


async def test_a_failing_event_does_not_block_the_ones_behind_it(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT, settings=("--max-concurrency", "1"))
    stack.target.script("/broken", 503)
    broken = queued_id(await stack.post(http, "/broken", b"first in line"))
    behind = [queued_id(await stack.post(http, f"/fine/{i}", b"%d" % i)) for i in range(5)]
    stack.agent()
    await until(
        lambda: len({s.header("X-Relay-Event-Id") for s in stack.target.seen("/fine")}) >= 5,
        DELIVERED,
        "the events behind it",
    )
    assert list(dict.fromkeys(s.header("X-Relay-Event-Id") for s in stack.target.seen("/fine"))) == behind
    await until(lambda: len(stack.target.attempts("/broken")) >= 3, DELIVERED, "more attempts")
    assert (await stack.event(http, broken))["status"] == "retrying"


async def test_a_sender_that_gives_up_does_not_strand_its_event(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # --timeout 1: an inline attempt's lease is timeout + 30 s; the app answers within it.
    stack = make_stack(relay, "--timeout", "1")
    stack.agent()
    stack.target.script("/hook", Answer(200, delay=0.8))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as impatient:
        with pytest.raises((TimeoutError, aiohttp.ClientError)):
            await stack.post(impatient, "/hook", b"provider timed out")
    await until(lambda: stack.target.seen("/hook"), DELIVERED, "the attempt to reach the app")
    [event] = stack.events()
    # The app answered 200: the relay records it, or at worst delivers it again after the lease.
    await until(
        lambda: stack.events()[0]["status"] == "delivered", 45, f"event {event['id']} to be delivered"
    )
    assert {s.header("X-Relay-Event-Id") for s in stack.target.seen("/hook")} == {event["id"]}


async def test_no_duplicate_deliveries_while_the_agent_stays_connected(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--retry-schedule", SHORT)
    stack.agent()
    rng = random.Random(4)
    for i in range(100):  # each: 503 inline (so 202), then retried by the dispatcher, answered a bit later
        stack.target.script(f"/e/{i}", 503, Answer(200, delay=rng.uniform(0.05, 0.5)))
    replies = await asyncio.gather(*(stack.post(http, f"/e/{i}", b"%d" % i) for i in range(100)))
    ids = {queued_id(reply) for reply in replies}

    def attempts() -> Counter[tuple[str | None, str | None]]:
        return Counter(
            (s.header("X-Relay-Event-Id"), s.header("X-Relay-Attempt")) for s in stack.target.requests
        )

    await until(lambda: len(attempts()) >= 200, 30, "two attempts of each event")
    await until(
        lambda: not stack.events("--status", "retrying") and not stack.events("--status", "pending"),
        DELIVERED,
        "every event to be recorded delivered",
    )
    assert {event_id for event_id, _ in attempts()} == ids
    repeated = {key: n for key, n in attempts().items() if n > 1}
    assert not repeated, f"{sum(repeated.values()) - len(repeated)} duplicate deliveries: {repeated}"


# -- what stays live ---------------------------------------------------------------------------


async def test_get_and_live_mode_stay_live(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay)
    for method in ("GET", "HEAD", "OPTIONS"):
        reply = await stack.post(http, "/page", None, method=method)
        assert (reply.status, reply.relay_error) == (503, "tunnel-offline"), method
    event_id = queued_id(await stack.post(http, "/queued", b"queued"))

    assert "live" in stack.cli_ok("tunnel", "set", "alice", "--mode", "live")
    reply = await stack.post(http, "/live", b"not stored")
    assert (reply.status, reply.relay_error) == (503, "tunnel-offline")
    assert [e["id"] for e in stack.events()] == [event_id]

    stack.agent()  # connect without --mode keeps the stored setting
    reply = await stack.post(http, "/live", b"live")
    assert reply.status == 200
    assert [s.header("X-Relay-Event-Id") for s in stack.target.seen("/live")] == [None]
    stack.cli_ok("tunnel", "set", "alice", "--mode", "queue")
    reply = await stack.post(http, "/page?x=1", None, method="GET")
    assert reply.status == 200 and stack.target.seen("/page")[-1].header("X-Relay-Event-Id") is None
    events = stack.events()
    assert [e["id"] for e in events] == [event_id]  # neither a GET nor a live POST became an event
    await until(lambda: stack.events()[0]["status"] == "delivered", DELIVERED, "the queued POST")


async def test_a_body_over_the_queue_limit_goes_live(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay, "--queue-max-body", "1000")
    reply = await stack.post(http, "/big", b"b" * 1001)
    assert (reply.status, reply.relay_error) == (503, "tunnel-offline")
    event_id = queued_id(await stack.post(http, "/small", b"s" * 1000))

    stack.agent()
    big = os.urandom(5000)
    reply = await stack.post(http, "/bin", big)
    assert (reply.status, reply.body) == (200, big)
    # Without a Content-Length the relay finds out while reading: what it read goes live too.
    chunked = os.urandom(3000)
    reply = await stack.post(http, "/bin", chunks(chunked, 700))
    assert (reply.status, reply.body) == (200, chunked)
    assert [s.header("X-Relay-Event-Id") for s in stack.target.seen("/bin")] == [None, None]
    await until(lambda: stack.target.seen("/small"), DELIVERED, "the small body, queued")
    assert stack.target.seen("/small")[0].header("X-Relay-Event-Id") == event_id
    assert [e["id"] for e in stack.events()] == [event_id]


# -- limits: quotas and a full disk --------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "size", "accepted"),
    [(("--quota-events", "5"), 100, 5), (("--quota-bytes", "10000"), 3000, 3)],
    ids=["events", "bytes"],
)
async def test_full_quota_answers_429_and_drops_nothing(
    relay: Relay, http: aiohttp.ClientSession, option: tuple[str, str], size: int, accepted: int
) -> None:
    stack = make_stack(relay, *option)
    ids: dict[str, bytes] = {}
    refused: list[bytes] = []
    for i in range(accepted + 3):
        body = f"{i:04d}".encode() * (size // 4)
        reply = await stack.post(http, "/hook", body)
        if reply.status == 202:
            ids[queued_id(reply)] = body
        else:
            assert (reply.status, reply.relay_error) == (429, "too-many-requests")
            assert reply.header("Retry-After")
            refused.append(body)
    assert (len(ids), len(refused)) == (accepted, 3)

    stack.agent()
    await until(lambda: set(delivered_ids(stack.target)) >= set(ids), DELIVERED, "the accepted events")
    seen = {s.header("X-Relay-Event-Id"): s.body for s in stack.target.requests}
    assert seen == ids  # every accepted one, none of the refused ones
    # Delivered events no longer count against the quota.
    await until(lambda: all(e["status"] == "delivered" for e in stack.events()), DELIVERED, "all delivered")
    for _ in range(accepted):
        reply = await stack.post(http, "/again", b"x" * size)
        assert reply.status == 200, (reply.status, reply.body)


@pytest.mark.timeout(200)
async def test_a_full_store_answers_503_never_a_false_2xx_and_recovers(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--store-max-bytes", "200000", "--retention", "1s")
    accepted: dict[str, bytes] = {}
    full = 0
    for i in range(100):
        body = os.urandom(20 * 1024)
        reply = await stack.post(http, f"/hook/{i}", body)
        if reply.status == 202:
            assert full == 0, "a 202 after the store said it was full"
            accepted[queued_id(reply)] = body
            continue
        assert (reply.status, reply.relay_error) == (503, "store-unavailable"), (reply.status, reply.body)
        full += 1
        if full == 3:
            break
    assert full == 3, "the store never filled up"
    assert 3 <= len(accepted) <= 10, len(accepted)

    stack.agent()
    await until(
        lambda: set(delivered_ids(stack.target)) >= set(accepted), 60, "every accepted event to arrive"
    )
    for seen in stack.target.requests:
        assert seen.body == accepted[seen.header("X-Relay-Event-Id") or ""]

    # Once delivered events are purged (retention 1 s), new webhooks are taken again.
    async def taken() -> bool:
        reply = await stack.post(http, "/after", os.urandom(20 * 1024))
        if reply.status == 503:
            assert reply.relay_error == "store-unavailable"
            return False
        assert reply.status == 200, (reply.status, reply.body)  # the app's own answer
        return True

    await until(taken, 90, "the store to take webhooks again", interval=1.0)
    assert stack.target.seen("/after")[-1].header("X-Relay-Event-Id")


# -- users, concurrency, fan-out, settings ------------------------------------------------------


@pytest.mark.slow(16)
async def test_another_users_token_cannot_see_or_replay_events(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay)
    event_id = queued_id(await stack.post(http, "/secret", b"alice's payload"))
    bob = stack.server.token("bob")

    # The API: an empty list, and 404 as if the event and tunnel did not exist.
    reply = await api(http, stack.server, bob, "GET", "events?limit=1000")
    assert (reply.status, reply.json()) == (200, {"events": [], "next": None})
    for method, path in (
        ("GET", f"events/{event_id}"),
        ("POST", f"events/{event_id}/replay"),
        ("GET", "tunnels/alice"),
    ):
        reply = await api(http, stack.server, bob, method, path)
        assert (reply.status, reply.relay_error) == (404, "not-found"), (method, path)
        assert b"alice's payload" not in reply.body
    reply = await api(http, stack.server, bob, "PATCH", "tunnels/alice", {"mode": "live"})
    assert reply.status == 404
    reply = await api(http, stack.server, bob, "GET", "tunnels")
    assert [t["name"] for t in reply.json()["tunnels"]] == []

    # The CLI: a non-zero exit and the server's reason.
    for args in (("events", "show", event_id), ("events", "replay", event_id)):
        result = stack.cli(*args, token=bob)
        assert result.returncode != 0, args
        assert f"no event {event_id!r}" in result.stderr and "404" in result.stderr
        assert "alice's payload" not in result.stdout + result.stderr
    result = stack.cli("events", "list", token=bob)
    assert result.returncode == 0 and event_id not in result.stdout
    result = stack.cli("tunnel", "show", "alice", token=bob)
    assert result.returncode != 0 and "no tunnel named 'alice'" in result.stderr

    # Alice sees it, still queued (bob's replay did nothing), with its body.
    shown = json.loads(stack.cli_ok("events", "show", event_id, "--json"))
    assert (shown["status"], shown["body"]) == ("pending", "alice's payload")
    assert (await stack.event(http, event_id))["deliveries"][0]["attempts"] == 0
    assert stack.cli_ok("tunnel", "show", "alice").split()[1] == "queue"


@pytest.mark.slow(12)
async def test_max_concurrency_bounds_deliveries_in_flight(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay, settings=("--max-concurrency", "4"))
    ids = [queued_id(await stack.post(http, "/slow?seconds=0.5", b"%d" % i)) for i in range(40)]
    stack.agent()
    await until(lambda: set(delivered_ids(stack.target)) >= set(ids), 60, "40 slow deliveries")
    assert set(delivered_ids(stack.target)) == set(ids)
    assert stack.target.most_active == 4  # never more; and the slots were used

    # A burst while the app is up shares the same slots: some answered inline, the rest queued.
    stack.target.most_active = 0
    replies = await asyncio.gather(
        *(stack.post(http, "/slow?seconds=0.5", b"burst %d" % i) for i in range(24))
    )
    assert {r.status for r in replies} <= {200, 202}
    assert any(r.status == 200 for r in replies)
    await until(lambda: len(set(delivered_ids(stack.target))) >= 64, 60, "the burst to drain")
    assert stack.target.most_active == 4


async def test_fan_out_delivers_every_event_to_every_destination(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    stack = make_stack(relay, "--allow-private-destinations")
    first = relay.target("first")
    second = relay.target("second")
    web_hook = relay.target("url")
    agents = {
        label: relay.agent(stack.server, stack.token, target.forward, extra=("--label", label))
        for label, target in (("a", first), ("b", second))
    }
    url = f"http://127.0.0.1:{web_hook.port}/base"
    out = stack.cli_ok(
        "tunnel", "set", "alice", "--destination", "agent:a", "--destination", "agent:b", "--destination", url
    )
    assert f"destinations=agent:a,agent:b,{url}" in out

    def received(target: TargetService) -> dict[str, bytes]:
        return {s.header("X-Relay-Event-Id") or "": s.body for s in target.requests}

    sent: dict[str, bytes] = {}
    for i in range(5):
        body = os.urandom(300)
        sent[queued_id(await stack.post(http, f"/hook/{i}?n={i}", body))] = body  # 202 even when up
    # One destination goes away: the others are not held up, its backlog waits for it.
    await until(lambda: received(second) == sent, DELIVERED, "agent b's first five")
    for event_id in sent:  # recorded too, before b goes
        await stack.event_when(
            http,
            event_id,
            lambda e: any(
                d == {**d, "destination": "agent:b", "status": "delivered"} for d in e["deliveries"]
            ),
            "delivered to agent:b",
        )
    agents["b"].process.kill()
    assert stack.server.process is not None
    await stack.server.process.line("agent disconnected", stream="stderr")
    late: dict[str, bytes] = {}
    for i in range(5, 8):
        body = os.urandom(300)
        late[queued_id(await stack.post(http, f"/hook/{i}?n={i}", body))] = body
    every = {**sent, **late}

    await until(lambda: received(first) == every, DELIVERED, "agent a: every event")
    await until(lambda: received(web_hook) == every, DELIVERED, "the URL: every event")
    assert received(second) == sent
    assert {s.raw_path for s in web_hook.requests} == {f"/base/hook/{i}?n={i}" for i in range(8)}
    assert {s.raw_path for s in first.requests} == {f"/hook/{i}?n={i}" for i in range(8)}
    expected = {"agent:a": "delivered", "agent:b": "pending", url: "delivered"}
    for event_id in late:
        pending = await stack.event_when(
            http,
            event_id,
            lambda e: {d["destination"]: d["status"] for d in e["deliveries"]} == expected,
            f"states {expected}",
        )
        assert pending["status"] == "pending"  # the least advanced destination's

    relay.agent(stack.server, stack.token, second.forward, extra=("--label", "b"))
    await until(lambda: received(second) == every, DELIVERED, "agent b's backlog")
    for event_id in every:
        await stack.event_in(http, event_id, "delivered")
    assert all(s.header("X-Relay-Attempt") == "1" for t in (first, second, web_hook) for s in t.requests)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/x", "loopback"),
        ("http://localhost:9/x", "loopback"),
        ("http://10.1.2.3/x", "non-public"),
        ("http://169.254.169.254/latest", "non-public"),
    ],
)
async def test_private_url_destination_is_refused_without_the_flag(
    relay: Relay, url: str, reason: str
) -> None:
    stack = make_stack(relay)
    result = stack.cli("tunnel", "set", "alice", "--destination", url)
    assert result.returncode != 0
    assert f"resolves to the {reason} address" in result.stderr
    assert "--allow-private-destinations" in result.stderr
    assert "destinations=agent:*" in stack.cli_ok("tunnel", "show", "alice")


async def test_connect_mode_live_is_stored_and_outlives_the_agent(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    stack = Stack(relay, server, server.token("alice"), scripted_target(relay))
    agent = stack.agent("--mode", "live")

    def shown() -> dict[str, Any]:
        return dict(json.loads(stack.cli_ok("tunnel", "show", "alice", "--json")))

    assert (shown()["settings"]["mode"], shown()["agents"]) == ("live", 1)
    reply = await stack.post(http, "/hook", b"live")
    assert reply.status == 200 and stack.target.requests[-1].header("X-Relay-Event-Id") is None

    agent.process.send(signal.SIGTERM)
    assert await agent.process.exited() == 0
    await until(lambda: shown()["agents"] == 0, DELIVERED, "the server to see the agent leave")
    assert shown()["settings"]["mode"] == "live"
    reply = await stack.post(http, "/hook", b"nobody home")
    assert (reply.status, reply.relay_error) == (503, "tunnel-offline")  # live: not queued
    assert stack.events() == []

    stack.agent()  # without --mode: the stored setting holds
    assert shown()["settings"]["mode"] == "live"


#: Webhooks in the burst: 250 times the app's 8 slots, so the backlog must drain at the
#: app's pace for a long while; 10,000 proved no more and took five times as long.
BURST = 2_000


@pytest.mark.slow(12)
async def test_a_burst_drains_at_the_apps_pace(relay: Relay, http: aiohttp.ClientSession) -> None:
    stack = make_stack(relay)  # the default max-concurrency: auto, 8 to 64
    senders = asyncio.Semaphore(64)

    async def send(i: int) -> str:
        async with senders:
            return queued_id(await stack.post(http, "/burst", b"webhook %d" % i))

    ids = await asyncio.gather(*(send(i) for i in range(BURST)))  # the laptop is closed
    assert len(set(ids)) == BURST
    stack.agent()
    await until(lambda: len(set(delivered_ids(stack.target))) >= BURST, 300, "the burst to drain")
    assert set(delivered_ids(stack.target)) == set(ids)
    assert stack.target.most_active <= AUTO_MAX  # at the app's pace, never all at once


@pytest.mark.slow(6)
async def test_an_app_that_serves_one_request_at_a_time_gets_eight_at_most(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # The default (auto) adds slots only while the app answers as fast with more in
    # flight: a single worker answers the n-th of a burst after n service times, so its
    # tunnel keeps the floor of 8 however fast or slow this machine is (it only makes
    # the answers slower still).
    stack = make_stack(relay)
    assert "max-concurrency=auto" in stack.cli_ok("tunnel", "show", "alice")
    stack.target.script("/serial", Answer(delay=0.05, one_at_a_time=True))
    ids = [queued_id(await stack.post(http, "/serial", b"%d" % i)) for i in range(60)]  # no agent yet
    stack.agent()
    await until(lambda: set(delivered_ids(stack.target)) >= set(ids), 60, "60 deliveries to one worker")
    assert stack.target.most_active == AUTO_MIN  # the slots were used, and never more
