"""The events and tunnels API, and queue-mode ingress, through aiohttp's test client.

The agent, when there is one, is driven by hand (a websocket and a
``relay_protocol.Connection(Role.AGENT)``): the test reads each OPEN the server
sends and chooses the local service's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

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
)
from relay_server import tokens
from relay_server.api import MAX_LIST
from relay_server.app import DELIVERIES, STORE, create_app
from relay_server.config import ServerConfig
from relay_server.delivery import QueueConfig
from relay_server.store import Delivery, Event, Store

PUBLIC_URL = "http://relay.test"
APEX = {"Host": "relay.test"}
#: Seconds any single wait may take before the test fails instead of hanging.
WAIT = 5.0

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[MakeClient]:
    """A factory of test clients on ``create_app`` with a data dir under ``tmp_path``."""
    clients: list[TestClient] = []

    async def make(queue: QueueConfig | None = None, **options: Any) -> TestClient:
        queue = queue or QueueConfig()
        config = ServerConfig(data_dir=tmp_path, public_url=PUBLIC_URL, queue=queue, **options)
        client = TestClient(TestServer(create_app(config)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


def _store(client: TestClient) -> Store:
    return client.app[STORE]


def _token(client: TestClient, tmp_path: Path, user: str, names: list[str] | None = None) -> str:
    """A token the server accepts: signed with its secret and recorded in its store."""
    token, claims = tokens.issue(tokens.load_secret(tmp_path), user, names or [user, f"{user}-*"], 3600)
    _store(client).record_token(claims)
    return token


async def _api(
    client: TestClient, method: str, path: str, token: str | None, body: Any = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """Call ``/_relay/api/PATH``; returns status, headers and the JSON answer."""
    headers = dict(APEX)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with client.request(
        method, f"/_relay/api/{path}", headers=headers, json=body if raw is None else None, data=raw
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def _post(
    client: TestClient, tunnel: str, body: bytes = b'{"n":1}', **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with client.post(
        f"/t/{tunnel}/hook?x=1",
        data=body,
        headers={**APEX, "Content-Type": "application/json", **headers},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# -- a hand-driven agent ------------------------------------------------------------------


class Agent:
    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.conn = Connection(Role.AGENT)

    async def receive(self) -> Frame:
        """The next frame the server sends, heartbeat PINGs skipped."""
        while True:
            msg = await self.ws.receive(timeout=WAIT)
            assert msg.type is WSMsgType.BINARY, msg
            frame = self.conn.receive(msg.data)
            if frame is not None and not isinstance(frame, Ping):
                return frame

    async def send(self, frame: Response | Data | Reset) -> None:
        await self.ws.send_bytes(self.conn.send(frame))

    async def request(self) -> tuple[Open, bytes]:
        """The next OPEN and its whole body."""
        opened = await self.receive()
        assert isinstance(opened, Open), opened
        body = b""
        end = opened.end_stream
        while not end:
            frame = await self.receive()
            assert isinstance(frame, Data), frame
            assert frame.stream_id == opened.stream_id
            body += frame.data
            end = frame.end_stream
        return opened, body


async def _agent(client: TestClient, tmp_path: Path, user: str = "alice") -> Agent:
    token = _token(client, tmp_path, user)
    ws = await client.ws_connect("/_relay/agent", headers={"Authorization": f"Bearer {token}"})
    agent = Agent(ws)
    await ws.send_bytes(agent.conn.send(Hello(PROTOCOL_VERSION, ({"name": user},), "test")))
    welcome = await agent.receive()
    assert isinstance(welcome, Welcome), welcome
    return agent


def _header(opened: Open, name: bytes) -> list[bytes]:
    return [v for k, v in opened.head.headers if k.lower() == name.lower()]


async def _recorded(client: TestClient, token: str, event_id: str, attempts: int) -> dict[str, Any]:
    """The API's view of ``event_id`` once ``attempts`` attempts are recorded (that is done in
    the background after the sender has its answer)."""

    async def shown() -> dict[str, Any] | None:
        status, _, answer = await _api(client, "GET", f"events/{event_id}", token)
        assert status == 200, answer
        return answer if answer["deliveries"][0]["attempts"] >= attempts else None

    return await _until(shown, f"attempt {attempts} of {event_id} to be recorded")


async def _until(predicate: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- authentication -----------------------------------------------------------------------


async def test_no_token_is_401(client: TestClient) -> None:
    status, headers, answer = await _api(client, "GET", "events", None)
    assert status == 401
    assert headers["X-Relay-Error"] == "unauthorized"
    assert answer == {"error": "unauthorized", "message": "missing Authorization header"}


@pytest.mark.parametrize("token", ["not-a-token", "", "Basic abc"])
async def test_a_bad_token_is_401(client: TestClient, token: str) -> None:
    async with client.get("/_relay/api/events", headers={**APEX, "Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401
        assert resp.headers["X-Relay-Error"] == "unauthorized"
        assert (await resp.json())["error"] == "unauthorized"


async def test_a_token_of_another_server_is_401(client: TestClient) -> None:
    token, _ = tokens.issue(b"k" * 64, "alice", ["alice"], 3600)
    status, _, answer = await _api(client, "GET", "events", token)
    assert status == 401
    assert "signature invalid" in answer["message"]


async def test_a_revoked_token_is_401(client: TestClient, tmp_path: Path) -> None:
    token = _token(client, tmp_path, "alice")
    assert (await _api(client, "GET", "events", token))[0] == 200
    _store(client).revoke_token(tokens.verify(tokens.load_secret(tmp_path), token).token_id)
    status, _, answer = await _api(client, "GET", "events", token)
    assert status == 401
    assert answer["message"] == "token revoked"


async def test_an_unknown_api_call_is_404(client: TestClient, tmp_path: Path) -> None:
    status, headers, answer = await _api(client, "DELETE", "events", _token(client, tmp_path, "alice"))
    assert status == 404
    assert headers["X-Relay-Error"] == "not-found"
    assert answer["error"] == "not-found"


# -- events: queued without an agent ------------------------------------------------------


async def test_a_post_without_agent_is_queued_and_shown_with_its_body(
    client: TestClient, tmp_path: Path
) -> None:
    _store(client).claim_name("alice", "alice")
    status, headers, body = await _post(client, "alice", b'{"order":42}', **{"X-Custom": "kept"})
    assert status == 202
    assert headers["Content-Type"].startswith("application/json")
    event_id = headers["X-Relay-Event"]
    assert event_id.startswith("evt_")
    assert json.loads(body) == {"queued": True, "event": event_id}

    token = _token(client, tmp_path, "alice")
    status, _, listed = await _api(client, "GET", "events", token)
    assert status == 200
    [summary] = listed["events"]
    assert summary["id"] == event_id
    assert summary["tunnel"] == "alice"
    assert summary["method"] == "POST"
    assert summary["target"] == "/hook?x=1"
    assert summary["status"] == "pending"
    assert summary["deliveries"][0]["destination"] == "agent:*"
    assert summary["deliveries"][0]["attempts"] == 0
    assert "body" not in summary

    status, _, shown = await _api(client, "GET", f"events/{event_id}", token)
    assert status == 200
    assert shown["id"] == event_id
    assert shown["body"] == '{"order":42}'
    assert shown["body_encoding"] == "utf-8"
    assert ["X-Custom", "kept"] in shown["headers"]
    assert ["Content-Type", "application/json"] in shown["headers"]


async def test_a_binary_body_is_shown_in_base64(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    status, headers, _ = await _post(client, "alice", b"\xff\x00\xfe")
    assert status == 202
    token = _token(client, tmp_path, "alice")
    _, _, shown = await _api(client, "GET", f"events/{headers['X-Relay-Event']}", token)
    assert (shown["body"], shown["body_encoding"]) == ("/wD+", "base64")


async def test_events_list_filters(client: TestClient, tmp_path: Path) -> None:
    store = _store(client)
    store.claim_name("alice", "alice")
    store.claim_name("alice-dev", "alice")
    first = (await _post(client, "alice"))[1]["X-Relay-Event"]
    second = (await _post(client, "alice-dev"))[1]["X-Relay-Event"]
    token = _token(client, tmp_path, "alice")

    async def ids(query: str) -> list[str]:
        status, _, answer = await _api(client, "GET", f"events{query}", token)
        assert status == 200
        return [e["id"] for e in answer["events"]]

    assert await ids("") == [second, first]  # newest first
    assert await ids("?name=alice") == [first]
    assert await ids("?name=alice-dev") == [second]
    assert await ids("?status=pending") == [second, first]
    assert await ids("?status=retrying") == []
    assert await ids("?status=delivered") == []
    assert await ids("?limit=1") == [second]
    status, headers, _ = await _api(client, "GET", "events?status=lost", token)
    assert (status, headers["X-Relay-Error"]) == (400, "bad-request")
    status, headers, _ = await _api(client, "GET", "events?limit=many", token)
    assert (status, headers["X-Relay-Error"]) == (400, "bad-request")


def _many_events(store: Store, count: int) -> list[str]:
    """Store ``count`` waiting events of alice's at once; their ids, oldest first."""
    ids = [f"evt_{i:05}" for i in range(count)]
    now = time.time()
    store.transaction(
        [
            Store.insert_event_op(
                Event(0, event_id, "alice", "alice", now, "POST", b"/", (), "", b""),
                [Delivery(0, "alice", "agent:*", "pending", 0, time.time() + 3600)],
            )
            for event_id in ids
        ]
    )
    return ids


