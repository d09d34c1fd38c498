"""The inspector's JSON API through aiohttp's test client on ``create_app``.

Replays go for real, through ``forward.forward`` and the agent's client session, to a
local service made for the test that records what it receives. The server's events API
behind the history calls is a fake ``api_client.call``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port

from relay_agent import api_client
from relay_agent.client import LocalClient
from relay_agent.config import AgentConfig
from relay_agent.forward import client_session
from relay_agent.inspector.address import InspectAddress
from relay_agent.inspector.app import create_app
from relay_agent.inspector.exchanges import MAX_REPLAY_REQUEST
from relay_agent.inspector.recorder import MAX_BODY, MAX_SUBSCRIBERS, Recorder
from relay_agent.inspector.state import Inspector
from relay_agent.target import Target
from relay_protocol import RequestHead, ResponseHead

TOKEN = "the-agents-secret-token"
OK = ResponseHead(200, ((b"Content-Type", b"text/plain"),))
WAIT = 5.0


class Service:
    """The tunnel, as far as a replay cares: a client session and a configuration."""

    def __init__(self, config: AgentConfig, client: aiohttp.ClientSession) -> None:
        self.config = config
        self.client = client
        self.local = LocalClient(config.target, config.forward_tls)


class Far:
    """The tunnel's end of a recorded stream: gives ``body``, takes the response."""

    def __init__(self, body: bytes = b"") -> None:
        self._body = body

    async def body(self) -> AsyncIterator[bytes]:
        if self._body:
            yield self._body

    def whole_body(self) -> bytes | None:
        return None

    async def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        pass

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        pass

    async def reset(self, code: int, reason: str) -> None:
        pass


class Stack:
    def __init__(
        self, client: TestClient, inspector: Inspector, seen: list[tuple[str, str, list[Any], bytes]]
    ):
        self.client = client
        self.inspector = inspector
        self.seen = seen  # what the local service received: method, path, headers, body
        self.host = f"127.0.0.1:{client.port}"

    async def record(
        self,
        method: str = "POST",
        target: bytes = b"/hook",
        headers: tuple[tuple[bytes, bytes], ...] = ((b"Content-Type", b"application/json"),),
        body: bytes = b'{"a": {"b": 1}}',
        response: ResponseHead | None = OK,
        answer: bytes = b"ok",
        event_id: str = "",
    ) -> int:
        """A finished exchange, recorded as the tunnel records one; its id."""
        link = self.inspector.recorder.record(
            RequestHead(method, target, headers, "203.0.113.9", event_id), bool(body), Far(body)
        )
        _ = [chunk async for chunk in link.body()]
        if response is not None:
            await link.respond(response, end=False)
            await link.send_body(answer, end=True)
        link.finish(response.status if response else 502, "" if response else "connection refused")
        return link.exchange.id

    async def call(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        if method == "POST":
            headers.setdefault("Content-Type", "application/json")  # as the page sends it
        async with self.client.request(method, path, data=data, headers=headers) as response:
            raw = await response.read()
            return response.status, json.loads(raw) if response.content_type == "application/json" else raw

    async def until_seen(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.seen) < count:
                await asyncio.sleep(0.01)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    seen: list[tuple[str, str, list[Any], bytes]] = []

    async def local(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, [list(h) for h in request.raw_headers], body))
        return web.Response(text=f"got {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", local)
    target = TestServer(app)
    await target.start_server()
    config = AgentConfig(
        server="http://relay.test",
        token=TOKEN,
        target=Target("http", "127.0.0.1", target.port),
        names=("alice",),
    )
    async with client_session(config) as session:
        inspector = Inspector(Recorder(), Service(config, session))
        port = unused_port()
        client = TestClient(TestServer(create_app(inspector, InspectAddress("127.0.0.1", port)), port=port))
        await client.start_server()
        try:
            yield Stack(client, inspector, seen)
        finally:
            await inspector.background.stop()
            await client.close()
    await target.close()


