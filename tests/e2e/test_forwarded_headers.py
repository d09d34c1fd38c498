"""What a request says about where it came from (issue 8, §5).

- ``X-Relay-Event-Id``, ``X-Relay-Attempt`` and ``X-Relay-Received-At`` are the relay's:
  a client's are removed from every forwarded request (GETs, live tunnels), so nobody
  can forge the id apps deduplicate on.
- ``X-Forwarded-*``, ``Forwarded`` and ``X-Real-IP`` from a client are dropped and the
  relay sets its own; only a peer in ``--trusted-proxy`` has its chain kept (and is
  appended) and its X-Forwarded-Proto/-Host believed.
- Header bytes HTTP allows (obs-text) reach the local service unchanged.
"""

from __future__ import annotations

import aiohttp
import pytest

from .framework import Relay, Tunnel, raw_exchange, through

CLIENT_CLAIMS = [
    ("X-Relay-Event-Id", "evt_forged"),
    ("X-Relay-Attempt", "99"),
    ("X-Relay-Received-At", "1970-01-01T00:00:00Z"),
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "bank.example"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Port", "443"),
    ("Forwarded", "for=203.0.113.7;proto=https"),
    ("X-Real-IP", "203.0.113.7"),
]


@pytest.fixture(scope="module")
def queue_tunnel(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="alice")


@pytest.fixture(scope="module")
def live_tunnel(module_relay: Relay, queue_tunnel: Tunnel) -> Tunnel:
    return module_relay.tunnel(server=queue_tunnel.server, user="bob", agent_extra=("--mode", "live"))


@pytest.fixture(scope="module")
def behind_proxy(module_relay: Relay) -> Tunnel:
    server = module_relay.server("--trusted-proxy", "127.0.0.0/8", "--trusted-proxy", "::1/128")
    return module_relay.tunnel(server=server, user="carol", agent_extra=("--mode", "live"))


@pytest.mark.parametrize(("which", "method"), [("queue", "GET"), ("live", "GET"), ("live", "POST")])
@pytest.mark.parametrize("form", ["subdomain", "path"])
async def test_a_clients_relay_and_forwarding_headers_never_reach_the_app(
    queue_tunnel: Tunnel, live_tunnel: Tunnel, http: aiohttp.ClientSession, which: str, method: str, form: str
) -> None:
    tunnel = queue_tunnel if which == "queue" else live_tunnel
    tunnel.target.requests.clear()
    body = b"payload" if method == "POST" else None
    reply = await through(http, tunnel, form, method, "/claims", headers=CLIENT_CLAIMS, body=body)
    assert reply.status == 200, reply
    [seen] = tunnel.target.requests
    for name in ("X-Relay-Event-Id", "X-Relay-Attempt", "X-Relay-Received-At"):
        assert seen.getall(name) == [], name
    for name in ("Forwarded", "X-Real-IP", "X-Forwarded-Port"):
        assert seen.getall(name) == [], name
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [tunnel.host(form)]
    assert seen.getall("X-Forwarded-Prefix") == ([f"/t/{tunnel.name}"] if form == "path" else [])


async def test_a_trusted_proxys_forwarding_headers_are_kept(
    behind_proxy: Tunnel, http: aiohttp.ClientSession
) -> None:
    behind_proxy.target.requests.clear()
    claims = [
        ("X-Forwarded-For", "203.0.113.7, 198.51.100.2"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "carol.relay.example.com"),
        ("X-Forwarded-Port", "443"),
        ("X-Real-IP", "203.0.113.7"),
        ("X-Relay-Event-Id", "evt_forged"),
    ]
    reply = await through(http, behind_proxy, "path", "GET", "/via-proxy", headers=claims)
    assert reply.status == 200, reply
    [seen] = behind_proxy.target.requests
    assert seen.getall("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    assert seen.getall("X-Forwarded-Host") == ["carol.relay.example.com"]
    assert seen.getall("X-Forwarded-Port") == ["443"]
    assert seen.getall("X-Real-IP") == ["203.0.113.7"]
    assert seen.getall("X-Relay-Event-Id") == []  # even a trusted proxy does not speak for the relay


async def test_without_forwarding_headers_a_trusted_proxy_is_the_client(
    behind_proxy: Tunnel, http: aiohttp.ClientSession
) -> None:
    behind_proxy.target.requests.clear()
    reply = await through(http, behind_proxy, "subdomain", "GET", "/direct")
    assert reply.status == 200
    [seen] = behind_proxy.target.requests
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [behind_proxy.host("subdomain")]


@pytest.mark.parametrize("form", ["subdomain", "path"])
async def test_request_header_bytes_reach_the_app_unchanged(live_tunnel: Tunnel, form: str) -> None:
    live_tunnel.target.requests.clear()
    request = (
        f"GET {live_tunnel.raw_target(form, '/bytes')} HTTP/1.1\r\n"
        f"Host: {live_tunnel.host(form)}\r\nConnection: close\r\n".encode()
        + b"X-City: S\xc3\xa3o Paulo\r\nX-Latin: caf\xe9\r\n\r\n"
    )
    reply, _ = await raw_exchange(live_tunnel.server.port, request)
    assert reply.status == 200, reply
    [seen] = live_tunnel.target.requests
    # The target decodes header bytes as latin-1: one character per byte.
    assert seen.getall("X-City") == [b"S\xc3\xa3o Paulo".decode("latin-1")]
    assert seen.getall("X-Latin") == [b"caf\xe9".decode("latin-1")]