async def test_the_oldest_of_1010_events_are_found_on_the_next_page(
    client: TestClient, tmp_path: Path
) -> None:
    ids = _many_events(_store(client), MAX_LIST + 10)
    token = _token(client, tmp_path, "alice")
    status, _, first = await _api(client, "GET", f"events?limit={MAX_LIST}", token)
    assert status == 200
    assert [e["id"] for e in first["events"]] == ids[::-1][:MAX_LIST]  # newest first
    assert isinstance(first["next"], str)
    status, _, second = await _api(client, "GET", f"events?limit={MAX_LIST}&before={first['next']}", token)
    assert status == 200
    assert [e["id"] for e in second["events"]] == ids[9::-1]  # the oldest ten
    assert second["next"] is None


async def test_pages_follow_the_filters_and_end_exactly(client: TestClient, tmp_path: Path) -> None:
    ids = _many_events(_store(client), 6)
    token = _token(client, tmp_path, "alice")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "events?name=alice&status=pending&limit=3" + (f"&before={cursor}" if cursor else "")
        status, _, page = await _api(client, "GET", query, token)
        assert status == 200
        seen += [e["id"] for e in page["events"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert (seen, pages) == (ids[::-1], 2)  # 6 events in pages of 3: no empty third page
    _, _, other = await _api(client, "GET", "events?status=dead&limit=3", token)
    assert other == {"events": [], "next": None}


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "١٢", "9" * 20])
async def test_a_bad_cursor_is_400(client: TestClient, tmp_path: Path, cursor: str) -> None:
    status, headers, answer = await _api(
        client, "GET", f"events?before={cursor}", _token(client, tmp_path, "alice")
    )
    assert (status, headers["X-Relay-Error"]) == (400, "bad-request")
    assert "cursor" in answer["message"]


