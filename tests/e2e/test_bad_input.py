"""Bad input from public clients: a clear 4xx with X-Relay-Error, nothing reaches the
target, and the server keeps answering. Malformed requests go over raw sockets, since an
HTTP client library would refuse or normalise them.

One server, agent (alice) and target are shared by the module.
"""

from __future__ import annotations

import aiohttp
import pytest

from .framework import Relay, Reply, Tunnel, fetch, raw_exchange, through

FORMS = ["subdomain", "path"]


@pytest.fixture(scope="module")
def alice(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="alice")


@pytest.fixture(autouse=True)
def fresh_log(alice: Tunnel) -> None:
    alice.target.requests.clear()


async def send(tunnel: Tunnel, request_line: str, host: str | None = None) -> Reply:
    """Send ``request_line`` (e.g. ``GET /x HTTP/1.1``) with a Host header, on a raw socket."""
    host = host or tunnel.server.apex
    data = f"{request_line}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1")
    reply, _ = await raw_exchange(tunnel.server.port, data)
    return reply


async def assert_still_up(tunnel: Tunnel, http: aiohttp.ClientSession) -> None:
    health = await fetch(http, "GET", tunnel.server.url("/healthz"), tunnel.server.apex)
    assert health.status == 200
    reply = await through(http, tunnel, "subdomain", "GET", "/still-up")
    assert reply.status == 200
    assert reply.json()["target"] == "alice"


def assert_relay_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply
    assert reply.relay_error == code
    assert b"Traceback" not in reply.body


async def test_absolute_form_target_is_refused(alice: Tunnel, http: aiohttp.ClientSession) -> None:
    port = alice.server.port
    # aiohttp alone would route this by the target's host (bob), not by the Host header (alice).
    for target in (
        f"http://bob.localhost:{port}/x",
        "http://bob.localhost/x",
        f"http://alice.localhost:{port}/x",
    ):
        reply = await send(alice, f"GET {target} HTTP/1.1", f"alice.localhost:{port}")
        assert_relay_error(reply, 400, "bad-request")
    reply = await send(alice, "OPTIONS * HTTP/1.1", f"alice.localhost:{port}")
    assert_relay_error(reply, 400, "bad-request")
    assert alice.target.requests == []
    await assert_still_up(alice, http)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
async def test_connect_and_trace_are_refused(
    alice: Tunnel, http: aiohttp.ClientSession, form: str, method: str
) -> None:
    host = alice.host(form)
    # CONNECT's target is an authority (host:port); the path form is tried too, to be thorough.
    target = (
        "alice.localhost:443" if method == "CONNECT" and form == "subdomain" else alice.raw_target(form, "/x")
    )
    reply = await send(alice, f"{method} {target} HTTP/1.1", host)
    assert_relay_error(reply, 405, "method-not-allowed")
    assert alice.target.requests == []
    await assert_still_up(alice, http)


@pytest.mark.parametrize("form", FORMS)
async def test_one_oversized_header_gets_a_4xx_and_the_server_stays_up(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    big = "v" * (20 * 1024)
    request = f"GET {alice.raw_target(form, '/big')} HTTP/1.1\r\nX-Big: {big}"
    reply = await send(alice, request, alice.host(form))
    assert 400 <= reply.status < 500
    assert reply.status in (400, 431)
    assert reply.getall("X-Relay-Error") == [{400: "bad-request", 431: "headers-too-large"}[reply.status]]
    assert b"Traceback" not in reply.body
    assert alice.target.requests == []
    await assert_still_up(alice, http)


@pytest.mark.parametrize("form", FORMS)
async def test_too_many_header_bytes_get_431_and_the_server_stays_up(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    headers = [(f"X-Fill-{i}", "f" * (8 * 1024)) for i in range(5)]  # 40 KiB in all, each line fine
    reply = await through(http, alice, form, "GET", "/many", headers=headers)
    assert_relay_error(reply, 431, "headers-too-large")
    assert alice.target.requests == []
    await assert_still_up(alice, http)


async def test_headers_just_under_the_limit_pass(alice: Tunnel, http: aiohttp.ClientSession) -> None:
    headers = [(f"X-Fill-{i}", "f" * (6 * 1024)) for i in range(4)]  # 24 KiB
    reply = await through(http, alice, "path", "GET", "/fits", headers=headers)
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.getall("X-Fill-3") == ["f" * (6 * 1024)]


@pytest.mark.parametrize(
    "target",
    [
        "/t/alice/../bob/",
        "/t/alice/..",
        "/t/alice/%2e%2e/bob/",
        "/t/alice/%2E%2E/%2e%2e/x",
        "/t/alice/./a/../../bob/x?q=1",
        "/t/alice/.%2e/bob",
    ],
)
async def test_dot_segments_leaving_the_tunnel_are_refused(
    alice: Tunnel, http: aiohttp.ClientSession, target: str
) -> None:
    reply = await send(alice, f"GET {target} HTTP/1.1")
    assert_relay_error(reply, 400, "bad-request")
    assert alice.target.requests == []
    await assert_still_up(alice, http)


async def test_dot_segments_inside_the_tunnel_are_forwarded_as_sent(alice: Tunnel) -> None:
    target = "/t/alice/a/b/../c"
    reply = await send(alice, f"GET {target} HTTP/1.1")
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.raw_path == "/a/b/../c"


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("nobody.localhost:{port}", "/hook"),
        ("localhost:{port}", "/t/nobody/hook"),
        ("localhost:{port}", "/t/Not_A_Name/hook"),
        ("a.b.localhost:{port}", "/hook"),
    ],
)
async def test_unknown_tunnel_is_404(
    alice: Tunnel, http: aiohttp.ClientSession, host: str, path: str
) -> None:
    port = alice.server.port
    reply = await fetch(http, "POST", alice.server.url(path), host.format(port=port))
    assert reply.status == 404
    assert reply.relay_error in ("unknown-tunnel", "not-found")
    assert b"Traceback" not in reply.body
    if path.startswith("/t/") or host.startswith("nobody"):
        assert reply.relay_error == "unknown-tunnel"