# -- who may ask --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Host": "localhost:{port}"}, 200),
        ({"Origin": "http://127.0.0.1:{port}"}, 200),
        ({"Origin": "http://localhost:{port}"}, 200),
        ({"Host": "evil.example:{port}"}, 403),  # DNS rebinding: a name that points here
        ({"Host": "127.0.0.1:1"}, 403),
        ({"Host": "localhost.evil.example:{port}"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "https://127.0.0.1:{port}"}, 403),
        ({"Sec-Fetch-Site": "same-origin"}, 200),
        ({"Sec-Fetch-Site": "none"}, 200),  # typed in the address bar
        ({"Sec-Fetch-Site": "cross-site"}, 403),  # a browser without Origin on a GET
        ({"Sec-Fetch-Site": "same-site"}, 403),  # another port or subdomain of the same site
    ],
)
async def test_only_the_inspectors_own_host_and_origin_are_answered(
    stack: Stack, headers: dict[str, str], status: int
) -> None:
    headers = {k: v.format(port=stack.client.port) for k, v in headers.items()}
    for method, path in (("GET", "/api/status"), ("GET", "/"), ("POST", "/api/exchanges/1/replay")):
        answered, answer = await stack.call(method, path, **headers)
        if status == 403:
            assert (answered, answer["error"]) == (403, "forbidden"), (method, path)
        else:
            assert answered != 403, (method, path)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"],
)
async def test_a_post_that_is_not_json_is_refused_before_it_acts(
    stack: Stack, server: FakeServer, content_type: str | None
) -> None:
    """What a cross-site form (or a fetch without a preflight) can send: nothing is replayed."""
    original = await stack.record()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in (f"/api/exchanges/{original}/replay", "/api/server/events/evt_1/replay"):
        async with stack.client.post(
            path, data=b"{}", headers=headers, skip_auto_headers={"Content-Type"}
        ) as response:
            answer = await response.json()
            assert (response.status, answer["error"]) == (415, "unsupported-media-type"), path
    assert len(stack.inspector.recorder.newest_first()) == 1  # no replay started
    assert stack.seen == [] and server.calls == []


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(stack: Stack) -> None:
    async with stack.client.get("/") as response:
        page = await response.text()
        assert response.status == 200
        policy = response.headers["Content-Security-Policy"]
    assert '<script src="/static/app.js"' in page
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    for asset in ("/static/app.js", "/static/style.css"):
        async with stack.client.get(asset) as response:
            assert response.status == 200, asset
    async with stack.client.get("/static/../state.py") as response:
        assert response.status in (403, 404)


async def test_status_never_shows_the_token(stack: Stack) -> None:
    async with stack.client.get("/api/status") as response:
        raw = await response.text()
    status = json.loads(raw)
    assert TOKEN not in raw
    assert status["names"] == ["alice"] and status["server"] == "http://relay.test"
    assert status["limits"] == {"exchanges": 500, "body": MAX_BODY}


async def test_edits_nested_too_deeply_are_a_400(stack: Stack) -> None:
    original = await stack.record()
    status, answer = await stack.call(
        "POST", f"/api/exchanges/{original}/replay", b"[" * 200_000 + b"]" * 200_000
    )
    assert (status, answer["error"]) == (400, "bad-request") and stack.seen == []


async def test_a_body_let_go_for_the_budget_is_gone_not_empty(stack: Stack) -> None:
    stack.inspector.recorder.max_kept = 20  # two bodies of 15 and 2 bytes do not fit twice
    first = await stack.record()
    await stack.record()
    status, shown = await stack.call("GET", f"/api/exchanges/{first}")
    assert status == 200
    assert shown["request"]["body"] == {"kind": "dropped", "size": 15, "shown": 0, "dropped": True}
    assert shown["response"]["body"]["kind"] == "dropped" and shown["replayable"] is False
    for side in ("request", "response"):
        status, answer = await stack.call("GET", f"/api/exchanges/{first}/{side}/body")
        assert (status, answer["error"]) == (410, "gone"), side


