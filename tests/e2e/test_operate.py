"""Operating a running server (issue 9): /metrics, /healthz, /readyz, the TLS ask
endpoint, ``relay-server status``, the access log and request ids, and what never
reaches a log line.

Every test runs the real ``relay-server`` and ``relay-agent`` in front of a real local
service; metrics are read the way Prometheus reads them (its text format, parsed with
``prometheus_client``'s own parser).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import uuid
from http.client import HTTPConnection

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .framework import (
    RELAY_SERVER,
    SIZED_BODY,
    Relay,
    RelayServer,
    Reply,
    client_session,
    fetch,
    free_port,
    raw_exchange,
    through,
    until,
)

#: A client the relay's trusted proxy (127.0.0.1 in these tests) forwards for: from
#: the relay's point of view, a stranger on the internet.
STRANGER = [("X-Forwarded-For", "203.0.113.7")]
ADMIN_TOKEN = "admin-" + "x" * 40


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(
    http: aiohttp.ClientSession, server: RelayServer, headers: list[tuple[str, str]] | None = None
) -> Reply:
    return await fetch(http, "GET", server.url("/metrics"), server.apex, headers=headers or [])


async def test_metrics_move_by_the_traffic_sent(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    before = samples((await scrape(http, tunnel.server)).body.decode())
    assert before["relay_agents_connected", ()] == 1
    assert before["relay_requests_total", (("error", ""), ("route", "server"), ("status_class", "2xx"))] >= 1

    bodies = [b"a" * 10, b"b" * 20, b"c" * 30]
    replies = [await through(http, tunnel, "subdomain", "POST", "/bin", body=body) for body in bodies]
    assert [r.body for r in replies] == bodies
    unknown = await fetch(http, "POST", tunnel.server.url("/hook"), f"bob.{tunnel.server.apex}", body=b"zz")
    assert unknown.relay_error == "unknown-tunnel"

    reply = await scrape(http, tunnel.server)
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("text/plain; version=")  # type: ignore[union-attr]

    async def recorded() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        # Outcomes are written just after the answer goes back: poll for them. A scrape
        # reads the store's gauges before the counters, so it can count an outcome
        # committed while the store was being read: poll for both.
        found = samples((await scrape(http, tunnel.server)).body.decode())
        done = found.get(("relay_delivery_attempts_total", (("result", "delivered"),))) == 3
        return found if done and found.get(("relay_events", (("state", "delivered"),))) == 3 else None

    after = await until(recorded, 10, "the three outcomes to be recorded")
    ok = ("relay_requests_total", (("error", ""), ("route", "tunnel"), ("status_class", "2xx")))
    refused = (
        "relay_requests_total",
        (("error", "unknown-tunnel"), ("route", "tunnel"), ("status_class", "4xx")),
    )
    assert after[ok] == 3
    assert after[refused] == 1
    assert after["relay_request_duration_seconds_count", ()] == 4
    assert after["relay_request_body_bytes_total", ()] == 60 + 2
    assert after["relay_response_body_bytes_total", ()] == 60 + len(unknown.body)
    assert after["relay_delivery_attempts_total", (("result", "delivered"),)] == 3
    assert after["relay_events", (("state", "delivered"),)] == 3
    assert after["relay_events", (("state", "pending"),)] == 0
    assert after["relay_commit_batch_size_sum", ()] >= 6  # each event: stored, then its outcome
    assert after["relay_store_bytes", ()] > 0
    assert after["relay_streams_open", ()] == 0
    assert (
        "relay_requests_total",
        (("error", ""), ("route", "tunnel"), ("status_class", "2xx"), ("tunnel", "alice")),
    ) not in after


async def test_per_tunnel_labels_and_the_metrics_listener(relay: Relay, http: aiohttp.ClientSession) -> None:
    port = free_port()
    server = relay.server("--metrics-per-tunnel", "--metrics-listen", f"127.0.0.1:{port}")
    tunnel = relay.tunnel(server)
    await through(http, tunnel, "path", "POST", "/bin", body=b"12345")
    await fetch(http, "GET", server.url("/t/nobody-here/x"), server.apex)  # unclaimed: no series of its own
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Server") == ["relay"]  # not aiohttp's name and versions
        found = samples(await resp.text())
    labels = (("error", ""), ("route", "tunnel"), ("status_class", "2xx"), ("tunnel", "alice"))
    assert found["relay_requests_total", labels] == 1
    assert found["relay_request_body_bytes_total", (("tunnel", "alice"),)] == 5
    assert not any(("tunnel", "nobody-here") in key[1] for key in found)
    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        assert resp.status == 404  # the metrics listener serves /metrics alone
        assert resp.headers.getall("Server") == ["relay"]


async def test_strangers_get_no_metrics_status_or_certificates(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # The relay behind a proxy on 127.0.0.1: a request it forwards is a stranger's.
    server = relay.server("--trusted-proxy", "127.0.0.1/32", "--admin-token", ADMIN_TOKEN)
    relay.tunnel(server)

    assert (await scrape(http, server, STRANGER)).relay_error == "not-found"
    status = await fetch(http, "GET", server.url("/_relay/status"), server.apex, headers=STRANGER)
    assert (status.status, status.relay_error) == (401, "unauthorized")
    wrong = [*STRANGER, ("Authorization", "Bearer " + "y" * 46)]
    assert (await fetch(http, "GET", server.url("/_relay/status"), server.apex, headers=wrong)).status == 401
    admin = [*STRANGER, ("Authorization", f"Bearer {ADMIN_TOKEN}")]
    allowed = await fetch(http, "GET", server.url("/_relay/status"), server.apex, headers=admin)
    assert allowed.status == 200
    assert [a["user"] for a in allowed.json()["agents"]] == ["alice"]
    ask = server.url("/_relay/tls-ask").with_query(domain="alice.localhost")
    refused = await fetch(http, "GET", ask, server.apex, headers=STRANGER)
    assert (refused.status, refused.relay_error) == (403, "forbidden")
    # The proxy itself (no X-Forwarded-For) is answered.
    assert (await fetch(http, "GET", ask, server.apex)).status == 200
    assert (await scrape(http, server)).status == 200


async def test_tls_ask_answers_only_the_apex_and_claimed_names(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    tunnel = relay.tunnel()
    server = tunnel.server

    async def ask(domain: str | None) -> Reply:
        url = server.url("/_relay/tls-ask")
        return await fetch(http, "GET", url if domain is None else url.with_query(domain=domain), server.apex)

    for domain in ("localhost", "alice.localhost", "ALICE.localhost."):
        assert (await ask(domain)).status == 200, domain
    for domain in (
        "bob.localhost",
        "x.alice.localhost",
        "example.com",
        "alice.localhost.example.com",
        "-.localhost",
    ):
        reply = await ask(domain)
        assert (reply.status, reply.relay_error) == (404, "unknown-tunnel"), domain
    for domain in (None, "", "bad host", "ünï.localhost"):
        reply = await ask(domain)
        assert (reply.status, reply.relay_error) == (400, "bad-request"), domain


async def test_readyz_says_not_ready_while_draining(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    server = tunnel.server
    # One kept-alive connection: once SIGTERM closed the listener, it still asks.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as probe:

        async def readyz() -> tuple[int, str | None]:
            async with probe.get(server.url("/readyz"), headers={"Host": server.apex}) as resp:
                await resp.read()
                return resp.status, resp.headers.get("X-Relay-Error")

        healthz = await fetch(http, "GET", server.url("/healthz"), server.apex)
        assert (healthz.status, healthz.body) == (200, b"ok\n")
        assert await readyz() == (200, None)
        held = asyncio.create_task(through(http, tunnel, "subdomain", "GET", "/hold?key=ready"))
        await until(lambda: tunnel.target.seen("/hold"), 10, "the held request to reach the target")
        server.process.send(signal.SIGTERM)  # type: ignore[union-attr]

        async def not_ready() -> bool:
            return await readyz() == (503, "not-ready")

        await until(not_ready, 10, "/readyz to say not-ready")
        tunnel.target.release("ready")
        assert (await held).status == 200  # the drain still let the request in flight finish
    assert await server.process.exited() == 0  # type: ignore[union-attr]


def status_cli(server: RelayServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RELAY_SERVER), "status", "--server", f"http://127.0.0.1:{server.port}", *args],
        env=server.relay.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_shows_agents_and_what_waits(relay: Relay, http: aiohttp.ClientSession) -> None:
    server = relay.server()
    tunnel = relay.tunnel(server, agent_extra=("--label", "laptop"))
    bob = server.token("bob")
    relay.agent(server, bob, tunnel.target.forward).process.kill()  # bob claims his name, then leaves
    for _ in range(2):  # queued for bob: no agent
        reply = await fetch(http, "POST", server.url("/t/bob/hook"), server.apex, body=b"{}")
        assert reply.status == 202

    result = status_cli(server, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    (agent,) = doc["agents"]
    assert (agent["user"], agent["names"], agent["label"], agent["remote"]) == (
        "alice",
        ["alice"],
        "laptop",
        "127.0.0.1",
    )
    tunnels = {t["name"]: t for t in doc["tunnels"]}
    assert tunnels["alice"]["agents"] == 1 and tunnels["alice"]["waiting"] == 0
    assert tunnels["bob"]["agents"] == 0 and tunnels["bob"]["waiting"] == 2
    assert tunnels["bob"]["oldest_waiting_at"] <= doc["now"]

    text = status_cli(server)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^  alice\s+alice\s+laptop\s+127\.0\.0\.1\s+\d+s ago$", text.stdout, re.M), text.stdout
    assert re.search(r"^  bob\s+bob\s+0\s+2\s+\d+s ago$", text.stdout, re.M), text.stdout

    down = status_cli(relay.server(start=False), "--server", "http://127.0.0.1:9")
    assert down.returncode == 1
    assert "cannot reach http://127.0.0.1:9/_relay/status" in down.stderr


async def test_access_log_request_ids_and_no_secret_in_any_log(relay: Relay) -> None:
    server = relay.server("--access-log", "--log-format", "json")
    tunnel = relay.tunnel(server)
    secrets = {
        "authorization": "Bearer AUTH-SECRET-1f3a",
        "cookie": "session=COOKIE-SECRET-99",
        "x-hub-signature-256": "sha256=GITHUB-SIG-5e1b",
        "stripe-signature": "t=1,v1=STRIPE-SIG-77c0",
        "x-slack-signature": "v0=SLACK-SIG-0d2e",
    }
    async with client_session() as http:
        kept = await through(
            http,
            tunnel,
            "subdomain",
            "POST",
            "/hook?token=QUERY-SECRET-42",
            body=b"{}",
            headers=[*secrets.items(), ("X-Request-Id", "client-id.123")],
        )
        insane = await through(
            http, tunnel, "path", "POST", "/hook", body=b"{}", headers=[("X-Request-Id", "has spaces in it")]
        )
        twice = await through(
            http,
            tunnel,
            "path",
            "POST",
            "/hook",
            body=b"{}",
            headers=[("X-Request-Id", "a"), ("X-Request-Id", "b")],
        )
        fresh = await through(http, tunnel, "path", "GET", "/hook")
    assert [r.status for r in (kept, insane, twice, fresh)] == [200, 200, 200, 200]
    seen_ids = [r.getall("X-Request-Id") for r in tunnel.target.seen("/hook")]
    assert all(len(ids) == 1 for ids in seen_ids), seen_ids
    ids = [ids[0] for ids in seen_ids]
    assert ids[0] == "client-id.123"
    for made in ids[1:]:
        assert str(uuid.UUID(made)) == made  # a new one, not the client's
    assert len(set(ids)) == 4

    assert server.stop() == 0
    tunnel.agent.process.kill()
    lines = server.process.stderr.splitlines()  # type: ignore[union-attr]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r["logger"] == "relay.access" and r["tunnel"] == "alice"]
    assert [a["request_id"] for a in access] == ids
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/hook", 200),
        ("POST", "/t/alice/hook", 200),
        ("POST", "/t/alice/hook", 200),
        ("GET", "/t/alice/hook", 200),
    ]
    assert access[0]["client"] == "127.0.0.1" and access[0]["bytes_in"] == 2 and access[0]["bytes_out"] > 0

    logs = [server.process.stdout, server.process.stderr, tunnel.agent.process.stderr]  # type: ignore[union-attr]
    never = [tunnel.token, "AUTH-SECRET", "COOKIE-SECRET", "GITHUB-SIG", "STRIPE-SIG", "SLACK-SIG"]
    for text in logs:
        for secret in never:
            assert secret not in text, secret
    for text in (server.process.stdout, server.process.stderr):  # type: ignore[union-attr]
        assert "QUERY-SECRET" not in text


# -- found by a newcomer's and an attacker's review -------------------------------------------

RELAYED = [
    [("X-Forwarded-For", "127.0.0.1")],  # a client behind the proxy claiming to be the proxy's host
    [("X-Forwarded-For", "10.254.77.1")],  # a gateway address inside a trusted range
    [("X-Forwarded-For", "garbage")],
    [("X-Forwarded-For", "unknown")],
    [("X-Forwarded-For", "203.0.113.9:5555")],
    [("X-Forwarded-For", "")],
    [("X-Real-IP", "127.0.0.1")],
    [("Forwarded", "for=127.0.0.1")],
]


async def test_a_request_relayed_for_anyone_is_never_this_hosts(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server(
        "--trusted-proxy", "127.0.0.0/8", "--trusted-proxy", "10.254.77.0/24", "--admin-token", ADMIN_TOKEN
    )
    relay.tunnel(server)
    ask = server.url("/_relay/tls-ask").with_query(domain="alice.localhost")
    for headers in RELAYED:
        assert (await scrape(http, server, headers)).relay_error == "not-found", headers
        status = await fetch(http, "GET", server.url("/_relay/status"), server.apex, headers=headers)
        assert status.status == 401, headers
        assert (await fetch(http, "GET", ask, server.apex, headers=headers)).status == 403, headers
    # Asked directly, for no one else: answered.
    assert (await scrape(http, server)).status == 200
    assert (await fetch(http, "GET", ask, server.apex)).status == 200
    assert (await fetch(http, "GET", server.url("/_relay/status"), server.apex)).status == 200


async def test_tls_ask_takes_a_bare_name_by_get_and_is_logged_with_it(relay: Relay) -> None:
    server = relay.server("--access-log")
    relay.tunnel(server)
    url = server.url("/_relay/tls-ask")
    async with client_session() as http:
        answers = [
            (method, domain, (await fetch(http, method, url.with_query(domain=domain), server.apex)).status)
            for method, domain in [
                ("GET", "alice.localhost"),
                ("POST", "alice.localhost"),
                ("GET", "alice.localhost:443"),
                ("GET", "localhost:0"),
                ("GET", "alice.localhost "),
                ("GET", "bob.localhost"),
            ]
        ]
    assert [status for *_, status in answers] == [200, 405, 400, 400, 400, 404], answers
    await server.process.line(  # type: ignore[union-attr]
        r"path=/_relay/tls-ask asked=bob\.localhost status=404", stream="stderr"
    )


async def test_malformed_requests_log_no_byte_of_them_and_one_line(relay: Relay) -> None:
    server = relay.server("--log-level", "debug")
    relay.tunnel(server)
    malformed = [
        b"POST /hook?token=QUERY-SECRET-1\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer AUTH-SECRET-2\x01x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: session=COOKIE-SECRET-3\rx\r\n\r\n",
        *[b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n"] * 50,
    ]
    for request in malformed:
        reply, _ = await raw_exchange(server.port, request)
        assert reply.status == 400
    async with client_session() as http:  # the server is there for everyone else
        assert (await fetch(http, "GET", server.url("/t/alice/ok"), server.apex)).status == 200
    assert server.stop() == 0
    stderr = server.process.stderr  # type: ignore[union-attr]
    for secret in ("QUERY-SECRET", "AUTH-SECRET", "COOKIE-SECRET"):
        assert secret not in stderr
    assert "Traceback" not in stderr and "Error handling request" not in stderr
    lines = [line for line in stderr.splitlines() if "malformed requests" in line]
    assert 1 <= len(lines) <= 2, lines  # one per 30 s, with a count: not 53


async def test_a_complete_answer_counts_as_sent_when_the_client_leaves_at_once(relay: Relay) -> None:
    server = relay.server("--access-log")
    tunnel = relay.tunnel(server, agent_extra=("--mode", "live"))
    count = 60

    def ask_and_leave() -> list[bytes]:
        bodies = []
        for i in range(count):
            connection = HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("GET", f"/t/alice/sized?i={i}", headers={"Host": server.apex})
            reply = connection.getresponse()
            bodies.append(reply.read())  # every byte of it, then the client is gone at once
            connection.close()
        return bodies

    bodies = await asyncio.to_thread(ask_and_leave)
    assert bodies == [SIZED_BODY] * count
    lines = await server.process.line(  # type: ignore[union-attr]
        r"method=GET tunnel=alice path=/t/alice/sized ", stream="stderr", count=count
    )
    statuses = [re.search(r" status=(\d+) ", m.string)[1] for m in lines]  # type: ignore[index]
    sent = [re.search(r" bytes_out=(\d+) ", m.string)[1] for m in lines]  # type: ignore[index]
    assert statuses == ["200"] * count  # never 499: the client got it all
    assert sent == [str(len(SIZED_BODY))] * count
    async with client_session() as http:
        found = samples((await scrape(http, server)).body.decode())
    ok = found[("relay_requests_total", (("error", ""), ("route", "tunnel"), ("status_class", "2xx")))]
    assert ok == count
    assert tunnel.target.seen("/sized")


async def test_draining_is_seen_from_new_connections(relay: Relay, http: aiohttp.ClientSession) -> None:
    tunnel = relay.tunnel()
    server = tunnel.server
    held = asyncio.create_task(through(http, tunnel, "subdomain", "GET", "/hold?key=drain"))
    await until(lambda: tunnel.target.seen("/hold"), 10, "the held request to reach the target")
    server.process.send(signal.SIGTERM)  # type: ignore[union-attr]

    async def fresh(path: str, **headers: str) -> Reply:
        async with client_session() as new:  # a new connection each time
            return await fetch(new, "GET", server.url(path), server.apex, headers=list(headers.items()))

    async def not_ready() -> bool:
        return (await fresh("/readyz")).relay_error == "not-ready"

    await until(not_ready, 10, "/readyz to say not-ready on a new connection")
    status = status_cli(server, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["draining"] is True
    assert (await fresh("/t/alice/new")).status == 503  # new work is refused, not dropped
    agent = await fresh("/_relay/agent", Upgrade="websocket", Connection="Upgrade")
    assert (agent.status, agent.relay_error) == (503, "not-ready")
    tunnel.target.release("drain")  # the request in flight finishes, then the server exits
    assert (await held).status == 200
    assert await server.process.exited() == 0  # type: ignore[union-attr]


def test_a_metrics_listener_that_cannot_bind_is_named(relay: Relay) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                str(RELAY_SERVER),
                "serve",
                "--port",
                str(free_port()),
                "--data-dir",
                str(relay.new_dir("data")),
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            env=relay.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        busy.close()
    assert result.returncode == 1
    assert f"cannot listen on --metrics-listen 127.0.0.1:{port}: " in result.stderr, result.stderr
