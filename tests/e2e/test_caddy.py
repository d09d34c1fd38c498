"""The shipped ``deploy/Caddyfile`` in front of relay-server, in real Caddy (issue 9).

Caddy (Debian's package; CI installs it with apt) runs the Caddyfile as shipped, adapted
to JSON with ``caddy adapt`` and the deployment's environment, and changed only where a
test machine differs from a VPS: certificates come from Caddy's own internal CA instead
of Let's Encrypt (still on demand, still asking relay-server's ``/_relay/tls-ask``), the
listener is a free port on 127.0.0.1, there is no admin endpoint, no HTTP->HTTPS
redirect listener and no trust-store installation, and storage is a temp dir. The agent
connects through it over ``wss://`` trusting that CA with ``--ca-file``, and a client
sends webhooks over HTTPS, as a provider would.

Names: the tunnels live under ``relay.localhost``, which RFC 6761 (6.3) reserves for
loopback. Clients must dial the name itself (SNI picks the certificate, on-demand TLS
needs a name to ask about), so it has to resolve. Most desktops resolve ``*.localhost``
to loopback (systemd's nss-myhostname, browsers, curl); a bare resolver (``hosts: files
dns``, as in many containers) does not. There, the test's client resolves the names with
its own aiohttp resolver, and the agent gets a ``sitecustomize`` on its PYTHONPATH that
answers ``getaddrinfo`` for these names alone with 127.0.0.1: everything else the agent
does (TLS, SNI, certificate checks, the websocket) is its own unchanged code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .framework import (
    READY_TIMEOUT,
    RELAY_AGENT,
    Agent,
    Process,
    Relay,
    RelayServer,
    Reply,
    TargetService,
    fetch,
    free_port,
    in_ci,
    until,
    wait_until,
)

DOMAIN = "relay.localhost"
CADDYFILE = Path(__file__).resolve().parents[2] / "deploy" / "Caddyfile"
CADDY = shutil.which("caddy")
#: Where Caddy (2.6 and newer) keeps its internal CA's root, under its storage root;
#: written when the PKI app first starts.
ROOT_CERT = Path("pki", "authorities", "local", "root.crt")

#: A webhook as providers send it: a binary body and signature headers. Names are in
#: Go's canonical case, the case Caddy (net/http) passes every header name on in.
BODY = bytes(range(256)) + b'{"action":"opened","number":7}\r\n'
SIGNED = [
    ("Content-Type", "application/json"),
    ("X-Hub-Signature-256", "sha256=6c1ee0d0a3a7e4b1f2b1c4a5e3e0c1d2b3a4f5e6d7c8b9a0f1e2d3c4b5a69788"),
    ("Stripe-Signature", "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd"),
    ("X-Github-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
]
#: What a client claims about itself: Caddy believes none of it (it trusts no client)
#: and removes the rest, so the app sees only what Caddy and the relay say.
CLAIMS = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Prefix", "/admin"),
    ("Forwarded", "for=203.0.113.9;proto=http"),
    ("X-Real-Ip", "203.0.113.9"),
]

SITECUSTOMIZE = '''"""Resolves {domain} and its subdomains to 127.0.0.1, as RFC 6761 has *.localhost
(written by the relay test suite for an agent it starts; this machine's resolver does not)."""

import socket

_getaddrinfo = socket.getaddrinfo


def _loopback_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and (name == {domain!r} or name.endswith({suffix!r})):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_getaddrinfo
'''


def _system_resolves(name: str) -> bool:
    """True if this machine's resolver gives ``name`` loopback addresses only."""
    try:
        found = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return all(info[4][0] in ("127.0.0.1", "::1") for info in found)


class LoopbackResolver(AbstractResolver):
    """The test client's resolver: ``DOMAIN`` and its subdomains are 127.0.0.1, any other
    name is an error (nothing in this test may leave the machine)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host != DOMAIN and not host.endswith("." + DOMAIN):
            raise OSError(f"{host!r} is not a name of this test")
        return [
            ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0)
        ]

    async def close(self) -> None:
        pass


# -- Caddy -----------------------------------------------------------------------------------


def caddy_config(relay_port: int, https_port: int, http_port: int, storage: Path, env: dict[str, str]) -> Any:
    """The shipped Caddyfile as Caddy's JSON, with the swaps described at the top."""
    assert CADDY is not None
    adapted = subprocess.run(
        [CADDY, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env={
            **env,
            "RELAY_DOMAIN": DOMAIN,
            "ACME_EMAIL": "ops@example.com",
            "RELAY_UPSTREAM": f"127.0.0.1:{relay_port}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert adapted.returncode == 0, f"caddy adapt failed:\n{adapted.stderr}"
    config = json.loads(adapted.stdout)

    # What this test relies on, as the shipped file says it: certificates on demand,
    # allowed by relay-server's ask endpoint at the upstream address.
    automation = config["apps"]["tls"]["automation"]
    assert automation["on_demand"]["ask"] == f"http://127.0.0.1:{relay_port}/_relay/tls-ask", automation
    assert automation["policies"] and all(p.get("on_demand") for p in automation["policies"]), automation
    for policy in automation["policies"]:
        policy["issuers"] = [{"module": "internal"}]  # instead of Let's Encrypt

    http = config["apps"]["http"]
    http["http_port"] = http_port  # never 80: nothing listens on it (no redirects below)
    http["https_port"] = https_port
    for server in http["servers"].values():
        assert server["listen"] == [":443"], server["listen"]
        server["listen"] = [f"127.0.0.1:{https_port}"]
        # The redirect listener would bind http_port on every interface.
        server["automatic_https"] = {"disable_redirects": True}
    # Caddy would install its root in the system's trust stores (it can, as root).
    config["apps"]["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
    config["admin"] = {"disabled": True}
    config["storage"] = {"module": "file_system", "root": str(storage)}
    return config


def _accepts(port: int, process: Process) -> bool:
    if not process.running():
        raise AssertionError(f"caddy exited before it listened; {process.describe()}")
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _root_written(path: Path) -> bool:
    try:
        return b"-----END CERTIFICATE-----" in path.read_bytes()
    except FileNotFoundError:
        return False


def start_caddy(relay: Relay, relay_port: int, https_port: int) -> tuple[Process, Path]:
    """A running Caddy on ``https_port`` in front of ``relay_port``: its process and CA root."""
    home = relay.new_dir("caddy-home")
    storage = relay.new_dir("caddy-storage")
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    config = caddy_config(relay_port, https_port, free_port(), storage, {**relay.env, **env})
    path = relay.new_dir("caddy-config") / "caddy.json"
    path.write_text(json.dumps(config, indent=1))
    assert CADDY is not None
    process = relay.spawn([CADDY, "run", "--config", str(path)], f"caddy :{https_port}", env=env)
    wait_until(lambda: _accepts(https_port, process), READY_TIMEOUT, "caddy's HTTPS port")
    root = storage / ROOT_CERT
    wait_until(lambda: _root_written(root), READY_TIMEOUT, f"caddy's internal CA root ({ROOT_CERT})")
    return process, root


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    caddy: Process
    port: int  # Caddy's HTTPS port: the public one
    root: Path  # Caddy's internal CA root certificate
    server: RelayServer
    target: TargetService
    agent: Agent
    agent_env: dict[str, str]  # what an agent needs to resolve DOMAIN here
    token: str

    def host(self, name: str | None = None) -> str:
        """The Host a client sends for tunnel ``name`` (``None``: the apex)."""
        return f"{name}.{DOMAIN}:{self.port}" if name else f"{DOMAIN}:{self.port}"

    def asks(self, status: int) -> int:
        """How many ``/_relay/tls-ask`` requests relay-server answered with ``status``."""
        assert self.server.process is not None
        lines = [line for line in self.server.process.stderr_lines if line.startswith("{")]
        records = [json.loads(line) for line in lines]
        return sum(
            1
            for r in records
            if r.get("logger") == "relay.access" and r["path"] == "/_relay/tls-ask" and r["status"] == status
        )


def agent_argv(stack_port: int, token: str, forward: str, *extra: str) -> list[str]:
    return [
        str(RELAY_AGENT),
        "connect",
        "--server",
        f"https://{DOMAIN}:{stack_port}",
        "--token",
        token,
        "--forward",
        forward,
        *extra,
    ]


def resolution_env(relay: Relay) -> dict[str, str]:
    """Environment for an agent that must resolve DOMAIN's names: none if this machine
    does, else the ``sitecustomize`` described at the top."""
    if _system_resolves(DOMAIN) and _system_resolves(f"alice.{DOMAIN}"):
        return {}
    shim = relay.new_dir("resolve-localhost")
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(domain=DOMAIN, suffix="." + DOMAIN))
    path = os.pathsep.join(p for p in (str(shim), relay.env.get("PYTHONPATH", "")) if p)
    # uvloop resolves names with libuv, past socket.getaddrinfo: asyncio's loop uses the shim.
    return {"PYTHONPATH": path, "RELAY_EVENT_LOOP": "asyncio"}


@pytest.fixture(scope="module")
def stack(module_relay: Relay) -> Stack:
    if CADDY is None:
        if in_ci():
            pytest.fail("caddy is not installed, and CI must run this test (apt-get install caddy)")
        pytest.skip("caddy is not installed (apt-get install caddy); CI runs this test")
    relay = module_relay
    https_port = free_port()
    server = relay.server(
        "--trusted-proxy",
        "127.0.0.1/32",
        "--public-url",  # the last --public-url wins: the one before is the framework's
        f"https://{DOMAIN}:{https_port}",
        "--access-log",
        "--log-format",
        "json",
    )
    caddy, root = start_caddy(relay, server.port, https_port)
    target = relay.target("alice")
    token = server.token("alice")
    env = resolution_env(relay)
    argv = agent_argv(https_port, token, target.forward, "--ca-file", str(root))
    agent = Agent(relay.spawn(argv, "relay-agent alice (through caddy)", env=env))
    return Stack(caddy, https_port, root, server, target, agent, env, token)


@pytest.fixture
async def https(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that trusts Caddy's internal CA (and nothing else) and resolves DOMAIN."""
    context = ssl.create_default_context(cafile=str(stack.root))
    connector = aiohttp.TCPConnector(limit=0, ssl=context, resolver=LoopbackResolver())
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    ) as session:
        yield session


async def send(
    https: aiohttp.ClientSession,
    stack: Stack,
    name: str | None,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One HTTPS request to Caddy for ``path`` on tunnel ``name``'s host (``None``: the apex)."""
    host = stack.host(name)
    url = URL(f"https://{host}{path}", encoded=True)
    return await fetch(https, method, url, host, headers=headers or [], body=body)


def test_the_agent_connects_through_caddy_trusting_its_ca(stack: Stack, module_relay: Relay) -> None:
    local = f"http://{stack.target.forward}"
    assert stack.agent.ready() == [
        (f"https://alice.{DOMAIN}:{stack.port}", local),
        (f"https://{DOMAIN}:{stack.port}/t/alice", local),
    ]
    # The same agent without --ca-file trusts the system's CAs only: Caddy's certificate
    # does not verify, and the agent says so and exits (no retrying a configuration fault).
    argv = agent_argv(stack.port, stack.token, stack.target.forward)
    untrusting = module_relay.spawn(argv, "relay-agent without --ca-file", env=stack.agent_env)
    assert untrusting.wait() == 1, untrusting.describe()
    assert f"cannot verify the certificate of {DOMAIN}" in untrusting.stderr, untrusting.describe()
    assert not untrusting.stdout_lines


@pytest.mark.parametrize(
    ("name", "path", "prefix"),
    [("alice", "/hook?x=1", None), (None, "/t/alice/hook?x=2", "/t/alice")],
    ids=["subdomain", "path"],
)
async def test_a_webhook_over_https_reaches_the_local_service_byte_exact(
    stack: Stack, https: aiohttp.ClientSession, name: str | None, path: str, prefix: str | None
) -> None:
    stack.agent.ready()
    stack.target.requests.clear()
    reply = await send(https, stack, name, "POST", path, headers=[*SIGNED, *CLAIMS], body=BODY)

    assert reply.status == 200, reply
    assert reply.header("X-Target") == "alice"
    [seen] = stack.target.requests
    echoed = reply.json()
    assert (echoed["method"], echoed["path"]) == ("POST", seen.raw_path)
    assert base64.b64decode(echoed["body"]) == BODY
    assert (seen.method, seen.raw_path, seen.body) == ("POST", path.removeprefix(prefix or ""), BODY)
    for header in SIGNED:
        assert seen.getall(header[0]) == [header[1]], header
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    # Caddy believes no client's chain: the first hop is the client's own address,
    # then the relay appends its peer, Caddy (also on 127.0.0.1 here).
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1, 127.0.0.1"]
    assert seen.getall("X-Forwarded-Host") == [stack.host(name)]
    assert seen.getall("X-Forwarded-Prefix") == ([prefix] if prefix else [])
    assert seen.getall("Forwarded") == []
    assert seen.getall("X-Real-Ip") == []
    [request_id] = seen.getall("X-Request-Id")
    assert request_id


async def test_an_unclaimed_name_gets_no_certificate(stack: Stack) -> None:
    stack.agent.ready()
    context = ssl.create_default_context(cafile=str(stack.root))

    async def handshake(host: str) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", stack.port, ssl=context, server_hostname=host)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    await handshake(f"alice.{DOMAIN}")  # the same client, a claimed name: a certificate
    refused_before = stack.asks(404)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake(f"nobody.{DOMAIN}")
    # Caddy asked relay-server (the 404 is in its access log), which said no.
    await until(lambda: stack.asks(404) > refused_before, 10, "relay-server's 404 to caddy's ask")
    async with aiohttp.ClientSession() as direct:
        ask = f"http://127.0.0.1:{stack.server.port}/_relay/tls-ask"
        async with direct.get(ask, params={"domain": f"nobody.{DOMAIN}"}) as resp:
            assert resp.status == 404
        async with direct.get(ask, params={"domain": f"alice.{DOMAIN}"}) as resp:
            assert resp.status == 200


async def test_metrics_are_not_served_through_caddy(stack: Stack, https: aiohttp.ClientSession) -> None:
    stack.agent.ready()
    outside = await send(https, stack, None, "GET", "/metrics")
    assert (outside.status, outside.relay_error) == (404, "not-found")
    assert b"relay_" not in outside.body
    ask = await send(https, stack, None, "GET", f"/_relay/tls-ask?domain=alice.{DOMAIN}")
    assert ask.status == 404  # only Caddy itself asks, and directly
    # A tunnel's /metrics is its app's, and reaches it.
    app = await send(https, stack, "alice", "GET", "/metrics")
    assert (app.status, app.header("X-Target"), app.json()["path"]) == (200, "alice", "/metrics")
    async with aiohttp.ClientSession() as direct:
        async with direct.get(f"http://127.0.0.1:{stack.server.port}/metrics") as resp:
            assert resp.status == 200
            assert "relay_agents_connected 1.0" in await resp.text()
