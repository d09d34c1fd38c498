"""HTTP fidelity against a real third-party application (httpbin, served by gunicorn):
each request is made directly and through the tunnel, and the two answers compared."""

from __future__ import annotations

import gzip
import http.client
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import brotlicffi
import pytest

from .framework import READY_TIMEOUT, Relay, RelayServer, free_port, wait_until

#: Headers that legitimately differ between two answers: the clock, the server
#: software of the hop that wrote the head, and hop-by-hop headers.
VOLATILE = {"date", "server", "connection", "keep-alive", "transfer-encoding"}


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def comparable_headers(self) -> list[tuple[str, str]]:
        return [(k.lower(), v) for k, v in self.headers if k.lower() not in VOLATILE]


@dataclass
class Httpbin:
    relay: Relay
    port: int

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "16",
            "--log-level",
            "warning",
            "httpbin:app",
        ]
        process = self.relay.spawn(argv, "gunicorn httpbin")
        wait_until(lambda: self._ready(process), READY_TIMEOUT, "httpbin to answer")

    def _ready(self, process: object) -> bool:
        try:
            return request(self.port, "GET", "/status/200", "127.0.0.1").status == 200
        except OSError:
            return False


def request(
    port: int,
    method: str,
    path: str,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None and "Transfer-Encoding" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, list(resp.getheaders()), data)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack(module_relay: Relay) -> Iterator[tuple[Httpbin, RelayServer]]:
    app = Httpbin(module_relay, free_port())
    app.start()
    server = module_relay.server()
    # preserve: httpbin builds absolute URLs from Host, as it would behind any proxy.
    module_relay.agent(server, server.token("bin"), f"127.0.0.1:{app.port}")
    yield app, server


