"""Hosts are strict (issue 8, §3): a Host that is not ``host[:port]`` is a 400 before
routing, so ``Host: bob.localhost:PORT@alice.localhost`` reaches neither bob nor alice.

Real server, two tenants (alice, bob) with their own agents and targets; the requests
go over raw sockets, since HTTP client libraries refuse or normalise such Hosts.
"""

from __future__ import annotations

import pytest

from .framework import Relay, Reply, Tunnel, raw_exchange


@pytest.fixture(scope="module")
def alice(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="alice")


@pytest.fixture(scope="module")
def bob(module_relay: Relay, alice: Tunnel) -> Tunnel:
    return module_relay.tunnel(server=alice.server, user="bob")


@pytest.fixture(autouse=True)
def fresh_logs(alice: Tunnel, bob: Tunnel) -> None:
    alice.target.requests.clear()
    bob.target.requests.clear()


async def send(tunnel: Tunnel, target: str, *hosts: bytes) -> Reply:
    lines = [f"GET {target} HTTP/1.1".encode(), *(b"Host: " + host for host in hosts), b"Connection: close"]
    reply, _ = await raw_exchange(tunnel.server.port, b"\r\n".join(lines) + b"\r\n\r\n")
    return reply


BAD_HOSTS = [
    "bob.localhost:{port}@alice.localhost",
    "alice.localhost:{port}@bob.localhost",
    "bob.localhost@alice.localhost",
    "alice.localhost:{port}@bob.localhost:{port}",
    "bob.localhost:{port}/alice.localhost",
    "bob.localhost:{port}#alice.localhost",
    "bob.localhost:{port}?alice.localhost",
    "bob.localhost:{port}\\alice.localhost",
    "bob..localhost:{port}",
    ".bob.localhost:{port}",
    "bob .localhost:{port}",
    "bob.localhost :{port}",
    "bob.localhost:{port}x",
    "bob.localhost:99999",
    "bob.localhost:",
    "bob.localhost:{port}:{port}",
]


@pytest.mark.parametrize("host", BAD_HOSTS)
@pytest.mark.parametrize("form", ["subdomain", "path"])
async def test_a_host_that_is_not_host_port_is_400_and_reaches_nobody(
    alice: Tunnel, bob: Tunnel, host: str, form: str
) -> None:
    target = "/account" if form == "subdomain" else "/t/bob/account"
    reply = await send(alice, target, host.format(port=alice.server.port).encode())
    assert reply.status == 400, reply
    assert reply.relay_error == "bad-request"
    assert alice.target.requests == [] and bob.target.requests == []


@pytest.mark.parametrize("host", [b"b\xc3\xb6b.localhost", b"bob.localhost\x01", b"bob\xff.localhost"])
async def test_non_ascii_and_control_bytes_in_a_host_are_400(alice: Tunnel, bob: Tunnel, host: bytes) -> None:
    reply = await send(alice, "/account", host + b":%d" % alice.server.port)
    assert reply.status == 400, reply
    assert bob.target.requests == []


async def test_two_host_headers_are_400(alice: Tunnel, bob: Tunnel) -> None:
    port = alice.server.port
    reply = await send(alice, "/account", b"bob.localhost:%d" % port, b"alice.localhost:%d" % port)
    assert reply.status == 400, reply
    # aiohttp's parser refuses it before relay's code runs (no X-Relay-Error); relay would too.
    assert reply.relay_error in (None, "bad-request")
    assert alice.target.requests == [] and bob.target.requests == []


@pytest.mark.parametrize(
    ("host", "who"),
    [
        ("bob.localhost:{port}", "bob"),
        ("BOB.LOCALHOST:{port}", "bob"),
        ("bob.localhost.:{port}", "bob"),
        ("bob.localhost", "bob"),
        ("alice.localhost:{port}", "alice"),
    ],
)
async def test_good_hosts_route_as_before(alice: Tunnel, bob: Tunnel, host: str, who: str) -> None:
    reply = await send(alice, "/account", host.format(port=alice.server.port).encode())
    assert reply.status == 200, reply
    assert reply.header("X-Target") == who
