"""Tenants stay apart over time (issue 8 §6): a released name and a revoked or expired token.

``relay-server names release`` and ``token revoke`` run in their own process, on the
running server's data dir, as an admin runs them: the server notices by itself (its watch
loop). What is checked is what each tenant sees: which agent and which destination a
webhook reaches, what the events API says, what a refused agent prints and its exit code.
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import aiohttp

from .framework import (
    FORWARDING,
    RELAY_SERVER,
    Relay,
    RelayServer,
    Reply,
    Tunnel,
    api,
    fetch,
    free_port,
    through,
    until,
)

REFUSED = "relay-agent: the server refused this agent: "
#: Seconds a queued event gets to reach its destination.
DELIVERED = 20.0


def release(server: RelayServer, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``relay-server names release NAME`` as a script runs it: no terminal to answer on."""
    return subprocess.run(
        [str(RELAY_SERVER), "names", "release", name, *options, "--data-dir", str(server.data_dir)],
        env=server.relay.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def token_id(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


async def post(http: aiohttp.ClientSession, server: RelayServer, name: str, path: str, body: bytes) -> Reply:
    return await fetch(http, "POST", server.url(path), f"{name}.{server.apex}", body=body)


async def event(
    http: aiohttp.ClientSession, server: RelayServer, token: str, event_id: str
) -> dict[str, Any]:
    reply = await api(http, server, token, "GET", f"events/{event_id}")
    assert reply.status == 200, reply.body
    return dict(reply.json())


def delivery(found: dict[str, Any], destination: str) -> dict[str, Any]:
    [match] = [d for d in found["deliveries"] if d["destination"] == destination]
    return dict(match)


def names_listed(server: RelayServer) -> list[str]:
    result = server.cli("names", "list")
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


# -- names release ---------------------------------------------------------------------------------


async def test_a_released_name_keeps_nothing_of_its_old_owner(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server("--allow-private-destinations")
    alice_token = server.token("alice", "shared")
    # Alice's webhooks fan out to her agent (whose app is down: they wait) and to her URL.
    alice_hooks = relay.target("alice's URL destination")
    alice_url = f"http://127.0.0.1:{alice_hooks.port}/in"
    alice_agent = relay.agent(server, alice_token, f"127.0.0.1:{free_port()}", "shared")
    reply = await api(
        http, server, alice_token, "PATCH", "tunnels/shared", {"destinations": ["agent:*", alice_url]}
    )
    assert reply.status == 200, reply.body
    reply = await post(http, server, "shared", "/hook", b"alice's webhook")
    assert reply.status == 202, reply.body
    alice_event = reply.json()["event"]

    async def waiting_at_her_agent_delivered_to_her_url() -> bool:
        found = await event(http, server, alice_token, alice_event)
        return (
            delivery(found, "agent:*")["status"] == "retrying"
            and delivery(found, alice_url)["status"] == "delivered"
        )

    await until(waiting_at_her_agent_delivered_to_her_url, DELIVERED, "alice's event at her agent and URL")
    seen_by_alice_url = len(alice_hooks.requests)

    result = release(server, "shared", "--yes")
    assert result.returncode == 0, result.stderr
    assert "released shared (held by alice): 1 event dead, settings removed" in result.stderr

    # Her agent is closed with the reason, and does not come back.
    assert await alice_agent.process.exited() == 1
    assert REFUSED + "name 'shared' was released by the server admin" in alice_agent.process.stderr
    assert "Traceback" not in alice_agent.process.stderr

    # Her event stays readable, dead "name released" where it was waiting ...
    found = await event(http, server, alice_token, alice_event)
    assert (delivery(found, "agent:*")["status"], delivery(found, "agent:*")["dead_reason"]) == (
        "dead",
        "name released",
    )
    assert delivery(found, alice_url)["status"] == "delivered"
    # ... and cannot be replayed while the name is not hers.
    reply = await api(http, server, alice_token, "POST", f"events/{alice_event}/replay")
    assert (reply.status, reply.relay_error) == (409, "conflict"), reply.body
    assert "no longer yours" in reply.json()["message"]

    # Bob claims the name: none of alice's settings, and his webhooks reach only his agent.
    bob_token = server.token("bob", "shared")
    bob_target = relay.target("bob")
    bob = Tunnel(
        server, bob_target, relay.agent(server, bob_token, bob_target.forward, "shared"), "shared", bob_token
    )
    reply = await api(http, server, bob_token, "GET", "tunnels/shared")
    assert reply.status == 200, reply.body
    assert reply.json()["settings"]["destinations"] == ["agent:*"]
    bob_events = []
    for i in range(3):
        reply = await through(http, bob, "subdomain", "POST", "/hook", body=f"bob's webhook {i}".encode())
        assert (reply.status, reply.header("X-Target")) == (200, "bob"), reply.body
        bob_events.append(dict(reply.json()["headers"])["X-Relay-Event-Id"])
    reply = await api(http, server, bob_token, "GET", "events?name=shared")
    assert reply.status == 200, reply.body
    listed = reply.json()["events"]
    assert sorted(e["id"] for e in listed) == sorted(bob_events)  # never alice's event
    assert all([d["destination"] for d in e["deliveries"]] == ["agent:*"] for e in listed)

    # Alice's replay attempt again, then one more webhook of bob's as a barrier: her event
    # never reached bob's agent, and nothing of bob's reached her URL.
    reply = await api(http, server, alice_token, "POST", f"events/{alice_event}/replay")
    assert reply.status == 409, reply.body
    reply = await through(http, bob, "path", "POST", "/hook", body=b"bob's barrier")
    assert (reply.status, reply.header("X-Target")) == (200, "bob"), reply.body
    assert [s.header("X-Relay-Event-Id") for s in bob_target.requests].count(alice_event) == 0
    assert len(bob_target.seen("/hook")) == 4
    assert len(alice_hooks.requests) == seen_by_alice_url
    assert [s.header("X-Relay-Event-Id") for s in alice_hooks.requests] == [alice_event]


async def test_releasing_without_yes_refuses_and_says_how_many_events_would_die(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    token = server.token("alice")
    reply = await api(http, server, token, "PATCH", "tunnels/alice", {"mode": "queue"})  # claims the name
    assert reply.status == 200, reply.body
    for i in range(3):  # no agent: each waits
        assert (await post(http, server, "alice", "/hook", f"#{i}".encode())).status == 202

    refused = release(server, "alice")
    assert refused.returncode != 0
    assert "not releasing 'alice' (held by alice) without --yes: 3 events waiting" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert names_listed(server) == ["alice"]  # nothing happened
    reply = await api(http, server, token, "GET", "events?name=alice")
    assert [e["status"] for e in reply.json()["events"]] == ["pending"] * 3

    released = release(server, "alice", "--yes")
    assert released.returncode == 0, released.stderr
    assert "3 events dead" in released.stderr
    assert names_listed(server) == []
    reply = await api(http, server, token, "GET", "events?name=alice")
    events = reply.json()["events"]
    assert [(e["status"], e["deliveries"][0]["dead_reason"]) for e in events] == [
        ("dead", "name released")
    ] * 3
    reply = await api(http, server, token, "GET", "tunnels")
    assert reply.json()["tunnels"] == []


# -- tokens ----------------------------------------------------------------------------------------


async def test_revoking_a_connected_agents_token_closes_it_and_its_api_access(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    revoked, kept = server.token("alice"), server.token("alice")
    first, second = relay.target("first"), relay.target("second")
    first_agent = relay.agent(server, revoked, first.forward)
    relay.agent(server, kept, second.forward)
    assert (await api(http, server, revoked, "GET", "tunnels")).status == 200

    result = server.cli("token", "revoke", token_id(revoked))
    assert result.returncode == 0, result.stderr

    assert await first_agent.process.exited() == 1
    assert REFUSED + "token revoked" in first_agent.process.stderr
    assert "Traceback" not in first_agent.process.stderr
    reply = await api(http, server, revoked, "GET", "tunnels")
    assert (reply.status, reply.json()["message"]) == (401, "token revoked")
    # The user's other token, and its agent, are untouched.
    assert (await api(http, server, kept, "GET", "tunnels")).status == 200
    tunnel = Tunnel(server, second, first_agent, "alice", kept)
    for form in ("subdomain", "path", "subdomain"):
        reply = await through(http, tunnel, form, "GET", "/who")
        assert (reply.status, reply.header("X-Target")) == (200, "second")


async def test_a_token_that_expires_while_connected_is_closed(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    target = relay.target("alice")
    # A token of a few seconds; on a machine so loaded that the agent was not even
    # connected before it expired (refused at the handshake), again with twice as long.
    for expires in (3, 6, 12, 24):
        token = server.token("alice", expires=f"{expires}s")
        agent = relay.agent(server, token, target.forward, ready=False)
        await until(
            lambda agent=agent: agent.forwarding() or not agent.process.running(),
            30,
            "the agent to connect or exit",
        )
        if agent.forwarding():
            break
        assert await agent.process.exited() == 1
        assert REFUSED + "token expired" in agent.process.stderr, agent.process.stderr
    assert agent.forwarding(), "the agent never connected before its token expired"

    assert await agent.process.exited(expires + 20) == 1
    assert REFUSED + "token expired" in agent.process.stderr
    assert "Traceback" not in agent.process.stderr
    reply = await api(http, server, token, "GET", "tunnels")
    assert (reply.status, reply.json()["message"]) == (401, "token expired")


async def test_a_revoked_agent_is_gone_from_the_tunnel(relay: Relay, http: aiohttp.ClientSession) -> None:
    # The only agent of a name, revoked: the name answers "offline", not the revoked agent.
    server = relay.server()
    token = server.token("alice")
    target = relay.target("alice")
    tunnel = Tunnel(server, target, relay.agent(server, token, target.forward), "alice", token)
    assert (await through(http, tunnel, "path", "GET", "/who")).status == 200
    assert server.cli("token", "revoke", token_id(token)).returncode == 0

    async def offline() -> bool:
        reply = await through(http, tunnel, "path", "GET", "/who")
        return reply.relay_error == "tunnel-offline"

    await until(offline, DELIVERED, "the revoked agent's tunnel to be offline")
    assert await tunnel.agent.process.exited() == 1


async def test_a_users_agents_over_the_cap_are_closed_with_4029_and_come_in_when_one_leaves(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # Nothing capped one user's agent connections but the per-address limit (512), from
    # each address it had: a token holder could hold thousands (found by a review).
    server = relay.server("--max-agents-per-user", "2")
    token, target = server.token("alice"), relay.target("alice")
    first = relay.agent(server, token, f"127.0.0.1:{target.port}")
    relay.agent(server, token, f"127.0.0.1:{target.port}")
    third = relay.agent(server, token, f"127.0.0.1:{target.port}", ready=False)
    refused = r"disconnected from the server \(4029 too many agents: 2 connected for this user\)"
    await third.process.line(refused, stream="stderr")
    assert third.process.running()  # it tries again later: not a final refusal
    # Another user's agents are not counted against alice's.
    bob = relay.tunnel(server, user="bob")
    assert (await through(http, bob, "subdomain", "GET", "/alive")).status == 200
    first.process.kill()
    await third.process.line(FORWARDING.pattern, count=2, timeout=60)  # it took the place