async def test_an_unknown_call_is_a_json_404(stack: Stack) -> None:
    await stack.record()  # exchange 1: full-width and superscript digits are not its id
    for path in (
        "/api/nothing",
        "/api/exchanges/999",
        "/api/exchanges/abc",
        "/api/exchanges/-1/curl",
        "/api/exchanges/\uff11",
        "/api/exchanges/\u00b9",
        "/api/exchanges/\u00b2/request/body",
        "/static/..%5capp.py",
        "/static/nothing.js",
        "/static/",
    ):
        status, answer = await stack.call("GET", path)
        assert status == 404 and answer["error"] == "not-found", path


# -- exchanges ---------------------------------------------------------------------------------


async def test_the_list_is_newest_first_and_the_detail_has_everything(stack: Stack) -> None:
    first = await stack.record()
    second = await stack.record(
        "GET", b"/page?x=1", ((b"X-Relay-Event-Id", b"evt_9"), (b"X-Relay-Attempt", b"2")), b"", answer=b"<p>"
    )
    status, listed = await stack.call("GET", "/api/exchanges")
    assert status == 200
    assert [e["id"] for e in listed["exchanges"]] == [second, first]
    assert listed["exchanges"][0]["attempt"] == 2
    status, shown = await stack.call("GET", f"/api/exchanges/{first}")
    assert status == 200
    assert shown["request"]["headers"] == [["Content-Type", "application/json"]]
    assert shown["request"]["body"]["kind"] == "json" and shown["request"]["body"]["tree"] == [
        "object",
        [["a", ["object", [["b", ["number", "1"]]]]]],
    ]
    assert shown["response"]["status"] == 200 and shown["response"]["body"]["text"] == "ok"
    assert shown["client"] == "203.0.113.9" and shown["replayable"] is True
    assert shown["timing"]["duration_ms"] is not None


async def test_a_failed_exchange_has_no_response_and_says_why(stack: Stack) -> None:
    failed = await stack.record(response=None)
    _, shown = await stack.call("GET", f"/api/exchanges/{failed}")
    assert (shown["status"], shown["error"], shown["response"]) == (502, "connection refused", None)


async def test_the_stream_pushes_exchanges_as_they_happen(stack: Stack) -> None:
    async with stack.client.get("/api/exchanges/stream") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert (await response.content.readuntil(b"\n\n")).startswith(b":")  # the stream is open
        exchange = await stack.record()
        events = []
        async with asyncio.timeout(WAIT):
            while len(events) < 2:
                block = (await response.content.readuntil(b"\n\n")).decode()
                if block.startswith("event: exchange"):
                    events.append(json.loads(block.split("data: ", 1)[1]))
    assert [e["id"] for e in events] == [exchange, exchange]
    assert events[-1]["status"] == 200


async def test_pages_following_the_list_are_capped(stack: Stack) -> None:
    # Found by an attacker: 5,000 open streams made every forwarded request cost seconds.
    streams = [await stack.client.get("/api/exchanges/stream") for _ in range(MAX_SUBSCRIBERS)]
    try:
        assert {s.status for s in streams} == {200}
        status, answer = await stack.call("GET", "/api/exchanges/stream")
        assert (status, answer["error"]) == (503, "too-many-pages")
        streams.pop().close()
        async with asyncio.timeout(WAIT):
            while len(stack.inspector.recorder._subscribers) == MAX_SUBSCRIBERS:  # its writer notices
                await stack.record()
                await asyncio.sleep(0.01)
        async with stack.client.get("/api/exchanges/stream") as response:
            assert response.status == 200
    finally:
        for stream in streams:
            stream.close()