@pytest.mark.parametrize("path", ["/", "/nothing-here", "/t", "/_relay/nope", "/healthz/x"])
async def test_unknown_apex_page_is_404(alice: Tunnel, http: aiohttp.ClientSession, path: str) -> None:
    reply = await fetch(http, "GET", alice.server.url(path), alice.server.apex)
    assert_relay_error(reply, 404, "not-found")


async def test_agent_endpoint_without_upgrade_is_400(alice: Tunnel, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, "GET", alice.server.url("/_relay/agent"), alice.server.apex)
    assert_relay_error(reply, 400, "bad-request")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: alice.localhost\r\nBad Header Name: x\r\n\r\n",
        b"POST /t/alice/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
        b"POST /t/alice/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
        b"GET /t/alice/caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /t/alice/x?a=\xff HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ],
    ids=[
        "tls",
        "no-version",
        "bad-version",
        "bad-header-name",
        "negative-length",
        "two-lengths",
        "raw-utf8-path",
        "raw-byte-query",
    ],
)
async def test_malformed_requests_get_400_and_the_server_stays_up(
    alice: Tunnel, http: aiohttp.ClientSession, garbage: bytes
) -> None:
    reply, _ = await raw_exchange(alice.server.port, garbage)
    assert reply.status == 400
    # The parser's refusals carry the relay's error header too (a review found them bare).
    assert reply.getall("X-Relay-Error") == ["bad-request"], reply
    assert reply.getall("Server") == ["relay"], reply
    assert b"Traceback" not in reply.body
    assert alice.target.requests == []
    await assert_still_up(alice, http)


@pytest.mark.parametrize(
    "header",
    [b"X-Bad: a\x01b", b"X-Bad: a\x7fb", b"X-Bad: \x1b[31mred", b"X-Bad: a\x0bb", b"X-Bad: a\x0cb"],
    ids=["soh", "del", "escape", "vtab", "formfeed"],
)
@pytest.mark.parametrize("form", FORMS)
async def test_control_characters_in_a_header_are_400(
    alice: Tunnel, http: aiohttp.ClientSession, header: bytes, form: str
) -> None:
    request = (
        f"GET {alice.raw_target(form, '/ctl')} HTTP/1.1\r\nHost: {alice.host(form)}\r\n".encode()
        + header
        + b"\r\nConnection: close\r\n\r\n"
    )
    reply, _ = await raw_exchange(alice.server.port, request)
    assert reply.status == 400, reply
    assert reply.getall("X-Relay-Error") == ["bad-request"], reply
    assert b"Traceback" not in reply.body
    assert alice.target.requests == []
    await assert_still_up(alice, http)


async def test_obs_text_in_a_header_is_not_a_control_character(alice: Tunnel) -> None:
    request = (
        f"GET /t/alice/obs HTTP/1.1\r\nHost: {alice.server.apex}\r\nConnection: close\r\n".encode()
        + b"X-Latin: caf\xe9\r\nX-Tab: a\tb\r\n\r\n"
    )
    reply, _ = await raw_exchange(alice.server.port, request)
    assert reply.status == 200, reply
    [seen] = alice.target.requests
    assert seen.getall("X-Tab") == ["a\tb"]