async def test_a_negative_limit_does_not_lift_the_cap(client: TestClient, tmp_path: Path) -> None:
    _many_events(_store(client), MAX_LIST + 1)
    status, _, answer = await _api(client, "GET", "events?limit=-1", _token(client, tmp_path, "alice"))
    assert status == 200
    assert len(answer["events"]) <= MAX_LIST


async def test_replay_by_the_owner(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    event_id = (await _post(client, "alice"))[1]["X-Relay-Event"]
    token = _token(client, tmp_path, "alice")
    status, _, answer = await _api(client, "POST", f"events/{event_id}/replay", token)
    assert status == 202
    assert answer == {"event": event_id, "replayed": ["agent:*"]}
    status, _, answer = await _api(client, "POST", "events/evt_nope/replay", token)
    assert (status, answer["error"]) == (404, "not-found")


async def test_replays_at_once_count_their_event_back_into_the_quota_once(
    client: TestClient, tmp_path: Path
) -> None:
    # Found by a review: 60 replays at once of one delivered event all saw it finished and
    # each counted it back: the tunnel said 57 waiting, and a small --quota-events
    # answered 429 until the minute's recount.
    _store(client).claim_name("alice", "alice")
    event_id = (await _post(client, "alice"))[1]["X-Relay-Event"]
    [(_, [delivery])] = _store(client).find_events("alice", None, None, 1)
    dead = replace(delivery, status="dead", next_attempt_at=None)
    _store(client).transaction([Store.update_delivery_op(dead)])
    await client.app[DELIVERIES].recount()
    token = _token(client, tmp_path, "alice")
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["waiting"] == 0
    replays = [_api(client, "POST", f"events/{event_id}/replay", token) for _ in range(20)]
    assert {status for status, _, _ in await asyncio.gather(*replays)} <= {202, 409}
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["waiting"] == 1


async def test_another_user_sees_nothing_of_alices_events(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    event_id = (await _post(client, "alice"))[1]["X-Relay-Event"]
    bob = _token(client, tmp_path, "bob")
    status, _, listed = await _api(client, "GET", "events", bob)
    assert (status, listed) == (200, {"events": [], "next": None})
    status, _, listed = await _api(client, "GET", "events?name=alice", bob)
    assert (status, listed) == (200, {"events": [], "next": None})
    for method, path in (("GET", f"events/{event_id}"), ("POST", f"events/{event_id}/replay")):
        status, headers, answer = await _api(client, method, path, bob)
        assert status == 404, path
        assert headers["X-Relay-Error"] == "not-found"
        assert answer["message"] == f"you have no event {event_id!r}"
    # Alice's event is as it was.
    _, _, shown = await _api(client, "GET", f"events/{event_id}", _token(client, tmp_path, "alice"))
    assert shown["deliveries"][0]["attempts"] == 0
    assert shown["status"] == "pending"


# -- tunnel settings ------------------------------------------------------------------------


async def test_tunnel_settings_default_and_list(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    status, _, answer = await _api(client, "GET", "tunnels/alice", token)
    assert status == 200
    assert answer == {
        "name": "alice",
        "agents": 0,
        "waiting": 0,
        "settings": {
            "mode": "queue",
            "retry_on": [429, 502, 503, 504],
            "max_concurrency": "auto",
            "destinations": ["agent:*"],
        },
        "slots": {"agent:*": 8},  # auto, before its first delivery
    }
    status, _, answer = await _api(client, "GET", "tunnels", token)
    assert [t["name"] for t in answer["tunnels"]] == ["alice"]
    status, _, _ = await _api(client, "GET", "tunnels/alice", _token(client, tmp_path, "bob"))
    assert status == 404


async def test_a_tunnel_says_how_many_delivery_slots_it_has_now(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    client.app[DELIVERIES].dispatcher("alice", "agent:*").adaptive.limit = 21  # auto, grown
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["slots"] == {"agent:*": 21}
    # A number set replaces it at once; back to auto, it starts again from the floor.
    assert (await _api(client, "PATCH", "tunnels/alice", token, {"max_concurrency": 3}))[2]["slots"] == {
        "agent:*": 3
    }
    answer = (await _api(client, "PATCH", "tunnels/alice", token, {"max_concurrency": "auto"}))[2]
    assert answer["slots"] == {"agent:*": 8}


async def test_a_tunnel_says_how_many_events_wait(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    for _ in range(3):
        assert (await _post(client, "alice"))[0] == 202
    token = _token(client, tmp_path, "alice")
    _, _, answer = await _api(client, "GET", "tunnels/alice", token)
    assert answer["waiting"] == 3
    _, _, answer = await _api(client, "GET", "tunnels", token)
    assert [t["waiting"] for t in answer["tunnels"]] == [3]


async def test_live_mode_answers_503_without_agent(client: TestClient, tmp_path: Path) -> None:
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    status, _, answer = await _api(client, "PATCH", "tunnels/alice", token, {"mode": "live"})
    assert status == 200
    assert answer["settings"]["mode"] == "live"
    status, headers, body = await _post(client, "alice")
    assert status == 503
    assert headers["X-Relay-Error"] == "tunnel-offline"
    assert b"no agent is connected for 'alice'" in body
    assert "X-Relay-Event" not in headers
    # The setting is stored: it holds for a later read, and nothing was queued.
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["settings"]["mode"] == "live"
    assert (await _api(client, "GET", "events", token))[2] == {"events": [], "next": None}
    # Back to queue mode: the same request is accepted.
    await _api(client, "PATCH", "tunnels/alice", token, {"mode": "queue"})
    assert (await _post(client, "alice"))[0] == 202


async def test_patch_claims_a_free_name_the_token_allows(client: TestClient, tmp_path: Path) -> None:
    token = _token(client, tmp_path, "alice")
    status, _, answer = await _api(client, "PATCH", "tunnels/alice-new", token, {"max_concurrency": 2})
    assert status == 200
    assert answer["settings"]["max_concurrency"] == 2
    assert answer["slots"] == {"agent:*": 2}
    assert _store(client).name_owner("alice-new") == "alice"
    # Back to the relay's choice, and it holds for a later read.
    status, _, answer = await _api(client, "PATCH", "tunnels/alice-new", token, {"max_concurrency": "auto"})
    assert (status, answer["settings"]["max_concurrency"]) == (200, "auto")
    assert (await _api(client, "GET", "tunnels/alice-new", token))[2]["settings"]["max_concurrency"] == "auto"
    # Not a name the token allows, or someone else's: 404, nothing claimed or changed.
    status, _, _ = await _api(client, "PATCH", "tunnels/carol", token, {"mode": "live"})
    assert status == 404
    assert _store(client).name_owner("carol") is None
    status, _, _ = await _api(client, "PATCH", "tunnels/alice-new", _token(client, tmp_path, "bob"), {})
    assert status == 404


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        ({"mode": "sometimes"}, None),
        ({"max_concurrency": 0}, None),
        ({"max_concurrency": "AUTO"}, None),
        ({"max_concurrency": None}, None),
        ({"destinations": []}, None),
        ({"destinations": ["agent:bad label"]}, None),
        ({"destinations": ["hooks.example.com/in"]}, None),
        ({"colour": "blue"}, None),
        ([1, 2], None),
        (None, b"{not json"),
        (None, b""),
    ],
)
async def test_invalid_settings_are_400(
    client: TestClient, tmp_path: Path, body: Any, raw: bytes | None
) -> None:
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    status, headers, answer = await _api(client, "PATCH", "tunnels/alice", token, body, raw=raw)
    assert status == 400
    assert headers["X-Relay-Error"] == "bad-request"
    assert answer["error"] == "bad-request"
    assert answer["message"].startswith("invalid settings: ")
    # Nothing changed.
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["settings"]["mode"] == "queue"


@pytest.mark.parametrize(
    ("body", "raw"),
    [({"mode": "sometimes"}, None), (None, b"garbage"), ({"destinations": ["http://127.0.0.1:9/"]}, None)],
)
async def test_invalid_settings_for_a_free_name_claim_nothing(
    client: TestClient, tmp_path: Path, body: Any, raw: bytes | None
) -> None:
    # Found by a review: a PATCH whose body was not JSON answered 400 but claimed the name
    # for good.
    token = _token(client, tmp_path, "alice")
    status, _, _ = await _api(client, "PATCH", "tunnels/alice-new", token, body, raw=raw)
    assert status == 400
    assert _store(client).name_owner("alice-new") is None


async def test_patch_refuses_a_name_in_another_users_namespace(client: TestClient, tmp_path: Path) -> None:
    _token(client, tmp_path, "alice-ci")  # alice-ci and alice-ci-* are that user's
    token = _token(client, tmp_path, "alice")
    for name in ("alice-ci", "alice-ci-prod"):
        status, headers, answer = await _api(client, "PATCH", f"tunnels/{name}", token, {"mode": "live"})
        assert (status, headers["X-Relay-Error"]) == (409, "conflict")
        assert answer["message"] == f"name {name!r} belongs to another user"
        assert _store(client).name_owner(name) is None
    status, _, _ = await _api(client, "PATCH", "tunnels/alice-cx", token, {"mode": "live"})
    assert status == 200


async def test_patch_claims_at_most_max_names_per_user(make_client: MakeClient, tmp_path: Path) -> None:
    # A review saw the API claim a name per call without end (a HELLO takes 16).
    client = await make_client(max_names_per_user=3)
    token = _token(client, tmp_path, "alice")
    for i in range(3):
        assert (await _api(client, "PATCH", f"tunnels/alice-{i}", token, {}))[0] == 200
    status, headers, answer = await _api(client, "PATCH", "tunnels/alice-3", token, {})
    assert (status, headers["X-Relay-Error"]) == (409, "conflict")
    assert "holds 3 names already" in answer["message"]
    assert _store(client).name_owner("alice-3") is None
    # What it holds stays its own to change.
    assert (await _api(client, "PATCH", "tunnels/alice-0", token, {"mode": "live"}))[0] == 200


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://10.1.2.3/x"])
async def test_a_private_url_destination_is_refused(client: TestClient, tmp_path: Path, url: str) -> None:
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    status, headers, answer = await _api(client, "PATCH", "tunnels/alice", token, {"destinations": [url]})
    assert status == 400
    assert headers["X-Relay-Error"] == "bad-request"
    assert "--allow-private-destinations" in answer["message"]
    assert (await _api(client, "GET", "tunnels/alice", token))[2]["settings"]["destinations"] == ["agent:*"]


async def test_a_loopback_url_destination_when_the_admin_allows_it(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(QueueConfig(allow_private=True))
    _store(client).claim_name("alice", "alice")
    token = _token(client, tmp_path, "alice")
    destinations = ["http://127.0.0.1:9/hook", "agent:laptop"]
    status, _, answer = await _api(client, "PATCH", "tunnels/alice", token, {"destinations": destinations})
    assert status == 200
    assert answer["settings"]["destinations"] == destinations


# -- quotas -----------------------------------------------------------------------------------


async def test_a_full_queue_is_429(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(QueueConfig(quota_events=2))
    _store(client).claim_name("alice", "alice")
    accepted = [await _post(client, "alice") for _ in range(2)]
    assert [status for status, _, _ in accepted] == [202, 202]
    status, headers, body = await _post(client, "alice")
    assert status == 429
    assert headers["X-Relay-Error"] == "too-many-requests"
    assert headers["Retry-After"] == "60"
    assert b"queue of 'alice' is full" in body
    assert "X-Relay-Event" not in headers
    # Refused means not stored: never a silent drop, never a hidden extra.
    _, _, listed = await _api(client, "GET", "events", _token(client, tmp_path, "alice"))
    assert {e["id"] for e in listed["events"]} == {h["X-Relay-Event"] for _, h, _ in accepted}
    # The quota is per tunnel.
    _store(client).claim_name("alice-dev", "alice")
    assert (await _post(client, "alice-dev"))[0] == 202


async def test_a_byte_quota_is_429(make_client: MakeClient) -> None:
    client = await make_client(QueueConfig(quota_bytes=100))
    _store(client).claim_name("alice", "alice")
    assert (await _post(client, "alice", b"x" * 60))[0] == 202
    status, headers, _ = await _post(client, "alice", b"x" * 60)
    assert (status, headers["X-Relay-Error"]) == (429, "too-many-requests")
    assert (await _post(client, "alice", b"x" * 40))[0] == 202  # 100 bytes: exactly full


# -- transparent delivery through an agent ------------------------------------------------------


async def test_a_delivered_event_carries_its_id_attempt_and_arrival(
    client: TestClient, tmp_path: Path
) -> None:
    agent = await _agent(client, tmp_path)
    before = time.time()
    # A client may not choose the relay's own headers: these are dropped.
    pending = asyncio.create_task(
        _post(client, "alice", b'{"a":1}', **{"X-Relay-Event-Id": "evt_forged", "X-Relay-Attempt": "99"})
    )
    opened, body = await agent.request()
    assert body == b'{"a":1}'
    assert opened.head.method == "POST"
    assert opened.head.target == b"/hook?x=1"
    event_id = opened.head.event_id
    assert event_id.startswith("evt_")
    assert _header(opened, b"X-Relay-Event-Id") == [event_id.encode()]
    assert _header(opened, b"X-Relay-Attempt") == [b"1"]
    [received] = _header(opened, b"X-Relay-Received-At")
    stamp = datetime.fromisoformat(received.decode()).timestamp()
    assert received.endswith(b"Z")
    assert before - 0.01 <= stamp <= time.time() + 0.01
    assert _header(opened, b"Content-Type") == [b"application/json"]

    sid = opened.stream_id
    await agent.send(
        Response(sid, ResponseHead(200, ((b"Content-Type", b"text/plain"), (b"X-Local", b"yes"))))
    )
    await agent.send(Data(sid, b"thanks", True))
    status, headers, answer = await asyncio.wait_for(pending, WAIT)
    assert status == 200  # the local service's own answer, not a 202
    assert headers["X-Local"] == "yes"
    assert "X-Relay-Event" not in headers
    assert answer == b"thanks"

    shown = await _recorded(client, _token(client, tmp_path, "alice"), event_id, 1)
    assert shown["status"] == "delivered"
    assert shown["received_at"] == received.decode()
    [delivery] = shown["deliveries"]
    assert (delivery["status"], delivery["attempts"], delivery["last_status"]) == ("delivered", 1, 200)
    assert delivery["next_attempt_at"] is None
    await agent.ws.close()


async def test_a_503_from_the_local_service_is_queued_for_retry(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path)
    pending = asyncio.create_task(_post(client, "alice"))
    opened, _ = await agent.request()
    answered = time.time()
    await agent.send(
        Response(opened.stream_id, ResponseHead(503, ((b"Retry-After", b"120"),)), end_stream=True)
    )
    status, headers, body = await asyncio.wait_for(pending, WAIT)
    assert status == 202  # durable when down: the sender is told it is queued
    assert headers["X-Relay-Event"] == opened.head.event_id
    assert json.loads(body) == {"queued": True, "event": opened.head.event_id}
    assert "X-Relay-Error" not in headers

    shown = await _recorded(client, _token(client, tmp_path, "alice"), opened.head.event_id, 1)
    assert shown["status"] == "retrying"
    [delivery] = shown["deliveries"]
    assert (delivery["status"], delivery["attempts"], delivery["last_status"]) == ("retrying", 1, 503)
    # Retry-After: 120 replaced the 5 s of the schedule.
    retry = datetime.fromisoformat(delivery["next_attempt_at"]).timestamp()
    assert answered + 115 <= retry <= time.time() + 121
    await agent.ws.close()


async def test_replay_delivers_again_with_the_same_id_and_the_next_attempt(
    client: TestClient, tmp_path: Path
) -> None:
    agent = await _agent(client, tmp_path)
    pending = asyncio.create_task(_post(client, "alice", b"once"))
    opened, _ = await agent.request()
    await agent.send(Response(opened.stream_id, ResponseHead(204, ()), end_stream=True))
    assert (await asyncio.wait_for(pending, WAIT))[0] == 204
    event_id = opened.head.event_id
    token = _token(client, tmp_path, "alice")
    assert (await _recorded(client, token, event_id, 1))["status"] == "delivered"

    status, _, _ = await _api(client, "POST", f"events/{event_id}/replay", token)
    assert status == 202
    again, body = await agent.request()
    assert body == b"once"
    assert again.head.event_id == event_id
    assert _header(again, b"X-Relay-Event-Id") == [event_id.encode()]
    assert _header(again, b"X-Relay-Attempt") == [b"2"]
    assert _header(again, b"X-Relay-Received-At") == _header(opened, b"X-Relay-Received-At")
    await agent.send(Response(again.stream_id, ResponseHead(200, ()), end_stream=True))

    shown = await _recorded(client, token, event_id, 2)
    assert shown["status"] == "delivered"
    assert shown["deliveries"][0]["attempts"] == 2
    await agent.ws.close()


async def test_every_attempt_is_shown_with_its_status_error_and_time(
    client: TestClient, tmp_path: Path
) -> None:
    agent = await _agent(client, tmp_path)
    before = time.time()
    pending = asyncio.create_task(_post(client, "alice"))
    opened, _ = await agent.request()
    await agent.send(Response(opened.stream_id, ResponseHead(503, ()), end_stream=True))
    assert (await asyncio.wait_for(pending, WAIT))[0] == 202
    event_id = opened.head.event_id
    token = _token(client, tmp_path, "alice")
    await _recorded(client, token, event_id, 1)
    status, _, _ = await _api(client, "POST", f"events/{event_id}/replay", token)
    assert status == 202
    again, _ = await agent.request()
    await agent.send(Reset(again.stream_id, 2, "the app fell over"))
    shown = await _recorded(client, token, event_id, 2)
    history = shown["deliveries"][0]["history"]
    assert [(a["attempt"], a["status"]) for a in history] == [(1, 503), (2, None)]
    assert history[0]["error"] is None and history[1]["error"]
    for attempt in history:
        assert before - 1 <= datetime.fromisoformat(attempt["at"]).timestamp() <= time.time() + 1
    # The list stays light: the history is in the event's own view only.
    _, _, listed = await _api(client, "GET", "events", token)
    assert "history" not in listed["events"][0]["deliveries"][0]
    await agent.ws.close()


async def test_a_get_is_never_an_event(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path)

    async def get() -> int:
        async with client.get("/t/alice/status", headers=APEX) as resp:
            return resp.status

    pending = asyncio.create_task(get())
    opened = await agent.receive()
    assert isinstance(opened, Open)
    assert opened.head.event_id == ""
    assert _header(opened, b"X-Relay-Event-Id") == []
    await agent.send(Response(opened.stream_id, ResponseHead(503, ()), end_stream=True))
    assert await asyncio.wait_for(pending, WAIT) == 503  # live: the 503 reaches the client
    _, _, listed = await _api(client, "GET", "events", _token(client, tmp_path, "alice"))
    assert listed == {"events": [], "next": None}
    await agent.ws.close()


async def test_a_garbled_retry_after_still_queues_the_event(client: TestClient, tmp_path: Path) -> None:
    agent = await _agent(client, tmp_path)
    pending = asyncio.create_task(_post(client, "alice"))
    opened, _ = await agent.request()
    await agent.send(
        Response(opened.stream_id, ResponseHead(503, ((b"Retry-After", b"\xb2"),)), end_stream=True)
    )
    status, headers, _ = await asyncio.wait_for(pending, WAIT)
    await agent.ws.close()
    assert (status, headers.get("X-Relay-Event")) == (202, opened.head.event_id)


async def test_a_garbled_retry_after_does_not_make_the_dispatcher_spin(
    client: TestClient, tmp_path: Path
) -> None:
    _store(client).claim_name("alice", "alice")
    assert (await _post(client, "alice"))[0] == 202  # no agent: queued, due now
    agent = await _agent(client, tmp_path)
    opened, _ = await agent.request()  # the dispatcher's first attempt
    assert _header(opened, b"X-Relay-Attempt") == [b"1"]
    await agent.send(
        Response(opened.stream_id, ResponseHead(503, ((b"Retry-After", b"\xb2"),)), end_stream=True)
    )
    # The schedule's first retry is 5 s away (minus jitter): nothing may come within 1 s.
    opens = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while True:
                frame = await agent.receive()
                if isinstance(frame, Open):
                    opens += 1
                    await agent.send(
                        Response(
                            frame.stream_id, ResponseHead(503, ((b"Retry-After", b"\xb2"),)), end_stream=True
                        )
                    )
    await agent.ws.close()
    assert opens == 0
