"""The server application through aiohttp's test client: public ingress and the agent endpoint.

The agent here is driven by hand: the test holds the websocket and a
``relay_protocol.Connection(Role.AGENT)``, so each frame the server sends is
checked and each answer is chosen by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from relay_protocol import (
    PROTOCOL_VERSION,
    Connection,
    Data,
    Frame,
    Hello,
    Open,
    Ping,
    Reset,
    Response,
    ResponseHead,
    Role,
    Welcome,
    encode,
)
from relay_protocol.frames import RESET_TARGET_TIMEOUT, RESET_TARGET_UNREACHABLE
from relay_server import agent_endpoint, tokens
from relay_server.app import REGISTRY, STORE, create_app
from relay_server.config import ServerConfig
from relay_server.store import Store

PUBLIC_URL = "http://relay.test"
#: Seconds any single wait in these tests may take before the test fails instead of hanging.
WAIT = 5.0


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    app = create_app(ServerConfig(data_dir=tmp_path, public_url=PUBLIC_URL))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _store(client: TestClient) -> Store:
    return client.app[STORE]


def _token(client: TestClient, tmp_path: Path, user: str, names: list[str], ttl: int = 3600) -> str:
    """A token the server accepts: signed with its secret and recorded in its store."""
    token, claims = tokens.issue(tokens.load_secret(tmp_path), user, names, ttl)
    _store(client).record_token(claims)
    return token


async def _connect(client: TestClient, token: str | None) -> ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await client.ws_connect("/_relay/agent", headers=headers, autoping=True)


async def _closed_with(ws: ClientWebSocketResponse) -> tuple[int, str]:
    msg = await ws.receive(timeout=WAIT)
    assert msg.type is WSMsgType.CLOSE, msg
    return msg.data, msg.extra


async def _next_frame(ws: ClientWebSocketResponse, conn: Connection) -> Frame:
    """The next frame the server sends, heartbeat PINGs skipped."""
    while True:
        msg = await ws.receive(timeout=WAIT)
        assert msg.type is WSMsgType.BINARY, msg
        frame = conn.receive(msg.data)
        if frame is not None and not isinstance(frame, Ping):
            return frame


class Agent:
    """A hand-driven agent: a websocket and the protocol state of its side."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.conn = Connection(Role.AGENT)

    async def hello(self, *names: str, version: int = PROTOCOL_VERSION) -> None:
        tunnels = tuple({"name": n} for n in names)
        await self.ws.send_bytes(self.conn.send(Hello(version, tunnels, "test")))

    async def receive(self) -> Frame:
        return await _next_frame(self.ws, self.conn)

    async def send(self, frame: Response | Data | Reset) -> None:
        await self.ws.send_bytes(self.conn.send(frame))


async def _agent(client: TestClient, tmp_path: Path, *names: str) -> Agent:
    """An agent of user alice, connected and welcomed for ``names``."""
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello(*names)
    welcome = await agent.receive()
    assert isinstance(welcome, Welcome)
    return agent


# -- public side without agents ----------------------------------------------------


async def test_healthz(client: TestClient) -> None:
    for host in ("relay.test", "relay.test:8000", "127.0.0.1"):
        async with client.get("/healthz", headers={"Host": host}) as resp:
            assert resp.status == 200
            assert await resp.text() == "ok\n"
            assert "X-Relay-Error" not in resp.headers