async def test_raw_bodies_are_never_served_as_a_page(stack: Stack) -> None:
    html = await stack.record(
        headers=((b"Content-Type", b"text/html"),), body=b"<script>alert(1)</script>", response=None
    )
    png = await stack.record(
        headers=((b"Content-Type", b"image/png"),), body=b"\x89PNG\r\n\x1a\n", response=None
    )
    async with stack.client.get(f"/api/exchanges/{html}/request/body") as response:
        assert response.content_type == "application/octet-stream"
        assert response.headers["Content-Disposition"].startswith("attachment")
        assert "sandbox" in response.headers["Content-Security-Policy"]
        assert await response.read() == b"<script>alert(1)</script>"
    async with stack.client.get(f"/api/exchanges/{png}/request/body") as response:
        assert response.content_type == "image/png"
        assert await response.read() == b"\x89PNG\r\n\x1a\n"
    async with stack.client.get(f"/api/exchanges/{png}/response/body") as response:
        assert response.status == 200 and await response.read() == b""


async def test_curl_for_an_exchange_and_not_for_a_cut_one(stack: Stack) -> None:
    exchange = await stack.record()
    status, answer = await stack.call("GET", f"/api/exchanges/{exchange}/curl")
    assert status == 200
    port = stack.inspector.service.config.target.port
    assert answer["command"].startswith(
        f"curl --http1.1 --globoff -X POST --request-target /hook http://127.0.0.1:{port} "
    )
    assert f"-H 'Host: 127.0.0.1:{port}'" in answer["command"]  # as forwarded: --host-header rewrite
    big = await stack.record(body=b"x" * (MAX_BODY + 1))
    status, answer = await stack.call("GET", f"/api/exchanges/{big}/curl")
    assert (status, answer["error"]) == (409, "conflict")
    assert f"its body of {MAX_BODY + 1} bytes was not kept whole" in answer["message"]


# -- replay ------------------------------------------------------------------------------------


async def test_a_replay_reaches_the_local_service_and_is_a_new_exchange(stack: Stack) -> None:
    original = await stack.record(headers=((b"Content-Type", b"application/json"), (b"X-Latin", b"caf\xe9")))
    status, answer = await stack.call("POST", f"/api/exchanges/{original}/replay", {})
    assert status == 202
    replay = answer["exchange"]
    assert replay["replay_of"] == original and replay["id"] != original
    await stack.until_seen(1)
    method, path, headers, body = stack.seen[0]
    assert (method, path, body) == ("POST", "/hook", b'{"a": {"b": 1}}')
    assert ["X-Latin", "caf\xe9"] in [
        [k.decode("latin-1"), v.decode("latin-1")] for k, v in map(tuple, headers)
    ]
    async with asyncio.timeout(WAIT):
        while (shown := (await stack.call("GET", f"/api/exchanges/{replay['id']}"))[1])["status"] is None:
            await asyncio.sleep(0.01)
    assert shown["status"] == 200 and shown["response"]["body"]["text"] == "got 15"


async def test_an_edited_replay_sends_the_edits_and_a_right_content_length(stack: Stack) -> None:
    original = await stack.record(
        headers=((b"Content-Type", b"application/json"), (b"Content-Length", b"15"))
    )
    edits = {
        "method": "PUT",
        "target": "/other?q=caf%C3%A9",
        "headers": [["Content-Type", "text/plain"], ["Content-Length", "15"], ["X-New", "yes"]],
        "body": "edited body, longer than before",
    }
    status, _ = await stack.call("POST", f"/api/exchanges/{original}/replay", edits)
    assert status == 202
    await stack.until_seen(1)
    method, path, headers, body = stack.seen[0]
    assert (method, path, body) == ("PUT", "/other?q=caf%C3%A9", b"edited body, longer than before")
    sent = {k.decode(): v.decode() for k, v in map(tuple, headers)}
    assert sent["Content-Length"] == str(len(body)) and sent["X-New"] == "yes"
    status, _ = await stack.call("POST", f"/api/exchanges/{original}/replay", {"body_base64": "AAEC/w=="})
    assert status == 202
    await stack.until_seen(2)
    assert stack.seen[1][3] == b"\x00\x01\x02\xff"