def both(
    stack: tuple[Httpbin, RelayServer],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[Answer, Answer]:
    app, server = stack
    direct = request(app.port, method, path, f"127.0.0.1:{app.port}", headers, body)
    tunneled = request(server.port, method, f"/t/bin{path}", server.apex, headers, body)
    return direct, tunneled


# Deterministic endpoints whose whole answer must be identical through the tunnel.
SAME = [
    ("GET", "/status/200", {}),
    ("GET", "/status/201", {}),
    ("GET", "/status/204", {}),
    ("GET", "/status/304", {}),
    ("GET", "/status/404", {}),
    ("GET", "/status/418", {}),
    ("GET", "/status/500", {}),
    ("GET", "/status/503", {}),
    ("POST", "/status/201", {}),
    ("DELETE", "/status/202", {}),
    ("HEAD", "/status/200", {}),
    ("HEAD", "/bytes/4096?seed=3", {}),
    ("HEAD", "/html", {}),
    ("GET", "/redirect/3", {}),
    ("GET", "/relative-redirect/2", {}),
    ("GET", "/redirect-to?url=/get&status_code=307", {}),
    ("GET", "/redirect-to?url=https%3A%2F%2Fexample.org%2F&status_code=301", {}),
    ("GET", "/cookies/set?first=1&second=2", {}),
    ("GET", "/cookies/delete?first", {}),
    ("GET", "/response-headers?X-Repeat=one&X-Repeat=two&X-Repeat=three", {}),
    ("GET", "/encoding/utf8", {}),
    ("GET", "/html", {}),
    ("GET", "/json", {}),
    ("GET", "/xml", {}),
    ("GET", "/robots.txt", {}),
    ("GET", "/deny", {}),
    ("GET", "/image/png", {"Accept": "image/png"}),
    ("GET", "/image/jpeg", {"Accept": "image/jpeg"}),
    ("GET", "/image/svg", {"Accept": "image/svg+xml"}),
    ("GET", "/image/webp", {"Accept": "image/webp"}),
    ("GET", "/base64/SFRUUEJJTiBpcyBhd2Vzb21l", {}),
    ("GET", "/bytes/70000?seed=7", {}),
    ("GET", "/stream-bytes/200000?seed=9&chunk_size=1000", {}),
    ("GET", "/range/1024", {}),
    ("GET", "/range/1024", {"Range": "bytes=10-99"}),
    ("GET", "/range/1024", {"Range": "bytes=1000-"}),
    ("GET", "/range/1024", {"Range": "bytes=5000-6000"}),
    ("GET", "/etag/abc", {"If-None-Match": '"abc"'}),
    ("GET", "/etag/abc", {"If-Match": '"zzz"'}),
    ("GET", "/cache", {"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}),
    ("GET", "/cache", {"If-None-Match": "x"}),
    ("GET", "/links/5/2", {}),
    ("GET", "/basic-auth/user/pass", {}),
    ("GET", "/basic-auth/user/pass", {"Authorization": "Basic dXNlcjpwYXNz"}),
    ("GET", "/hidden-basic-auth/user/pass", {}),
    ("GET", "/bearer", {}),
    ("GET", "/bearer", {"Authorization": "Bearer xyz"}),
    ("GET", "/drip?duration=0.5&numbytes=5&code=200&delay=0", {}),
    ("GET", "/no-such-page", {}),
    ("GET", "/absolute-redirect/2", {}),
    ("OPTIONS", "/get", {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}),
    ("PUT", "/get", {}),
]


@pytest.mark.parametrize(("method", "path", "headers"), SAME, ids=[f"{m} {p} {h}" for m, p, h in SAME])
def test_the_same_answer_direct_and_through_the_tunnel(stack, method: str, path: str, headers: dict) -> None:
    direct, tunneled = both(stack, method, path, headers)
    assert tunneled.status == direct.status
    assert tunneled.comparable_headers() == direct.comparable_headers()
    assert tunneled.body == direct.body


# Endpoints that echo the request (headers, origin, URL), compressed or not: the echo
# differs by the hop's own headers, everything else must not.
REFLECTING = [
    ("GET", "/gzip", {"Accept-Encoding": "gzip"}),
    ("GET", "/deflate", {"Accept-Encoding": "deflate"}),
    ("GET", "/brotli", {"Accept-Encoding": "br"}),
    ("GET", "/etag/abc", {}),
    ("GET", "/cache/60", {}),
    ("GET", "/get?a=1&a=2&b=%C3%A9", {}),
]


def _decoded(answer: Answer) -> dict:
    encoding = dict((k.lower(), v) for k, v in answer.headers).get("content-encoding")
    body = answer.body
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    elif encoding == "br":
        body = brotlicffi.decompress(body)
    data = json.loads(body)
    for hop_dependent in ("headers", "origin", "url"):
        data.pop(hop_dependent, None)
    return data


@pytest.mark.parametrize(
    ("method", "path", "headers"), REFLECTING, ids=[f"{m} {p} {h}" for m, p, h in REFLECTING]
)
def test_the_same_echo_direct_and_through_the_tunnel(stack, method: str, path: str, headers: dict) -> None:
    direct, tunneled = both(stack, method, path, headers)
    assert tunneled.status == direct.status == 200
    without_length = [h for h in direct.comparable_headers() if h[0] != "content-length"]
    assert [h for h in tunneled.comparable_headers() if h[0] != "content-length"] == without_length
    assert _decoded(tunneled) == _decoded(direct)


def test_compressed_bodies_pass_untouched(stack) -> None:
    _, tunneled = both(stack, "GET", "/gzip", {"Accept-Encoding": "gzip"})
    assert dict((k.lower(), v) for k, v in tunneled.headers)["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(tunneled.body))["gzipped"] is True


def test_range_answers_206_with_exactly_the_range(stack) -> None:
    _, tunneled = both(stack, "GET", "/range/1024", {"Range": "bytes=10-99"})
    assert tunneled.status == 206
    assert len(tunneled.body) == 90


def test_conditional_request_answers_304_without_body(stack) -> None:
    _, tunneled = both(stack, "GET", "/etag/abc", {"If-None-Match": '"abc"'})
    assert tunneled.status == 304
    assert tunneled.body == b""


def test_redirects_are_passed_not_followed(stack) -> None:
    _, tunneled = both(stack, "GET", "/redirect/3")
    assert tunneled.status == 302
    assert dict(tunneled.headers)["Location"] == "/relative-redirect/2"


def _echo(answer: Answer) -> dict:
    """The parts of httpbin's request echo that do not depend on the hop (Host, X-Forwarded-*)."""
    data = json.loads(answer.body)
    return {k: data.get(k) for k in ("args", "data", "files", "form", "json", "method")}


MULTIPART = (
    b'--XyZ\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue \xc3\xa9\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="upload"; filename="a.bin"\r\n'
    b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * 1000 + b"\r\n--XyZ--\r\n"
)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("POST", "/post", {"Content-Type": "application/json"}, b'{"a": [1, 2, {"b": null}]}'),
        ("PUT", "/put", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=1&a=2&b=%20x"),
        ("PATCH", "/patch", {"Content-Type": "application/octet-stream"}, bytes(range(256)) * 64),
        ("DELETE", "/delete?x=1&y=%2F", {}, None),
        ("GET", "/anything/some/where?q=%E2%9C%93&q=2", {}, None),
        ("POST", "/post", {"Content-Type": "multipart/form-data; boundary=XyZ"}, MULTIPART),
        ("POST", "/post", {"Content-Type": "text/plain", "Expect": "100-continue"}, b"after continue"),
    ],
)
def test_requests_reach_the_application_unchanged(stack, method, path, headers, body) -> None:
    direct, tunneled = both(stack, method, path, headers, body)
    assert tunneled.status == direct.status == 200
    assert _echo(tunneled) == _echo(direct)


def test_a_chunked_request_with_trailers_reaches_the_application(stack) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n"
    headers = {"Transfer-Encoding": "chunked", "Content-Type": "text/plain"}
    direct, tunneled = both(stack, "POST", "/post", headers, body)
    assert tunneled.status == direct.status == 200
    assert json.loads(tunneled.body)["data"] == json.loads(direct.body)["data"] == "hello world"