async def test_healthz_on_a_tunnel_host_belongs_to_the_tunnel(client: TestClient) -> None:
    async with client.get("/healthz", headers={"Host": "alice.relay.test"}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Relay-Error"] == "unknown-tunnel"


async def test_unknown_apex_page_is_not_found(client: TestClient) -> None:
    async with client.get("/nothing-here", headers={"Host": "relay.test"}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Relay-Error"] == "not-found"


@pytest.mark.parametrize(
    ("path", "host"),
    [
        ("/t/nobody", "relay.test"),
        ("/t/nobody/hook?x=1", "relay.test"),
        ("/hook", "nobody.relay.test"),
        ("/hook", "NOBODY.relay.test.:80"),
        ("/t/Not_A_Name/", "relay.test"),
    ],
)
async def test_unknown_tunnel_is_404(client: TestClient, path: str, host: str) -> None:
    async with client.get(path, headers={"Host": host}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Relay-Error"] == "unknown-tunnel"
        assert "no tunnel is named" in await resp.text()


async def test_claimed_name_without_agent_is_503(client: TestClient) -> None:
    _store(client).claim_name("carol", "carol")
    for path, host in (("/hook", "carol.relay.test"), ("/t/carol/hook", "relay.test")):
        async with client.get(path, headers={"Host": host}) as resp:
            assert resp.status == 503
            assert resp.headers["X-Relay-Error"] == "tunnel-offline"
            assert "no agent is connected for 'carol'" in await resp.text()


async def test_a_webhook_without_agent_is_queued(client: TestClient) -> None:
    _store(client).claim_name("carol", "carol")
    for path, host in (("/hook", "carol.relay.test"), ("/t/carol/hook", "relay.test")):
        async with client.post(path, headers={"Host": host}, data=b"{}") as resp:
            assert resp.status == 202
            answer = await resp.json()
            assert answer["queued"] is True
            assert resp.headers["X-Relay-Event"] == answer["event"]


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
async def test_connect_and_trace_are_refused(client: TestClient, method: str) -> None:
    _store(client).claim_name("alice", "alice")
    async with client.request(method, "/t/alice/", headers={"Host": "alice.relay.test"}) as resp:
        assert resp.status == 405
        assert resp.headers["X-Relay-Error"] == "method-not-allowed"


async def _raw_request(client: TestClient, request: bytes) -> bytes:
    """Send ``request`` byte for byte (no client-side URL normalisation); the response head."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "target",
    [b"/t/alice/../bob/hook", b"/t/alice/%2e%2e/bob", b"/t/alice/%2E%2e/bob", b"/t/alice/x/../../bob"],
)
async def test_dot_segments_leaving_a_tunnel_are_400(client: TestClient, target: bytes) -> None:
    head = await _raw_request(client, b"GET " + target + b" HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nX-Relay-Error: bad-request\r\n" in head


async def test_absolute_form_target_is_400(client: TestClient) -> None:
    # aiohttp would route by the URL's host; the relay must not let it pick a tunnel.
    head = await _raw_request(client, b"GET http://alice.relay.test/ HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nX-Relay-Error: bad-request\r\n" in head


async def test_agent_endpoint_without_upgrade_is_400(client: TestClient) -> None:
    async with client.get("/_relay/agent", headers={"Host": "relay.test"}) as resp:
        assert resp.status == 400
        assert resp.headers["X-Relay-Error"] == "bad-request"
        assert "websocket upgrade" in await resp.text()


# -- agent endpoint: refusals --------------------------------------------------------


async def test_agent_without_token_is_closed_4001(client: TestClient) -> None:
    ws = await _connect(client, None)
    assert await _closed_with(ws) == (4001, "missing Authorization header")


async def test_agent_with_bad_token_is_closed_4001(client: TestClient) -> None:
    ws = await _connect(client, "not-a-token")
    assert await _closed_with(ws) == (4001, "token malformed")


async def test_agent_with_foreign_token_is_closed_4001(client: TestClient) -> None:
    token, _ = tokens.issue(b"k" * 64, "alice", ["alice"], 3600)
    ws = await _connect(client, token)
    code, reason = await _closed_with(ws)
    assert code == 4001
    assert "signature invalid" in reason


async def test_agent_with_expired_token_is_closed_4001(client: TestClient, tmp_path: Path) -> None:
    ws = await _connect(client, _token(client, tmp_path, "alice", ["alice"], ttl=-60))
    assert await _closed_with(ws) == (4001, "token expired")


async def test_agents_over_the_users_cap_are_closed_4029_even_before_their_hello(tmp_path: Path) -> None:
    # Counted from authentication, not from the WELCOME: connections that have not said
    # HELLO yet hold their places, so a burst of them cannot pass the cap together. The
    # places come back when they go, and another user has places of its own.
    config = ServerConfig(data_dir=tmp_path, public_url=PUBLIC_URL, max_agents_per_user=2)
    async with TestClient(TestServer(create_app(config))) as client:
        alice = _token(client, tmp_path, "alice", ["alice"])
        silent = [await _connect(client, alice) for _ in range(2)]  # no HELLO: in the handshake
        over = await _connect(client, alice)
        assert await _closed_with(over) == (4029, "too many agents: 2 connected for this user")
        bob = await _connect(client, _token(client, tmp_path, "bob", ["bob"]))
        conn = Connection(Role.AGENT)
        await bob.send_bytes(conn.send(Hello(PROTOCOL_VERSION, ({"name": "bob"},), "test")))
        assert isinstance(await _next_frame(bob, conn), Welcome)
        await silent[0].close()
        deadline = time.monotonic() + WAIT  # the server gives the place back as its handler ends
        while True:
            again = await _connect(client, alice)
            await again.send_bytes(Connection(Role.AGENT).send(Hello(PROTOCOL_VERSION, ({"name": "alice"},))))
            msg = await again.receive(timeout=WAIT)
            if msg.type is WSMsgType.BINARY or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert msg.type is WSMsgType.BINARY, msg  # its WELCOME: it took the place given back
        for ws in (silent[1], again, bob):
            await ws.close()


async def test_a_websocket_ping_before_hello_ends_the_handshake(client: TestClient, tmp_path: Path) -> None:
    # aiohttp answered websocket pings itself, and each restarted the 10 s wait for
    # HELLO: pinging held a place under the user's cap for ever (found by a review).
    ws = await _connect(client, _token(client, tmp_path, "alice", ["alice"]))
    await ws.ping(b"x")
    assert await _closed_with(ws) == (1002, "bad handshake: expected a binary HELLO frame")


async def test_an_agent_silent_after_the_upgrade_is_told_why_it_is_closed(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reason read "bad handshake: " (a TimeoutError says nothing; a review).
    monkeypatch.setattr(agent_endpoint, "HANDSHAKE_TIMEOUT", 0.2)
    ws = await _connect(client, _token(client, tmp_path, "alice", ["alice"]))
    assert await _closed_with(ws) == (1002, "bad handshake: no HELLO within 0.2s")


async def test_websocket_pings_are_answered_within_the_users_frame_budget(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp answered them below the session: a flood of them took the server's core
    # from every tenant, whatever the budget (found by a review).
    headers = {"Authorization": f"Bearer {_token(client, tmp_path, 'alice', ['alice'])}"}
    ws = await client.ws_connect("/_relay/agent", headers=headers, autoping=False)  # pongs shown
    conn = Connection(Role.AGENT)
    await ws.send_bytes(conn.send(Hello(PROTOCOL_VERSION, ({"name": "alice"},), "test")))
    assert isinstance(await _next_frame(ws, conn), Welcome)
    [session] = client.app[REGISTRY].sessions()
    budget = session.budget  # its user's, which the session reads by
    budget.rate = 1000
    budget.spend(int(budget.burst), asyncio.get_running_loop().time())  # from now on, pings wait their turn
    pongs = []
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        for n in range(30):
            await ws.ping(str(n).encode())
        while len(pongs) < 30:
            msg = await ws.receive(timeout=WAIT)
            if msg.type is WSMsgType.PONG:
                pongs.append(msg.data)
    assert pongs == [str(n).encode() for n in range(30)]  # RFC 6455 5.5.2: each answered, in order
    assert "reading it more slowly" in caplog.text  # and paced by the budget
    await ws.close()


async def _raw_upgrade(
    client: TestClient, token: str, then: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the agent endpoint: the upgrade request (and ``then``, in the
    same write), as a client that does not wait for the answer would send it."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"GET /_relay/agent HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
        + then
    )
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it ends the connection (a reset may overtake the last bytes)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
            received += chunk
    return received


EMPTY_BINARY, EMPTY_CONTINUATION = b"\x02\x80" + bytes(4), b"\x00\x80" + bytes(4)


async def test_a_fragmented_message_closes_an_agents_connection_with_1002(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Empty fragments never made a message: aiohttp parsed them without end, unpaused
    # and outside the frame budget (a review: 220 million in 10 s, every tenant slowed
    # to 480 ms). A raw client, as relay-agent never sends one.
    reader, writer = await _raw_upgrade(client, _token(client, tmp_path, "alice", ["alice"]))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101")
    with caplog.at_level(logging.INFO, logger="relay.server"):
        writer.write(EMPTY_BINARY + EMPTY_CONTINUATION * 10_000)
        received = await _until_closed(reader)
    assert received in (b"\x88\x26\x03\xeafragmented messages are not accepted", b"")
    assert "refused: a fragmented websocket message" in caplog.text
    writer.close()


async def test_frames_sent_before_the_upgrade_is_answered_are_refused(
    client: TestClient, tmp_path: Path
) -> None:
    # They reached aiohttp before the screen could read them: a frame header pipelined
    # with the upgrade request put the screen out of step, and fragments passed (a review).
    token = _token(client, tmp_path, "alice", ["alice"])
    reader, writer = await _raw_upgrade(client, token, then=b"\x82\x8e" + bytes(4))  # a header alone
    answer = await _until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"X-Relay-Error: bad-request" in answer
    assert b"websocket frames came before the upgrade was answered" in answer


async def test_agents_get_no_permessage_deflate(client: TestClient, tmp_path: Path) -> None:
    # With it, 70 bytes on the wire were inflated to 64 KiB on the server's loop, a frame
    # of the budget each: one agent slowed every tenant to 2 s (a review).
    headers = {"Authorization": f"Bearer {_token(client, tmp_path, 'alice', ['alice'])}"}
    ws = await client.ws_connect("/_relay/agent", headers=headers, compress=15)
    assert ws.compress == 0
    await ws.close()


async def test_agent_with_revoked_token_is_closed_4001(client: TestClient, tmp_path: Path) -> None:
    token = _token(client, tmp_path, "alice", ["alice"])
    _store(client).revoke_token(tokens.verify(tokens.load_secret(tmp_path), token).token_id)
    ws = await _connect(client, token)
    assert await _closed_with(ws) == (4001, "token revoked")


async def test_wrong_protocol_version_is_closed_4005(client: TestClient, tmp_path: Path) -> None:
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice"])))
    await agent.hello("alice", version=PROTOCOL_VERSION + 1)
    code, reason = await _closed_with(agent.ws)
    assert code == 4005
    assert f"protocol version {PROTOCOL_VERSION + 1} unsupported" in reason
    assert _store(client).name_owner("alice") is None  # refused before any name was claimed


async def test_a_name_owned_by_another_user_is_closed_4003(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice-dev", "bob")
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello("alice-dev")
    assert await _closed_with(agent.ws) == (4003, "name 'alice-dev' belongs to another user")
    assert _store(client).name_owner("alice-dev") == "bob"


@pytest.mark.parametrize("name", ["alice-ci", "alice-ci-prod"])
async def test_a_name_in_another_users_namespace_is_theirs_not_a_wildcards(
    client: TestClient, tmp_path: Path, name: str
) -> None:
    # Found by a review: alice's default "alice-*" covered every name of a user called
    # alice-ci, so alice could claim them first, lock alice-ci out and get its webhooks.
    ci = _token(client, tmp_path, "alice-ci", ["alice-ci", "alice-ci-*"])
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello(name)
    assert await _closed_with(agent.ws) == (4003, f"name {name!r} belongs to another user")
    assert _store(client).name_owner(name) is None
    # Its user claims it; alice keeps the rest of her namespace ...
    owner = Agent(await _connect(client, ci))
    await owner.hello(name)
    assert isinstance(await owner.receive(), Welcome)
    mine = await _agent(client, tmp_path, "alice-cx", "alice-c")
    await mine.ws.close()
    await owner.ws.close()


async def test_one_hello_claims_no_name_past_the_cap(tmp_path: Path) -> None:
    # Found by a second review: every name of a HELLO was checked against the count held
    # before any was claimed, so 999 names and a HELLO of 16 made 1,015.
    config = ServerConfig(data_dir=tmp_path, public_url=PUBLIC_URL, max_names_per_user=3)
    async with TestClient(TestServer(create_app(config))) as client:
        await _hello_past_the_cap(client, tmp_path)


async def _hello_past_the_cap(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice-a", "alice")
    _store(client).claim_name("alice-b", "alice")
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello("alice-c", "alice-d")
    code, reason = await _closed_with(agent.ws)
    assert code == 4003
    assert reason.startswith("'alice' holds 3 names already, the most a user may"), reason
    assert _store(client).name_owner("alice-d") is None


async def test_a_token_that_lists_a_name_itself_may_take_it_from_a_namespace(
    client: TestClient, tmp_path: Path
) -> None:
    _token(client, tmp_path, "alice-ci", ["alice-ci", "alice-ci-*"])
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice-ci-shared"])))
    await agent.hello("alice-ci-shared")  # the admin granted it by name
    assert isinstance(await agent.receive(), Welcome)
    assert _store(client).name_owner("alice-ci-shared") == "alice"
    await agent.ws.close()


async def test_a_name_the_token_does_not_allow_is_closed_4003(client: TestClient, tmp_path: Path) -> None:
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello("alice", "bob")
    assert await _closed_with(agent.ws) == (4003, "token does not allow the name 'bob'")
    # All or nothing: alice was not claimed either.
    assert _store(client).name_owner("alice") is None


async def test_an_invalid_name_is_closed_4003(client: TestClient, tmp_path: Path) -> None:
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["*"])))
    await agent.hello("Alice")
    code, reason = await _closed_with(agent.ws)
    assert code == 4003
    assert reason.startswith("invalid tunnel name 'Alice'")


async def test_a_name_with_a_trailing_newline_is_closed_4003(client: TestClient, tmp_path: Path) -> None:
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"])))
    await agent.hello("alice-x\n")
    try:
        code, reason = await _closed_with(agent.ws)
        assert code == 4003
        assert reason.startswith("invalid tunnel name")
    finally:
        await agent.ws.close()
    assert _store(client).name_owner("alice-x\n") is None


async def test_a_first_frame_that_is_not_hello_is_a_protocol_error(
    client: TestClient, tmp_path: Path
) -> None:
    ws = await _connect(client, _token(client, tmp_path, "alice", ["alice"]))
    await ws.send_bytes(encode(Ping(b"x")))
    code, reason = await _closed_with(ws)
    assert code == 1002
    assert "expected HELLO, got Ping" in reason


# -- agent endpoint: welcome -----------------------------------------------------------


async def test_hello_gets_welcome_with_both_urls(client: TestClient, tmp_path: Path) -> None:
    ws = await _connect(client, _token(client, tmp_path, "alice", ["alice", "alice-*"]))
    conn = Connection(Role.AGENT)
    hello = Hello(PROTOCOL_VERSION, ({"name": "alice"},), "test")
    data = conn.send(hello)  # the agent side's state; the bytes are the plain encoding
    assert data == encode(hello)
    await ws.send_bytes(data)
    welcome = await _next_frame(ws, conn)
    assert isinstance(welcome, Welcome)
    assert welcome.version == PROTOCOL_VERSION
    assert welcome.tunnels == (
        {"name": "alice", "urls": ["http://alice.relay.test", "http://relay.test/t/alice"]},
    )
    assert len(welcome.session) == 12
    assert welcome.limits["max_streams"] > 0
    assert _store(client).name_owner("alice") == "alice"
    await ws.close()


async def test_hello_without_names_gets_the_users_own_name(client: TestClient, tmp_path: Path) -> None:
    agent = Agent(await _connect(client, _token(client, tmp_path, "alice", ["alice"])))
    await agent.hello()
    welcome = await agent.receive()
    assert isinstance(welcome, Welcome)
    assert [t["name"] for t in welcome.tunnels] == ["alice"]
    await agent.ws.close()


# -- forwarding through a hand-driven agent ---------------------------------------------


async def test_request_through_the_agent(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path, "alice")

    async def public() -> tuple[int, dict[str, str], bytes]:
        async with client.post(
            "/t/alice/hook?x=1",
            data=b'{"event":"push"}',
            headers={
                "Host": "relay.test",
                "Content-Type": "application/json",
                "X-Forwarded-For": "6.6.6.6",  # a client may not choose what the relay reports
            },
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    pending = asyncio.create_task(public())
    opened = await agent.receive()
    assert isinstance(opened, Open)
    assert opened.stream_id == 1
    assert not opened.end_stream
    head = opened.head
    assert head.method == "POST"
    assert head.target == b"/hook?x=1"
    assert head.client == "127.0.0.1"
    headers = list(head.headers)
    assert (b"Content-Type", b"application/json") in headers
    assert [v for k, v in headers if k.lower() == b"x-forwarded-for"] == [b"127.0.0.1"]
    assert (b"X-Forwarded-Proto", b"http") in headers
    assert (b"X-Forwarded-Host", b"relay.test") in headers
    assert (b"X-Forwarded-Prefix", b"/t/alice") in headers

    body = b""
    while True:
        frame = await agent.receive()
        assert isinstance(frame, Data)
        body += frame.data
        if frame.end_stream:
            break
    assert body == b'{"event":"push"}'

    await agent.send(Response(1, ResponseHead(201, ((b"Content-Type", b"text/plain"), (b"X-Local", b"yes")))))
    await agent.send(Data(1, b"hello ", False))
    await agent.send(Data(1, b"from local", True))
    status, response_headers, response_body = await asyncio.wait_for(pending, WAIT)
    assert status == 201
    assert response_headers["X-Local"] == "yes"
    assert response_headers["Content-Type"] == "text/plain"
    assert "X-Relay-Error" not in response_headers
    assert response_body == b"hello from local"
    await agent.ws.close()


async def test_subdomain_request_through_the_agent(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path, "alice")

    async def public() -> tuple[int, bytes]:
        async with client.get("/a/b?c=%20", headers={"Host": "Alice.Relay.Test:8000"}) as resp:
            return resp.status, await resp.read()

    pending = asyncio.create_task(public())
    opened = await agent.receive()
    assert isinstance(opened, Open)
    assert opened.end_stream  # a GET without body
    assert opened.head.target == b"/a/b?c=%20"
    assert not [k for k, _ in opened.head.headers if k.lower() == b"x-forwarded-prefix"]
    await agent.send(Response(opened.stream_id, ResponseHead(204, ()), end_stream=True))
    assert await asyncio.wait_for(pending, WAIT) == (204, b"")
    await agent.ws.close()


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (RESET_TARGET_UNREACHABLE, 502, "local-unreachable"),
        (RESET_TARGET_TIMEOUT, 504, "local-timeout"),
    ],
)
async def test_agent_reset_becomes_a_relay_error(
    client: TestClient, tmp_path: Path, code: int, status: int, error: str
) -> None:
    agent = await _agent(client, tmp_path, "alice")

    async def public() -> tuple[int, str | None, str]:
        async with client.get("/hook", headers={"Host": "alice.relay.test"}) as resp:
            return resp.status, resp.headers.get("X-Relay-Error"), await resp.text()

    pending = asyncio.create_task(public())
    opened = await agent.receive()
    assert isinstance(opened, Open)
    await agent.send(Reset(opened.stream_id, code, "connection refused by 127.0.0.1:9"))
    got_status, got_error, text = await asyncio.wait_for(pending, WAIT)
    assert (got_status, got_error) == (status, error)
    assert "connection refused by 127.0.0.1:9" in text
    await agent.ws.close()


async def test_a_101_with_control_characters_in_a_header_is_502(client: TestClient, tmp_path: Path) -> None:
    # Found by a second review: the 101 of a websocket upgrade skipped the checks every
    # other relayed head gets; relay-agent never sends such a head, a custom agent may.
    agent = await _agent(client, tmp_path, "alice")
    upgrade = {
        "Host": "relay.test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }

    async def public() -> tuple[int, str | None]:
        async with client.get("/t/alice/ws", headers=upgrade) as resp:
            return resp.status, resp.headers.get("X-Relay-Error")

    pending = asyncio.create_task(public())
    opened = await agent.receive()
    assert isinstance(opened, Open)
    await agent.send(Response(opened.stream_id, ResponseHead(101, ((b"X-Bad", b"a\x01b"),))))
    assert await asyncio.wait_for(pending, WAIT) == (502, "local-bad-response")
    await agent.ws.close()


async def test_the_relays_own_answers_do_not_name_its_software_versions(client: TestClient) -> None:
    answers = (("/healthz", "relay.test"), ("/hook", "nobody.relay.test"), ("/t/alice/", "relay.test"))
    for path, host in answers:
        async with client.get(path, headers={"Host": host}) as resp:
            assert resp.headers.getall("Server") == ["relay"], (path, resp.status)


async def test_agent_gone_mid_request_is_503(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path, "alice")

    async def public() -> tuple[int, str | None]:
        async with client.get("/t/alice/", headers={"Host": "relay.test"}) as resp:
            return resp.status, resp.headers.get("X-Relay-Error")

    pending = asyncio.create_task(public())
    assert isinstance(await agent.receive(), Open)
    await agent.ws.close()
    assert await asyncio.wait_for(pending, WAIT) == (503, "tunnel-offline")


async def test_name_stays_claimed_after_the_agent_leaves(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path, "alice")
    await agent.ws.close()
    # The server notices the close on its own schedule: poll, bounded.
    async with asyncio.timeout(WAIT):
        while True:
            async with client.get("/t/alice/", headers={"Host": "relay.test"}) as resp:
                if resp.status == 503:
                    assert resp.headers["X-Relay-Error"] == "tunnel-offline"
                    break
            await asyncio.sleep(0.01)
    assert _store(client).name_owner("alice") == "alice"