async def test_an_edited_replay_is_framed_by_the_body_it_sends(stack: Stack) -> None:
    # A Content-Length shorter than the body would make the local service read the rest
    # as a second request: the edits' framing headers never go out.
    original = await stack.record(headers=((b"Content-Type", b"text/plain"),))
    smuggled = "abcGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    edits = {"headers": [["Content-Length", "3"], ["Content-Type", "text/plain"]], "body": smuggled}
    status, answer = await stack.call("POST", f"/api/exchanges/{original}/replay", edits)
    assert status == 202
    assert answer["exchange"]["request_size"] == len(smuggled)  # what is sent, not 0
    await stack.until_seen(1)
    _, path, headers, body = stack.seen[0]
    assert (path, body) == ("/hook", smuggled.encode())
    assert [v for k, v in map(tuple, headers) if k.lower() == b"content-length"] == [b"%d" % len(body)]
    edits = {"headers": [["Transfer-Encoding", "chunked"], ["Content-Length", "99"]], "body": "hello"}
    status, _ = await stack.call("POST", f"/api/exchanges/{original}/replay", edits)
    assert status == 202
    await stack.until_seen(2)
    sent = {k.decode().lower(): v for k, v in map(tuple, stack.seen[1][2])}
    assert (sent.get("content-length"), "transfer-encoding" in sent) == (b"5", False)
    assert stack.seen[1][3] == b"hello"


async def test_an_edited_replay_without_the_event_header_is_no_longer_that_event(stack: Stack) -> None:
    headers = ((b"Content-Type", b"application/json"), (b"X-Relay-Event-Id", b"evt_7"))
    original = await stack.record(headers=headers, event_id="evt_7")
    status, answer = await stack.call("POST", f"/api/exchanges/{original}/replay", {})
    assert (status, answer["exchange"]["event_id"]) == (202, "evt_7")
    edits = {"headers": [["Content-Type", "application/json"]]}
    status, answer = await stack.call("POST", f"/api/exchanges/{original}/replay", edits)
    assert (status, answer["exchange"]["event_id"]) == (202, None)


@pytest.mark.parametrize(
    ("edits", "status", "words"),
    [
        (b"not json", 400, "not JSON"),
        ([1, 2], 400, "JSON object"),
        ({"verb": "PUT"}, 400, "unknown fields verb"),
        ({"method": 5}, 400, "method must be a string"),
        ({"method": "GE T"}, 400, "invalid method"),
        ({"target": "no-slash"}, 400, "origin-form"),
        ({"headers": {"A": "b"}}, 400, "list of [name, value]"),
        ({"headers": [["Bad Name", "x"]]}, 400, "'Bad Name' is not a token"),
        ({"headers": [["X-\u00e9", "x"]]}, 400, "'X-\u00e9' is not a token"),
        ({"headers": [["X-\ud800", "x"]]}, 400, "is not a token"),  # a lone surrogate
        ({"headers": [["X-Split", "a\r\nInjected: yes"]]}, 400, "X-Split may hold no control character"),
        ({"headers": [["X-Nul", "a\x00"]]}, 400, "X-Nul may hold no control character"),
        ({"headers": [["X-Bell", "a\x07b"]]}, 400, "control character"),
        ({"method": "CONNECT"}, 400, "never forwards CONNECT"),
        ({"method": "trace"}, 400, "never forwards TRACE"),
        ({"headers": [["X-Del", "a\x7fb"]]}, 400, "control character"),
        (
            {"method": "GET", "headers": [["Upgrade", "websocket"], ["Connection", "Upgrade"]]},
            400,
            "upgrade",
        ),
        ({"headers": [["Connection", "close, Content-Length"]], "body": "x"}, 400, "Connection"),
        ({"headers": [["Connection", "transfer-encoding"]]}, 400, "Connection"),
        ({"body": "a", "body_base64": "YQ=="}, 400, "not both"),
        ({"body_base64": "***"}, 400, "not base64"),
        ({"target": "/edited?q=\u00e9"}, 400, "printable ASCII without spaces"),
        ({"target": "/a b"}, 400, "printable ASCII without spaces"),
        ({"body": "x" * (MAX_BODY + 1)}, 413, "over the limit"),
    ],
)
async def test_bad_edits_are_refused_with_a_reason(stack: Stack, edits: Any, status: int, words: str) -> None:
    original = await stack.record()
    answered, answer = await stack.call("POST", f"/api/exchanges/{original}/replay", edits)
    assert (answered, answer["error"]) == (status, {400: "bad-request", 413: "body-too-large"}[status])
    assert words in answer["message"]
    assert stack.seen == []


