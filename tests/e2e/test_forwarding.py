"""Forwarding: what a public client and the local service see through a healthy tunnel.

One server, one agent (user alice, no --name) and one target are shared by the module;
each test starts with the target's request log empty.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import random
import re

import aiohttp
import pytest

from .framework import (
    HOP_RESPONSE_HEADERS,
    REQUEST_LINE,
    SET_COOKIES,
    SIZED_BODY,
    Relay,
    Tunnel,
    fetch,
    raw_exchange,
    raw_through,
    through,
)

FORMS = ["subdomain", "path"]


@pytest.fixture(scope="module")
def alice(module_relay: Relay) -> Tunnel:
    return module_relay.tunnel(user="alice")


@pytest.fixture(autouse=True)
def fresh_log(alice: Tunnel) -> None:
    alice.target.requests.clear()


async def test_healthz_answers_200_on_the_apex(alice: Tunnel, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, "GET", alice.server.url("/healthz"), alice.server.apex)
    assert reply.status == 200
    assert reply.relay_error is None


def test_agent_prints_both_public_urls(alice: Tunnel) -> None:
    port, target = alice.server.port, alice.target.port
    assert alice.agent.forwarding() == [
        f"Forwarding http://alice.localhost:{port} -> http://127.0.0.1:{target}",
        f"Forwarding http://localhost:{port}/t/alice -> http://127.0.0.1:{target}",
    ]


@pytest.mark.parametrize("form", FORMS)
async def test_both_url_forms_reach_the_target(alice: Tunnel, http: aiohttp.ClientSession, form: str) -> None:
    reply = await through(http, alice, form, "GET", "/hello/world?x=1&y=two")
    assert reply.status == 200
    echo = reply.json()
    assert echo["target"] == "alice"
    assert echo["method"] == "GET"
    assert echo["path"] == "/hello/world?x=1&y=two"  # the /t/alice prefix is stripped
    [seen] = alice.target.requests
    assert seen.getall("X-Forwarded-Prefix") == (["/t/alice"] if form == "path" else [])


@pytest.mark.parametrize(
    ("public", "forwarded"),
    [("/t/alice", "/"), ("/t/alice/", "/"), ("/t/alice?x=1", "/?x=1"), ("/t/alice/?x=1", "/?x=1")],
)
async def test_path_form_root(
    alice: Tunnel, http: aiohttp.ClientSession, public: str, forwarded: str
) -> None:
    reply = await fetch(http, "GET", alice.server.url(public), alice.server.apex)
    assert reply.status == 200
    assert reply.json()["path"] == forwarded


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("GET", None),
        ("POST", b'{"event": "push"}'),
        ("PUT", b"put body"),
        ("PATCH", b"patch body"),
        ("DELETE", b"delete body"),
        ("DELETE", None),
        ("OPTIONS", None),
        ("PROPFIND", b"<propfind/>"),
    ],
)
async def test_every_method_and_its_body_reach_the_target(
    alice: Tunnel, http: aiohttp.ClientSession, form: str, method: str, body: bytes | None
) -> None:
    reply = await through(http, alice, form, method, "/m", body=body)
    assert reply.status == 200
    echo = reply.json()
    assert echo["method"] == method
    assert base64.b64decode(echo["body"]) == (body or b"")
    [seen] = alice.target.requests
    assert (seen.method, seen.body) == (method, body or b"")


@pytest.mark.parametrize("form", FORMS)
async def test_head_keeps_content_length_and_sends_no_body(alice: Tunnel, form: str) -> None:
    port = alice.server.port
    target = alice.raw_target(form, "/sized")
    request = f"HEAD {target} HTTP/1.1\r\nHost: {alice.host(form)}\r\nConnection: close\r\n\r\n"
    reply, after = await raw_exchange(port, request.encode())
    assert reply.status == 200
    assert reply.header("Content-Length") == str(len(SIZED_BODY))
    assert reply.header("X-Target") == "alice"
    assert after == b""  # not one body byte after the head
    assert [r.method for r in alice.target.requests] == ["HEAD"]

    get = await raw_exchange(port, request.replace("HEAD", "GET", 1).encode())
    assert get[0].body == SIZED_BODY


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "query",
    [
        "?a=1&b=2&a=3",
        "?q=%20space+plus%2Bliteral&empty=&&flag",
        "?utf8=%C3%A9t%C3%A9&latin1=%E9&emoji=%F0%9F%98%80",
        "?odd=%zz%&semi;colon=1&slash=/a/b?c=d",
        "?" + "long=" + "x" * 4000,
        "?trailing=&",
        "?%3F=%26&%23=hash",
        "?",
    ],
    ids=["repeat", "encoded", "utf8", "odd", "long", "trailing-amp", "reserved", "empty"],
)
async def test_query_string_arrives_byte_exact(alice: Tunnel, form: str, query: str) -> None:
    path = "/query" + query
    reply, _ = await raw_through(alice, form, "GET", path)
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.raw_path == path


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "path",
    [
        "/a%2Fb/c",
        "/%41%42%43/%7euser/~user",
        "/sp%20ace/plus+sign/%25percent/%00nul",
        "/semi;p=1/comma,colon:/at@/excl!/dollar$/star*/quote'/paren()",
        "/UPPER/lower/MiXeD%2f%2F",
        "//double//slashes//",
        "/trailing/",
        "/%2e%2e-not-a-dot-segment/..suffix/.hidden",
    ],
)
async def test_path_arrives_byte_exact(alice: Tunnel, form: str, path: str) -> None:
    reply, _ = await raw_through(alice, form, "GET", path)
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.raw_path == path


ALL_BYTES = bytes(range(256)) * 16
ONE_MIB = random.Random(2).randbytes(1024 * 1024)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_all_byte_values_byte_exact_both_ways(
    alice: Tunnel, http: aiohttp.ClientSession, form: str, method: str
) -> None:
    headers = [("Content-Type", "application/octet-stream")]
    reply = await through(http, alice, form, method, "/bin", body=ALL_BYTES, headers=headers)
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.body == ALL_BYTES
    assert reply.body == ALL_BYTES


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_one_mib_request_body_reaches_the_target_byte_exact(
    alice: Tunnel, http: aiohttp.ClientSession, form: str, method: str
) -> None:
    headers = [("Content-Type", "application/octet-stream")]
    reply = await through(http, alice, form, method, "/digest", body=ONE_MIB, headers=headers)
    assert reply.status == 200
    assert reply.json() == {"length": len(ONE_MIB), "sha256": hashlib.sha256(ONE_MIB).hexdigest()}
    [seen] = alice.target.requests
    assert seen.body == ONE_MIB


@pytest.mark.parametrize("form", FORMS)
async def test_compressed_bodies_are_never_decoded(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    compressed = gzip.compress(b"a webhook payload " * 200, mtime=0)
    headers = [("Content-Encoding", "gzip"), ("Content-Type", "application/json")]
    await through(http, alice, form, "POST", "/bin", body=compressed, headers=headers)
    [seen] = alice.target.requests
    assert seen.body == compressed
    assert seen.header("Content-Encoding") == "gzip"

    reply = await through(http, alice, form, "GET", "/gzip", headers=[("Accept-Encoding", "gzip")])
    assert reply.header("Content-Encoding") == "gzip"
    assert reply.body == gzip.compress(b"compressed at the target " * 100, mtime=0)


@pytest.mark.parametrize("form", FORMS)
async def test_repeated_response_headers_keep_their_order(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    reply = await through(http, alice, form, "GET", "/cookies")
    assert reply.status == 200
    assert reply.getall("Set-Cookie") == list(SET_COOKIES)
    multi = [(k.lower(), v) for k, v in reply.headers if k.lower() in ("x-multi", "x-other")]
    assert multi == [("x-multi", "one"), ("x-other", "between"), ("x-multi", "two")]


@pytest.mark.parametrize("form", FORMS)
async def test_repeated_request_headers_keep_their_order(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    sent = [("X-Multi", "1"), ("Accept", "text/plain"), ("X-Multi", "2"), ("X-Multi", "3, with comma")]
    await through(http, alice, form, "GET", "/h", headers=sent)
    [seen] = alice.target.requests
    assert seen.getall("X-Multi") == ["1", "2", "3, with comma"]
    assert seen.getall("Accept") == ["text/plain"]


@pytest.mark.parametrize("form", FORMS)
async def test_hop_by_hop_request_headers_are_stripped(alice: Tunnel, form: str) -> None:
    request = (
        f"POST {alice.raw_target(form, '/hop-in')} HTTP/1.1\r\n"
        f"Host: {alice.host(form)}\r\n"
        "Connection: close, X-Drop-Me\r\n"
        "X-Drop-Me: secret\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "X-Keep-Me: yes\r\n"
        "Transfer-Encoding: chunked\r\n"
        "\r\n"
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ).encode()
    reply, _ = await raw_exchange(alice.server.port, request)
    assert reply.status == 200
    [seen] = alice.target.requests
    assert seen.body == b"hello world"
    names = {k.lower() for k, _ in seen.headers}
    for dropped in ("x-drop-me", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"):
        assert dropped not in names, f"{dropped} reached the target: {seen.headers}"
    assert "x-drop-me" not in (seen.header("Connection") or "").lower()
    assert seen.header("X-Keep-Me") == "yes"


@pytest.mark.parametrize("form", FORMS)
async def test_hop_by_hop_response_headers_are_stripped(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    reply = await through(http, alice, form, "GET", "/hop")
    assert reply.status == 200
    assert reply.body == b"hop"
    names = {k.lower() for k, _ in reply.headers}
    for dropped in ("x-hop-secret", "keep-alive", "proxy-authenticate", "proxy-foo", "trailer"):
        assert dropped not in names, f"{dropped} reached the client: {reply.headers}"
    assert "x-hop-secret" not in (reply.header("Connection") or "").lower()
    assert reply.header("X-End-To-End") == dict(HOP_RESPONSE_HEADERS)["X-End-To-End"]


@pytest.mark.parametrize("form", FORMS)
async def test_forwarded_headers_are_set_by_the_relay(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    forged = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Prefix", "/evil"),
        ("Forwarded", "for=6.6.6.6;proto=https"),
    ]
    await through(http, alice, form, "GET", "/fwd", headers=forged)
    [seen] = alice.target.requests
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [alice.host(form)]
    assert seen.getall("X-Forwarded-Prefix") == (["/t/alice"] if form == "path" else [])
    assert "6.6.6.6" not in " ".join(seen.getall("Forwarded"))


@pytest.mark.parametrize("form", FORMS)
async def test_host_is_rewritten_to_the_target(alice: Tunnel, http: aiohttp.ClientSession, form: str) -> None:
    await through(http, alice, form, "GET", "/host")
    [seen] = alice.target.requests
    assert seen.getall("Host") == [f"127.0.0.1:{alice.target.port}"]


@pytest.mark.parametrize("host", ["ALICE.LocalHost:{port}", "alice.localhost.:{port}", "alice.localhost"])
async def test_host_header_is_normalised_before_routing(
    alice: Tunnel, http: aiohttp.ClientSession, host: str
) -> None:
    reply = await fetch(http, "GET", alice.server.url("/norm"), host.format(port=alice.server.port))
    assert reply.status == 200
    assert reply.json()["target"] == "alice"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("status", [201, 204, 304, 400, 404, 418, 500, 502, 503, 504])
async def test_target_status_passes_through_without_relay_error(
    alice: Tunnel, http: aiohttp.ClientSession, form: str, status: int
) -> None:
    reply = await through(http, alice, form, "GET", f"/status/{status}")
    assert reply.status == status
    assert reply.relay_error is None  # the app's own status, not the relay's
    assert reply.header("X-Target") == "alice"
    assert reply.body == (b"" if status in (204, 304) else f"target says {status}".encode())


@pytest.mark.parametrize("form", FORMS)
async def test_redirects_are_passed_back_not_followed(
    alice: Tunnel, http: aiohttp.ClientSession, form: str
) -> None:
    reply = await through(http, alice, form, "GET", "/redirect")
    assert reply.status == 302
    assert reply.header("Location") == "/elsewhere?from=redirect"
    assert [r.raw_path for r in alice.target.requests] == ["/redirect"]


async def test_agent_prints_one_line_per_request(alice: Tunnel, http: aiohttp.ClientSession) -> None:
    await through(http, alice, "subdomain", "POST", "/logged/one?k=v", body=b"x")
    await through(http, alice, "path", "GET", "/status/404?logged=two")
    post = REQUEST_LINE.format(method="POST", path=re.escape("/logged/one?k=v"), status=200)
    get = REQUEST_LINE.format(method="GET", path=re.escape("/status/404?logged=two"), status=404)
    await alice.agent.process.line(post)
    await alice.agent.process.line(get)


async def test_200_concurrent_requests_through_one_agent(relay: Relay, http: aiohttp.ClientSession) -> None:
    # Live mode, on a stack of its own: in queue mode (the default) a POST that finds all
    # of the tunnel's delivery slots taken for 2 s is stored and answered 202, so how many
    # of 200 concurrent POSTs got 200 depended on the machine's speed. Live, every one is
    # forwarded at once and all 200 must come back 200 with their own bodies.
    tunnel = relay.tunnel(user="alice", agent_extra=["--mode", "live"])

    async def one(i: int) -> tuple[int, int, bytes, str]:
        form = FORMS[i % 2]
        body = f"request {i} ".encode() * (1 + i % 50) + bytes([i % 256]) * (i * 37 % 5000)
        reply = await through(http, tunnel, form, "POST", f"/bin?i={i}", body=body)
        return i, reply.status, reply.body, hashlib.sha256(body).hexdigest()

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert [status for _, status, _, _ in results] == [200] * 200
    for i, _, body, digest in results:
        assert hashlib.sha256(body).hexdigest() == digest, f"request {i} got another body"
    assert sorted(r.raw_path for r in tunnel.target.requests) == sorted(f"/bin?i={i}" for i in range(200))
    assert not any(r.header("X-Relay-Event-Id") for r in tunnel.target.requests)  # none was queued


# The response direction gets a stack of its own: a frame the server refuses drops the
# agent's connection, which would disturb the tests sharing the module's stack. 64 KiB is
# exactly one full DATA frame, the size aiohttp's exclusive max_msg_size once refused.
@pytest.mark.parametrize("size", [64 * 1024, 100_000, 1024 * 1024])
async def test_large_response_body_byte_exact(relay: Relay, http: aiohttp.ClientSession, size: int) -> None:
    tunnel = relay.tunnel(user="alice")
    body = ONE_MIB[:size]
    for form in FORMS:
        reply = await through(http, tunnel, form, "POST", "/bin", body=body)
        assert reply.status == 200
        assert len(reply.body) == size
        assert reply.body == body


@pytest.mark.parametrize(
    ("option", "expected"),
    [("preserve", "alice.localhost:{port}"), ("hooks.example.com", "hooks.example.com")],
)
async def test_host_header_option(
    relay: Relay, http: aiohttp.ClientSession, option: str, expected: str
) -> None:
    server, target = relay.server(), relay.target()
    agent = relay.agent(server, server.token("alice"), target.forward, extra=["--host-header", option])
    tunnel = Tunnel(server, target, agent, "alice", "")
    await through(http, tunnel, "subdomain", "GET", "/host")
    [seen] = target.requests
    assert seen.getall("Host") == [expected.format(port=server.port)]
