"""Tokens and names: who may connect, under which name, and what a refused agent prints."""

from __future__ import annotations

import re

import aiohttp
import pytest

from .framework import RELAY_AGENT, Agent, Relay, Tunnel, api, through, until

REFUSED = "relay-agent: the server refused this agent: "


def assert_refused(code: int, stderr: str, reason: str) -> None:
    assert code == 1, stderr
    assert REFUSED + reason in stderr, stderr
    assert "Traceback" not in stderr


async def assert_serves(http: aiohttp.ClientSession, tunnel: Tunnel, label: str) -> None:
    for form in ("subdomain", "path"):
        reply = await through(http, tunnel, form, "GET", "/who")
        assert reply.status == 200, reply
        assert reply.json()["target"] == label


def test_token_create_prints_the_token_alone(relay: Relay) -> None:
    server = relay.server(start=False)
    result = server.cli("token", "create", "alice")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n", result.stdout)
    [row] = server.token_rows()
    assert (row["USER"], row["NAMES"], row["STATUS"]) == ("alice", "alice,alice-*", "active")


@pytest.mark.parametrize("expires", ["0s", "soon", "10y", "-5m", "1.5h", ""])
def test_token_create_with_a_bad_expiry_fails_naming_the_cause(relay: Relay, expires: str) -> None:
    server = relay.server(start=False)
    result = server.cli("token", "create", "alice", "--expires", expires)
    assert result.returncode != 0
    assert result.stdout == ""  # no token for a bad request
    assert "--expires" in result.stderr
    assert "invalid duration" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.token_rows() == []


def test_token_create_with_a_bad_user_fails(relay: Relay) -> None:
    server = relay.server(start=False)
    result = server.cli("token", "create", "Not_A_Label")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "USER" in result.stderr and "DNS label" in result.stderr


def test_revoking_an_unknown_token_id_fails(relay: Relay) -> None:
    server = relay.server(start=False)
    result = server.cli("token", "revoke", "0" * 32)
    assert result.returncode != 0
    assert "no active token has the id" in result.stderr


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "token malformed"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.", "token malformed"),  # alg none, unsigned
    ],
)
def test_a_bad_token_is_refused(relay: Relay, token: str, reason: str) -> None:
    server = relay.server()
    code, agent = relay.refused_agent(server, token)
    assert_refused(code, agent.stderr, reason)
    assert agent.stdout == ""  # no Forwarding line for a refused agent


def test_a_token_of_another_server_is_refused(relay: Relay) -> None:
    server, other = relay.server(), relay.server(start=False)
    code, agent = relay.refused_agent(server, other.token("alice"))
    assert_refused(code, agent.stderr, "token signature invalid")


async def test_an_expired_token_is_refused(relay: Relay) -> None:
    server = relay.server()
    token = server.token("alice", expires="1s")
    await until(lambda: server.token_rows()[0]["STATUS"] == "expired", 30, "the token to expire")
    code, agent = relay.refused_agent(server, token)
    assert_refused(code, agent.stderr, "token expired")


async def test_a_revoked_token_is_refused(relay: Relay, http: aiohttp.ClientSession) -> None:
    server = relay.server()
    token = server.token("alice")
    # It works before it is revoked ...
    tunnel = relay.tunnel(server, token=token)
    await assert_serves(http, tunnel, "alice")
    tunnel.agent.process.kill()

    [row] = server.token_rows()
    result = server.cli("token", "revoke", row["ID"])
    assert result.returncode == 0, result.stderr
    assert row["ID"] in result.stderr
    assert server.token_rows()[0]["STATUS"] == "revoked"

    # ... and not after.
    code, agent = relay.refused_agent(server, token)
    assert_refused(code, agent.stderr, "token revoked")


def test_a_name_the_token_does_not_list_is_refused(relay: Relay) -> None:
    server = relay.server()
    code, agent = relay.refused_agent(server, server.token("alice"), "127.0.0.1:9", "bob")
    assert_refused(code, agent.stderr, "token does not allow the name 'bob'")