async def test_a_cut_body_or_a_websocket_cannot_be_replayed_as_it_was(stack: Stack) -> None:
    big = await stack.record(body=b"x" * (MAX_BODY + 1))
    status, answer = await stack.call("POST", f"/api/exchanges/{big}/replay", {})
    assert (status, answer["error"]) == (409, "conflict")
    status, _ = await stack.call("POST", f"/api/exchanges/{big}/replay", {"body": "a new one"})
    assert status == 202  # with a body of its own it can
    upgrade = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
    socket_exchange = await stack.record("GET", b"/ws", upgrade, b"")
    status, answer = await stack.call("POST", f"/api/exchanges/{socket_exchange}/replay", {})
    assert (status, answer["message"]) == (409, "a websocket cannot be replayed")


async def test_a_body_of_a_mebibyte_as_escaped_json_is_read(stack: Stack) -> None:
    # Found by a newcomer: 512 KiB of "é" sent as \u00e9 (3 MiB of JSON) was refused 413.
    original = await stack.record()
    status, _ = await stack.call(
        "POST", f"/api/exchanges/{original}/replay", {"body": "\u00e9" * (MAX_BODY // 2)}
    )
    assert status == 202
    await stack.until_seen(1)
    assert stack.seen[0][3] == "\u00e9".encode() * (MAX_BODY // 2)


async def test_an_oversized_replay_request_is_413(stack: Stack) -> None:
    original = await stack.record()
    status, answer = await stack.call(
        "POST", f"/api/exchanges/{original}/replay", b"{" + b" " * MAX_REPLAY_REQUEST + b"}"
    )
    assert (status, answer["error"]) == (413, "body-too-large")  # as an edited body's 413


# -- the server's history ----------------------------------------------------------------------


class FakeServer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.fail: api_client.ApiError | None = None
        self.event_body = '{"deep": {"er": [1]}}'

    def call(self, server: str, token: str, method: str, path: str, body: Any = None, tls: Any = None) -> Any:
        self.calls.append((token, method, path))
        if self.fail is not None:
            raise self.fail
        if path.startswith("events?"):
            return {"events": [{"id": "evt_1"}], "next": "41"}
        if method == "POST":
            return {"event": "evt_1", "replayed": ["agent:*"]}
        body_text = self.event_body
        return {
            "id": "evt_1",
            "headers": [["Content-Type", "application/json"]],
            "body": body_text,
            "body_encoding": "utf-8",
        }


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(api_client, "call", fake.call)
    return fake


async def test_the_history_goes_to_the_server_with_the_agents_token(stack: Stack, server: FakeServer) -> None:
    status, page = await stack.call("GET", "/api/server/events?name=alice&status=dead&before=42")
    assert (status, page) == (200, {"events": [{"id": "evt_1"}], "next": "41"})
    assert server.calls == [(TOKEN, "GET", "events?limit=50&name=alice&status=dead&before=42")]
    status, event = await stack.call("GET", "/api/server/events/evt_1")
    assert status == 200
    assert event["body_view"]["kind"] == "json" and event["body_view"]["tree"] == [
        "object",
        [["deep", ["object", [["er", ["array", [["number", "1"]]]]]]]],
    ]
    status, answer = await stack.call("POST", "/api/server/events/evt_1/replay")
    assert (status, answer["replayed"]) == (202, ["agent:*"])
    assert server.calls[-1] == (TOKEN, "POST", "events/evt_1/replay")


@pytest.mark.parametrize(
    "path",
    [
        "/api/server/events?name=bob",
        "/api/server/events?status=lost",
        "/api/server/events/evt_1%2F..%2Ftunnels",
    ],
)
async def test_bad_history_queries_never_reach_the_server(
    stack: Stack, server: FakeServer, path: str
) -> None:
    status, answer = await stack.call("GET", path)
    assert (status, answer["error"]) in ((400, "bad-request"), (404, "not-found"))
    assert server.calls == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (api_client.ApiError("404: you have no event 'evt_x'", 404), 404),
        (api_client.ApiError("409: an attempt is in flight", 409), 409),
        (api_client.ApiError("401: token revoked", 401), 502),
        (api_client.ApiError("503: store unavailable", 503), 502),
        (api_client.ApiError("cannot reach http://relay.test/_relay/api/events: refused"), 502),
    ],
)
async def test_the_servers_refusals_come_back_and_its_failures_are_502(
    stack: Stack, server: FakeServer, error: api_client.ApiError, status: int
) -> None:
    server.fail = error
    answered, answer = await stack.call("POST", "/api/server/events/evt_x/replay")
    assert answered == status
    assert str(error) in answer["message"]
    assert TOKEN not in json.dumps(answer)


def _strict(raw: bytes) -> Any:
    """``raw`` parsed as the page's parser does: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=refuse)


async def test_a_number_too_large_for_a_float_is_strict_json_shown_as_written(
    stack: Stack, server: FakeServer
) -> None:
    body = b'{"a": 1e400, "b": -1e400}'
    exchange = await stack.record(body=body)
    async with stack.client.get(f"/api/exchanges/{exchange}") as response:
        shown = _strict(await response.read())
    assert shown["request"]["body"]["tree"] == [
        "object",
        [["a", ["number", "1e400"]], ["b", ["number", "-1e400"]]],
    ]
    server.event_body = body.decode()
    async with stack.client.get("/api/server/events/evt_1") as response:
        event = _strict(await response.read())
    assert event["body_view"]["tree"][1][0] == ["a", ["number", "1e400"]]


async def test_a_stored_body_larger_than_the_recorders_is_shown_by_its_start(
    stack: Stack, server: FakeServer
) -> None:
    # The server keeps up to 10 MiB of an event; the view renders what an exchange's
    # would, the first MAX_BODY bytes, and says the rest was not shown.
    server.event_body = "x" * (MAX_BODY + 1)
    status, event = await stack.call("GET", "/api/server/events/evt_1")
    view = event["body_view"]
    assert status == 200
    assert (view["kind"], view["size"], view["truncated"], len(view["text"])) == (
        "text",
        MAX_BODY + 1,
        True,
        MAX_BODY,
    )


# -- what strangers on the machine can make it log -----------------------------------------------


async def _raw(stack: Stack, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.client.port)
    writer.write(request)
    return reader, writer


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/status HTTP/1.1\r\n\r\n",
        b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
        b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\x01\r\n\r\n",
    ],
)
async def test_a_malformed_request_is_a_400_without_a_traceback(
    stack: Stack, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an attacker: each one wrote a ten-line traceback on the agent's console.
    with caplog.at_level(logging.INFO):
        reader, writer = await _raw(stack, request_bytes)
        answer = await reader.read(200)
        writer.close()
    assert answer.split(b" ")[1] == b"400", answer
    assert _errors(caplog) == []