async def test_a_token_claims_the_names_matching_its_patterns(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    tunnel = relay.tunnel(server, user="alice", name="alice-dev")
    assert [url for url, _ in tunnel.agent.ready()] == [
        f"http://alice-dev.localhost:{server.port}",
        f"http://localhost:{server.port}/t/alice-dev",
    ]
    await assert_serves(http, tunnel, "alice-dev")


async def test_another_user_cannot_take_a_claimed_name(relay: Relay, http: aiohttp.ClientSession) -> None:
    server = relay.server()
    alice = relay.tunnel(server, user="alice")
    bob_token = server.token("bob", "alice")  # bob's token lists the name, but alice owns it

    code, bob = relay.refused_agent(server, bob_token, "127.0.0.1:9", "alice")
    assert_refused(code, bob.stderr, "name 'alice' belongs to another user")
    await assert_serves(http, alice, "alice")  # alice's tunnel is untouched

    # Also while alice is offline: the name stays hers.
    alice.agent.process.kill()
    code, bob = relay.refused_agent(server, bob_token, "127.0.0.1:9", "alice")
    assert_refused(code, bob.stderr, "name 'alice' belongs to another user")


async def test_a_released_name_can_be_claimed_by_another_user(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server = relay.server()
    alice = relay.tunnel(server, user="alice")
    alice.agent.process.kill()

    result = server.cli("names", "release", "alice", "--yes")
    assert result.returncode == 0, result.stderr
    listed = server.cli("names", "list")
    assert not re.search(r"^alice\s", listed.stdout, re.MULTILINE), listed.stdout

    bob = relay.tunnel(
        server,
        user="bob",
        name="alice",
        token=server.token("bob", "alice"),
        target=relay.target("bob's target"),
    )
    await assert_serves(http, bob, "bob's target")
    code, alice_again = relay.refused_agent(server, alice.token, "127.0.0.1:9")
    assert_refused(code, alice_again.stderr, "name 'alice' belongs to another user")


async def test_token_create_names_what_others_took_from_the_new_users_namespace(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    # A second review: names are first come, so alice's alice-* could take alice-ci's
    # names before that user existed; the admin who creates alice-ci is told which.
    server = relay.server()
    alice = server.token("alice")
    for name in ("alice-ci", "alice-ci-prod", "alice-cx"):
        assert (await api(http, server, alice, "PATCH", f"tunnels/{name}", {"mode": "live"})).status == 200
    result = server.cli("token", "create", "alice-ci")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1  # the token alone, still
    assert "alice-ci (alice), alice-ci-prod (alice);" in result.stderr
    assert "alice-cx" not in result.stderr
    assert "relay-server names release NAME" in result.stderr
    # From now on the namespace is alice-ci's: alice's wildcard takes no more of it.
    reply = await api(http, server, alice, "PATCH", "tunnels/alice-ci-new", {"mode": "live"})
    assert (reply.status, reply.header("X-Relay-Error")) == (409, "conflict")


def test_releasing_a_free_name_fails(relay: Relay) -> None:
    server = relay.server(start=False)
    result = server.cli("names", "release", "nobody")
    assert result.returncode != 0
    assert "nobody holds the name 'nobody'" in result.stderr


def test_an_agent_without_a_token_says_so(relay: Relay) -> None:
    server = relay.server()
    argv = [str(RELAY_AGENT), "connect", "--server", server.public_url, "--forward", "127.0.0.1:9"]
    agent = relay.spawn(argv, "relay-agent without a token")
    assert agent.wait() == 1
    assert "no token" in agent.stderr
    assert agent.stdout == ""


async def test_login_saves_server_and_token_for_connect(relay: Relay, http: aiohttp.ClientSession) -> None:
    server, target = relay.server(), relay.target("alice")
    token = server.token("alice")
    login = relay.spawn(
        [str(RELAY_AGENT), "login", "--server", server.public_url, "--token", token], "relay-agent login"
    )
    assert login.wait() == 0, login.stderr
    assert f"Logged in to {server.public_url} as alice" in login.stdout

    argv = [str(RELAY_AGENT), "connect", "--forward", target.forward]  # neither --server nor --token
    agent = Agent(relay.spawn(argv, "relay-agent after login"))
    agent.ready()
    await assert_serves(http, Tunnel(server, target, agent, "alice", token), "alice")


async def test_connect_reads_its_options_from_the_environment(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    server, target = relay.server(), relay.target("alice-env")
    env = {
        "RELAY_SERVER": server.public_url,
        "RELAY_TOKEN": server.token("alice"),
        "RELAY_FORWARD": target.forward,
        "RELAY_NAME": "alice-env",
    }
    agent = Agent(relay.spawn([str(RELAY_AGENT), "connect"], "relay-agent from env", env=env))
    assert [url for url, _ in agent.ready()] == [
        f"http://alice-env.localhost:{server.port}",
        f"http://localhost:{server.port}/t/alice-env",
    ]
    await assert_serves(http, Tunnel(server, target, agent, "alice-env", ""), "alice-env")
