"""Nothing acknowledged is lost, nothing hangs (issue 7): the delivery queue when things fail.

The real application (``create_app`` behind aiohttp's test client) with an agent driven
by hand over its websocket, as in ``test_api.py``: faults are injected one at a time
into the inline first attempt, the store and the recording of outcomes, and the tests
check that every delivery slot comes back, that the dispatcher's bookkeeping stays
bounded, that it never spins, and that a failing store never makes it send the same
events again and again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient, TestServer

import relay_server.delivery as delivery_module
import relay_server.registry as registry_module
from relay_protocol import (
    PROTOCOL_VERSION,
    Connection,
    Data,
    Hello,
    Open,
    Reset,
    Response,
    ResponseHead,
    Role,
    TargetUp,
    Welcome,
)
from relay_protocol.errors import RelayError
from relay_protocol.frames import RESET_REFUSED, encode_batch
from relay_server import tokens
from relay_server.app import DELIVERIES, REGISTRY, STORE, create_app
from relay_server.attempts import AgentExchange
from relay_server.budget import FRAMES_PER_TURN
from relay_server.commits import GroupCommitter
from relay_server.config import ServerConfig
from relay_server.delivery import Deliveries, QueueConfig
from relay_server.dispatcher import BATCH, Dispatcher
from relay_server.errors import StoreError
from relay_server.ingress import Ingress
from relay_server.store import Delivery, NewEvent, Store

PUBLIC_URL = "http://relay.test"
APEX = {"Host": "relay.test"}
#: Seconds any single wait may take before the test fails instead of hanging.
WAIT = 10.0
ANY = "agent:*"


# -- the application and its API (as in test_api.py) ------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    config = ServerConfig(data_dir=tmp_path, public_url=PUBLIC_URL, queue=QueueConfig())
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    yield client
    await client.close()


def _store(client: TestClient) -> Store:
    return client.app[STORE]


def _deliveries(client: TestClient) -> Deliveries:
    return client.app[DELIVERIES]


def _registry(client: TestClient) -> registry_module.Registry:
    return client.app[REGISTRY]


def _dispatcher(client: TestClient) -> Dispatcher:
    return _deliveries(client).dispatcher("alice", ANY)


def _token(client: TestClient, tmp_path: Path, user: str = "alice") -> str:
    token, claims = tokens.issue(tokens.load_secret(tmp_path), user, [user, f"{user}-*"], 3600)
    _store(client).record_token(claims)
    return token


async def _api(client: TestClient, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    headers = {**APEX, "Authorization": f"Bearer {token}"}
    async with client.request(method, f"/_relay/api/{path}", headers=headers, json=body) as resp:
        return resp.status, await resp.json()


async def _post(client: TestClient, body: bytes = b'{"n":1}') -> tuple[int | None, dict[str, str]]:
    """POST a webhook to ``alice``; its status and headers (None: the connection broke)."""
    try:
        async with client.post(
            "/t/alice/hook", data=body, headers={**APEX, "Content-Type": "application/json"}
        ) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)
    except aiohttp.ClientError:
        return None, {}


async def _settings(client: TestClient, token: str, **settings: Any) -> None:
    status, answer = await _api(client, "PATCH", "tunnels/alice", token, settings)
    assert status == 200, answer


async def _statuses(client: TestClient, token: str) -> dict[str, str]:
    """Every event of alice's, by id: its status as the API shows it."""
    status, answer = await _api(client, "GET", "events?limit=1000", token)
    assert status == 200, answer
    return {e["id"]: e["status"] for e in answer["events"]}


async def _until(predicate: Callable[[], Any] | Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``predicate`` (a bounded wait: fails after WAIT seconds instead of hanging)."""
    deadline = time.monotonic() + WAIT
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- a hand-driven agent ---------------------------------------------------------------------------


class FakeAgent:
    """An agent whose local app is the test: it answers every request at once with
    ``auto`` (a status), or, with ``auto`` None, hands each request to the test."""

    def __init__(self, ws: ClientWebSocketResponse, auto: int | None, label: str = "") -> None:
        self.ws = ws
        self.label = label
        self.conn = Connection(Role.AGENT)
        self.auto = auto
        #: Every event id the agent was sent, in order (one per OPEN: a repeat is a double).
        self.seen: list[str] = []
        self.requests: asyncio.Queue[Open] = asyncio.Queue()
        self._open: dict[int, Open] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        hello = Hello(PROTOCOL_VERSION, ({"name": "alice"},), "test", self.label)
        await self.ws.send_bytes(self.conn.send(hello))
        msg = await self.ws.receive(timeout=WAIT)
        assert msg.type is WSMsgType.BINARY, msg
        assert isinstance(self.conn.receive(msg.data), Welcome)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not WSMsgType.BINARY:
                continue
            frame = self.conn.receive(msg.data)
            if isinstance(frame, Open):
                self.seen.append(frame.head.event_id)
                if frame.end_stream:
                    await self._complete(frame)
                else:
                    self._open[frame.stream_id] = frame
            elif isinstance(frame, Data) and frame.end_stream:
                opened = self._open.pop(frame.stream_id, None)
                if opened is not None:
                    await self._complete(opened)
            elif isinstance(frame, Reset):
                self._open.pop(frame.stream_id, None)

    async def _complete(self, opened: Open) -> None:
        if self.auto is None:
            self.requests.put_nowait(opened)
        else:
            await self.answer(opened, self.auto)

    async def answer(self, opened: Open, status: int, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        with contextlib.suppress(RelayError, ConnectionError):  # the server reset it meanwhile
            frame = Response(opened.stream_id, ResponseHead(status, headers), end_stream=True)
            await self.ws.send_bytes(self.conn.send(frame))

    async def next_request(self) -> Open:
        return await asyncio.wait_for(self.requests.get(), WAIT)

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT)  # raises what the reader raised


async def _connect(client: TestClient, tmp_path: Path, auto: int | None = 200, label: str = "") -> FakeAgent:
    token = _token(client, tmp_path)
    ws = await client.ws_connect("/_relay/agent", headers={"Authorization": f"Bearer {token}"})
    agent = FakeAgent(ws, auto, label)
    await agent.start()
    return agent


def _header(opened: Open, name: bytes) -> list[bytes]:
    return [v for k, v in opened.head.headers if k.lower() == name.lower()]


def _repeats(seen: list[str]) -> dict[str, int]:
    return {event_id: n for event_id, n in collections.Counter(seen).items() if n > 1}


# -- fault injection -----------------------------------------------------------------------------


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, exc: Exception) -> list[int]:
    """Make the coroutine function ``owner.name`` raise ``exc`` on its first call; the
    calls are counted in the list returned."""
    real = getattr(owner, name)
    calls: list[int] = []

    async def once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, once)
    return calls


def _fail_first_submit(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    """The first write queued with ``GroupCommitter.submit`` (an event's insert) fails
    with ``exc``, as a failed group commit answers it: not at once."""
    real = GroupCommitter.submit
    calls: list[int] = []

    def submit(self: GroupCommitter, op: Any, then: Any = None, **kw: Any) -> asyncio.Future[Any]:
        calls.append(1)
        if len(calls) > 1:
            return real(self, op, then, **kw)
        return asyncio.ensure_future(failing())

    async def failing() -> Any:
        await asyncio.sleep(0)  # a commit fails in its thread, later
        raise exc

    monkeypatch.setattr(GroupCommitter, "submit", submit)


class FailingUpdates:
    """Outcome writes (``Store.update_delivery_op``) fail in the store while ``failing``,
    as on a full disk: the group commit of any batch holding one fails with StoreError.
    Inserts are untouched. ``once``: only the first update fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, once: bool = False) -> None:
        self.failing = True
        self.once = once
        self.failed = 0
        real = Store.update_delivery_op

        def update_delivery_op(delivery: Delivery) -> Callable[[sqlite3.Connection], bool]:
            op = real(delivery)

            def maybe_failing(db: sqlite3.Connection) -> bool:
                if self.failing:
                    self.failed += 1
                    if self.once:
                        self.failing = False
                    exc = sqlite3.OperationalError("database or disk is full")
                    exc.sqlite_errorcode = sqlite3.SQLITE_FULL
                    raise exc
                return op(db)

            return maybe_failing

        monkeypatch.setattr(Store, "update_delivery_op", staticmethod(update_delivery_op))


INJECTIONS = [
    # The slot leaked with the code before issue 7 (HEAD's _first_attempt released it
    # only after the attempt returned, or on CancelledError): this one failed there.
    "attempt_agent",
    # These held on before too (the slot was released before them, or by accept),
    # and must keep holding now that the release is one try/finally.
    "record",
    "write_response",
    "finish",
    "finish_after_503",
    "commit_insert",
    "commit_record",
]


def _inject(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    boom = RuntimeError(f"injected fault: {point}")
    if point == "attempt_agent":
        _fail_once(monkeypatch, delivery_module, "attempt_agent", boom)
    elif point == "record":
        _fail_once(monkeypatch, Deliveries, "record", boom)
    elif point == "write_response":
        _fail_once(monkeypatch, Ingress, "_write_response", boom)
    elif point in ("finish", "finish_after_503"):
        _fail_once(monkeypatch, AgentExchange, "finish", boom)
    elif point == "commit_insert":
        _fail_first_submit(monkeypatch, StoreError("injected: the store is down"))
    elif point == "commit_record":
        monkeypatch.setattr(delivery_module, "RERECORD_FIRST", 0.01)
        FailingUpdates(monkeypatch, once=True)
    else:
        raise AssertionError(point)


# -- (a) every failure path gives back what it took --------------------------------------------------


@pytest.mark.parametrize("point", INJECTIONS)
async def test_every_failure_path_gives_back_its_delivery_slot(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    token = _token(client, tmp_path)
    await _settings(client, token, max_concurrency=2)
    agent = await _connect(client, tmp_path, auto=None)
    dispatcher = _dispatcher(client)
    _inject(monkeypatch, point)

    # One webhook through the faulty path; the agent answers whatever reaches it.
    first = asyncio.create_task(_post(client))
    if point == "commit_insert":
        # The attempt starts while the event is committed: the agent sees it, then its
        # RESET once the commit failed (the sender gets 503, never a false 202).
        await agent.next_request()
    elif point != "attempt_agent":  # that one fails before the agent sees it
        opened = await agent.next_request()
        if point == "finish_after_503":
            await agent.answer(opened, 503, ((b"Retry-After", b"3600"),))
        else:
            await agent.answer(opened, 200)
    status, _ = await asyncio.wait_for(first, WAIT)
    expected: dict[str, set[int | None]] = {
        "attempt_agent": {500},
        "record": {200},  # recorded in the background: the sender has the app's answer
        "write_response": {500},
        "finish": {200, None},  # the answer was sent before finish failed
        "finish_after_503": {500},
        "commit_insert": {503},  # not stored: refused, never a false 202
        "commit_record": {200},
    }
    assert status in expected[point]

    # Every slot came back...
    await _until(lambda: not dispatcher.in_flight, f"the slot of the failed attempt ({point}) to be freed")
    await _until(lambda: not dispatcher.recording, "the failed attempt's record to end")
    assert dispatcher.in_flight == set()

    # ...so max_concurrency webhooks are in the app's hands at once, and one more follows.
    posts = [asyncio.create_task(_post(client)) for _ in range(3)]
    held = [await agent.next_request(), await agent.next_request()]  # both slots, none answered
    assert len(dispatcher.in_flight) == 2
    for opened in held:
        await agent.answer(opened, 200)
    last = await agent.next_request()
    await agent.answer(last, 200)
    results = await asyncio.wait_for(asyncio.gather(*posts), WAIT)
    assert all(status in (200, 202) for status, _ in results), results
    sent = {o.head.event_id for o in (*held, last)}
    assert len(sent) == 3
    # A 202 names the queued event: it is one of those the agent got.
    assert {h["X-Relay-Event"] for status, h in results if status == 202} <= sent
    await _until(lambda: not dispatcher.in_flight, "the three slots to be freed")
    await _until(
        lambda: _statuses_of(client, token, sent, "delivered"), "the three webhooks to be recorded delivered"
    )
    await agent.close()


async def _statuses_of(client: TestClient, token: str, ids: set[str], status: str) -> bool:
    shown = await _statuses(client, token)
    return all(shown.get(i) == status for i in ids)


@pytest.mark.parametrize("fan_out", [False, True], ids=["inline attempt", "fan-out"])
async def test_a_sender_who_leaves_while_its_webhook_is_committed_still_has_it_delivered(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fan_out: bool
) -> None:
    # Fan-out had no inline attempt and nobody woke its dispatcher once the webhook was
    # stored: idle, it found the webhook only with the next one. This case failed there.
    token = _token(client, tmp_path)
    if fan_out:
        await _settings(client, token, destinations=["agent:laptop"])
    agent = await _connect(client, tmp_path, auto=200, label="laptop")
    assert (await _post(client))[0] in (200, 202)  # one delivered: the dispatcher has nothing left to do
    await _until(lambda: len(agent.seen) == 1, "the first webhook to reach the app")
    await _until(lambda: _statuses_of(client, token, set(agent.seen), "delivered"), "the first delivery")

    committing, commit_may_end, left = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_submit = GroupCommitter.submit

    async def held(self: GroupCommitter, op: Any, then: Any, **kw: Any) -> Any:
        committing.set()
        await commit_may_end.wait()
        return await real_submit(self, op, then, **kw)

    def held_submit(self: GroupCommitter, op: Any, then: Any = None, **kw: Any) -> asyncio.Future[Any]:
        if committing.is_set():
            return real_submit(self, op, then, **kw)
        return asyncio.ensure_future(held(self, op, then, **kw))

    monkeypatch.setattr(GroupCommitter, "submit", held_submit)
    real_spawn = _deliveries(client).tasks.spawn

    def spawn(coro: Any, name: str) -> Any:
        if "whose sender left" in name:
            left.set()
        return real_spawn(coro, name)

    monkeypatch.setattr(_deliveries(client).tasks, "spawn", spawn)
    sender = asyncio.create_task(_post(client, b'{"n":2}'))
    await asyncio.wait_for(committing.wait(), WAIT)
    sender.cancel()  # the sender hangs up while the relay commits its webhook
    await asyncio.wait_for(left.wait(), WAIT)
    commit_may_end.set()

    await _until(lambda: len(agent.seen) == 2, "the second webhook to reach the app")
    second = agent.seen[1]
    await _until(lambda: _statuses_of(client, token, {second}, "delivered"), "the second webhook delivered")
    assert _repeats(agent.seen) == {}
    await agent.close()


async def test_a_webhook_committed_while_the_idle_dispatcher_reads_the_store_is_not_missed(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dispatcher cleared its wake-up flag only when it went to sleep: a webhook stored
    # and its wake-up given while the dispatcher's last look at the store (a snapshot from
    # before that commit) was still running, was then slept through, until some later
    # webhook woke it. Found as a rare flake of the test above under load; here the look
    # is held open on purpose. Fan-out, so no inline attempt delivers it instead.
    token = _token(client, tmp_path)
    await _settings(client, token, destinations=["agent:laptop"])
    agent = await _connect(client, tmp_path, auto=200, label="laptop")
    assert (await _post(client))[0] in (200, 202)
    await _until(lambda: len(agent.seen) == 1, "the first webhook to reach the app")
    await _until(lambda: _statuses_of(client, token, set(agent.seen), "delivered"), "the first delivery")

    looking, look_may_end = threading.Event(), threading.Event()
    real_next_due_at = Store.next_due_at

    def held_next_due_at(self: Store, tunnel: str, destination: str) -> float | None:
        answer = real_next_due_at(self, tunnel, destination)  # the snapshot: nothing waits
        if answer is None and not look_may_end.is_set():
            looking.set()
            look_may_end.wait(WAIT)
        return answer

    monkeypatch.setattr(Store, "next_due_at", held_next_due_at)
    dispatcher = _deliveries(client).dispatcher("alice", "agent:laptop")
    dispatcher.wake()  # one more idle pass, which now stops inside its look
    await asyncio.wait_for(asyncio.to_thread(looking.wait, WAIT), WAIT)
    assert (await _post(client, b'{"n":2}'))[0] == 202  # committed, its dispatcher woken
    look_may_end.set()  # the look ends with its answer from before the commit
    await _until(lambda: len(agent.seen) == 2, "the second webhook to reach the app")
    await agent.close()


async def test_target_ups_are_acted_on_once_per_interval_and_none_is_lost(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each TARGET_UP starts an early pass over every waiting webhook: a review sent 2,000 a
    # second from one agent, drove hundreds of attempts a second and filled the store.
    monkeypatch.setattr(registry_module, "TARGET_UP_INTERVAL", 0.5)
    registry = client.app[REGISTRY]
    acted: list[float] = []
    registry.on_target_up.append(lambda session: acted.append(time.monotonic()))
    agent = await _connect(client, tmp_path)
    for _ in range(50):
        await agent.ws.send_bytes(agent.conn.send(TargetUp()))
    await _until(lambda: len(acted) == 2, "the flood's first and deferred TARGET_UP")
    assert acted[1] - acted[0] >= 0.45  # the second waited for the interval's end
    await asyncio.sleep(0.6)
    assert len(acted) == 2  # the 48 others were folded into those two
    await agent.ws.send_bytes(agent.conn.send(TargetUp()))  # a later one acts at once
    await _until(lambda: len(acted) == 3, "a TARGET_UP after the interval")
    await agent.close()


async def test_one_users_agents_share_one_frame_budget_kept_across_reconnects(
    client: TestClient, tmp_path: Path
) -> None:
    # A budget per connection let one token open hundreds of connections, each with its
    # own budget and burst (found by a review).
    first, second = await _connect(client, tmp_path), await _connect(client, tmp_path)
    budgets = {id(s.budget) for s in client.app[REGISTRY].sessions()}
    assert len(budgets) == 1
    await first.close()
    await second.close()
    again = await _connect(client, tmp_path)
    assert {id(s.budget) for s in client.app[REGISTRY].sessions()} == budgets
    await again.close()


async def test_a_long_batch_is_read_a_turn_at_a_time(client: TestClient, tmp_path: Path) -> None:
    # One BATCH of the smallest frames (about 6,500) was decoded in one go: some 20 ms
    # in which no other tenant's request moved (found by a review). Each TARGET_UP of
    # this one notes how many turns a busy task of the loop has had by then.
    agent = await _connect(client, tmp_path)
    [session] = client.app[REGISTRY].sessions()
    turns = 0

    async def busy() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    seen: list[int] = []
    session.on_target_up = lambda: seen.append(turns)
    task = asyncio.create_task(busy())
    count = 3 * FRAMES_PER_TURN
    await agent.ws.send_bytes(encode_batch([agent.conn.send(TargetUp()) for _ in range(count)]))
    await _until(lambda: len(seen) == count, "the whole BATCH to be read")
    task.cancel()
    assert [len(list(group)) for _, group in itertools.groupby(seen)] == [FRAMES_PER_TURN] * 3
    await agent.close()


@pytest.mark.parametrize("order", ["webhook first", "recount first"])
async def test_a_recount_committed_with_a_webhook_counts_it_once(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    # The periodic recount replaced the quota counts when its task resumed: a webhook
    # stored in the same group commit, whose handler resumed later, was counted twice
    # (with a quota of 2, the second webhook got 429). "webhook first" failed there.
    _token(client, tmp_path)
    deliveries, store = _deliveries(client), _store(client)
    store.claim_name("alice", "alice")
    blocked, release = threading.Event(), threading.Event()
    real = store.transaction

    def held(ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        if not blocked.is_set():
            blocked.set()
            release.wait(WAIT)
        return real(ops)

    monkeypatch.setattr(store, "transaction", held)
    monkeypatch.setattr(store, "transaction_now", lambda ops: None)  # commits go to the thread
    first = asyncio.ensure_future(deliveries.commits.write(lambda db: None))  # holds the committer
    assert await asyncio.to_thread(blocked.wait, WAIT)

    def waiting() -> list[str]:  # what waits for the next commit: "insert", "recount"
        kinds = []
        for op, *_ in deliveries.commits._pending:
            if isinstance(op, NewEvent):
                kinds.append("insert")
            elif getattr(op, "__qualname__", "").startswith("Store.pending_totals_op"):
                kinds.append("recount")
        return kinds

    expected = ["recount", "insert"] if order == "recount first" else ["insert", "recount"]
    recount = post = None
    for kind in expected:
        if kind == "recount":
            recount = asyncio.ensure_future(deliveries.recount())
        else:
            post = asyncio.create_task(_post(client))  # no agent: stored and queued
        await _until(lambda kind=kind: kind in waiting(), f"the {kind} to wait for the commit")
    # (The periodic recount may wait there too: the count must come out right all the same.)
    assert post is not None and recount is not None
    release.set()  # the insert and the read: one transaction
    status, _ = await asyncio.wait_for(post, WAIT)
    await asyncio.wait_for(asyncio.gather(first, recount), WAIT)
    assert status == 202
    assert deliveries.waiting("alice") == 1


# -- (b) the dispatcher's bookkeeping stays bounded --------------------------------------------------


async def test_ended_ids_stay_bounded_while_the_dispatcher_sleeps(client: TestClient, tmp_path: Path) -> None:
    # Before issue 7 every release added its event id to Dispatcher._ended, emptied only
    # when the dispatcher read its next batch: asleep, it grew by one id per webhook
    # (300 here). This test failed there.
    token = _token(client, tmp_path)
    await _settings(client, token, max_concurrency=8)  # also starts the dispatcher
    dispatcher = _dispatcher(client)
    assert dispatcher.task is not None
    agent = await _connect(client, tmp_path, auto=200)
    statuses: list[int | None] = []
    for _ in range(300 // 6):
        statuses += [status for status, _ in await asyncio.gather(*(_post(client) for _ in range(6)))]
    assert statuses == [200] * 300  # each one inline, the app's own answer
    assert len(dispatcher._ended) <= BATCH
    assert not dispatcher.task.done()  # asleep, not dead
    assert len(agent.seen) == 300
    assert _repeats(agent.seen) == {}
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "the records to be written")
    assert len(dispatcher._ended) <= BATCH
    await agent.close()


# -- (c) no busy loop while everything due is in flight ----------------------------------------------


@pytest.mark.parametrize("queued", [1, 2])
async def test_no_busy_loop_while_everything_due_is_in_flight(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queued: int
) -> None:
    token = _token(client, tmp_path)
    await _settings(client, token, max_concurrency=1)
    ids = []
    for _ in range(queued):
        status, headers = await _post(client)  # no agent: queued, due now
        assert status == 202
        ids.append(headers["X-Relay-Event"])
    store = _store(client)
    calls = collections.Counter[str]()
    for name in ("due", "next_due_at"):
        real = getattr(store, name)

        def counting(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(store, name, counting)

    agent = await _connect(client, tmp_path, auto=None)
    held = await agent.next_request()  # the dispatcher's attempt, held unanswered
    assert held.head.event_id == ids[0]
    dispatcher = _dispatcher(client)
    assert dispatcher.in_flight == {ids[0]}
    before = dict(calls)
    # Give a spinning dispatcher every chance: 200 turns of the loop, with time for
    # its store queries in their threads. It would query thousands of times.
    for _ in range(200):
        await asyncio.sleep(0.001)
    spent = {name: calls[name] - before.get(name, 0) for name in ("due", "next_due_at")}
    assert spent["due"] <= 5, spent
    assert spent["next_due_at"] <= 5, spent
    assert agent.requests.empty()  # max_concurrency 1: nothing else was sent meanwhile

    # And the dispatcher is not stuck: the answer frees the slot, the rest is delivered.
    await agent.answer(held, 200)
    for event_id in ids[1:]:
        opened = await agent.next_request()
        assert opened.head.event_id == event_id
        await agent.answer(opened, 200)
    await _until(lambda: _statuses_of(client, token, set(ids), "delivered"), "everything to be delivered")
    assert _repeats(agent.seen) == {}
    await agent.close()


# -- (d) a full store never causes a storm -------------------------------------------------------------


async def test_a_full_store_never_causes_a_storm_and_every_outcome_is_written_later(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(delivery_module, "RERECORD_FIRST", 0.01)
    monkeypatch.setattr(delivery_module, "RERECORD_CAP", 0.05)
    token = _token(client, tmp_path)
    _store(client).claim_name("alice", "alice")
    # A fixed 8: auto could add a slot on the first answers, before the failure is seen.
    await _settings(client, token, max_concurrency=8)
    ids = []
    for _ in range(20):
        status, headers = await _post(client)  # no agent: queued
        assert status == 202
        ids.append(headers["X-Relay-Event"])
    deliveries = _deliveries(client)
    full = FailingUpdates(monkeypatch)

    with caplog.at_level(logging.INFO, logger="relay.server"):
        agent = await _connect(client, tmp_path, auto=200)
        # The first outcomes cannot be written; the kept ones are tried again, with
        # backoff, several times over (a bounded number of rounds, counted).
        await _until(lambda: full.failed >= 6, "outcomes to be written (and fail) several times")
        seen_while_full = list(agent.seen)
        assert seen_while_full, "the agent got nothing"
        assert _repeats(seen_while_full) == {}  # no storm: not one event sent twice
        assert set(seen_while_full) <= set(ids)
        assert len(seen_while_full) <= 8  # at most the attempts started before the failure
        # While outcomes cannot be written, nothing new is attempted.
        assert not deliveries.recording_ok.is_set()
        store_errors = [
            r for r in caplog.records if r.levelno >= logging.ERROR and r.getMessage().startswith("store:")
        ]
        assert 1 <= len(store_errors) <= 2, [r.getMessage() for r in store_errors]

        # The store is back: every kept outcome is written, the rest delivered, none twice.
        full.failing = False
        await _until(lambda: _statuses_of(client, token, set(ids), "delivered"), "all 20 to be delivered")
        await _until(lambda: deliveries.recording_ok.is_set(), "recording to resume")
    assert sorted(agent.seen) == sorted(ids)
    assert _repeats(agent.seen) == {}
    assert any("outcomes written after the store recovered" in r.getMessage() for r in caplog.records)
    await agent.close()


# -- (e) with other webhooks in flight, a webhook and its first outcome are one write ------------------


class Writes:
    """Counts the outcome writes (``Store.update_delivery_op``) made for each event seq."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.updates: list[int] = []
        real = Store.update_delivery_op

        def update_delivery_op(delivery: Delivery) -> Callable[[sqlite3.Connection], bool]:
            self.updates.append(delivery.event_seq)
            return real(delivery)

        monkeypatch.setattr(Store, "update_delivery_op", staticmethod(update_delivery_op))


async def _event(client: TestClient, token: str, event_id: str) -> dict[str, Any]:
    status, answer = await _api(client, "GET", f"events/{event_id}", token)
    assert status == 200, answer
    return answer


async def _busy_tunnel(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, FakeAgent, Open, asyncio.Task[tuple[int | None, dict[str, str]]]]:
    """Alice's tunnel with one webhook in the app's hands, unanswered (so the next one's
    first attempt is not alone); the wait for a first answer is made long, so that no
    verdict depends on how fast this machine answers."""
    monkeypatch.setattr(delivery_module, "FIRST_OUTCOME_WAIT", WAIT)
    token = _token(client, tmp_path)
    await _settings(client, token, max_concurrency=4)
    agent = await _connect(client, tmp_path, auto=None)
    first = asyncio.create_task(_post(client, b'{"n":"first"}'))
    return token, agent, await agent.next_request(), first


async def _tunnel(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy: bool
) -> tuple[str, FakeAgent, Open | None, asyncio.Task[tuple[int | None, dict[str, str]]] | None]:
    """Alice's tunnel with an agent the test answers by hand: busy as ``_busy_tunnel``
    makes it (its held webhook and that sender), or with nothing in flight (None, None)."""
    if busy:
        return await _busy_tunnel(client, tmp_path, monkeypatch)
    token = _token(client, tmp_path)
    return token, await _connect(client, tmp_path, auto=None), None, None


async def _answer_held(
    agent: FakeAgent, held: Open | None, first: asyncio.Task[tuple[int | None, dict[str, str]]] | None
) -> None:
    """Answer the webhook ``_busy_tunnel`` left in the app's hands (if any): its sender gets 200."""
    if held is not None and first is not None:
        await agent.answer(held, 200)
        assert (await asyncio.wait_for(first, WAIT))[0] == 200


@pytest.mark.parametrize(
    ("answer", "sender_gets", "stored_as", "waiting"),
    [(200, 200, "delivered", 0), (503, 202, "retrying", 1), (410, 410, "dead", 0)],
)
async def test_with_others_in_flight_a_webhook_is_stored_with_its_first_answer_in_one_write(
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: int,
    sender_gets: int,
    stored_as: str,
    waiting: int,
) -> None:
    writes = Writes(monkeypatch)
    token, agent, held, first = await _busy_tunnel(client, tmp_path, monkeypatch)
    second = asyncio.create_task(_post(client, b'{"n":"second"}'))
    opened = await agent.next_request()
    await agent.answer(opened, answer)
    status, headers = await asyncio.wait_for(second, WAIT)
    assert status == sender_gets
    # Stored with its outcome before the sender had its answer: the API shows it at
    # once, with its history, and no second write was made for it.
    shown = await _event(client, token, opened.head.event_id)
    delivery = shown["deliveries"][0]
    assert (delivery["status"], delivery["attempts"], delivery["last_status"]) == (stored_as, 1, answer)
    assert [a["status"] for a in delivery["history"]] == [answer]
    assert writes.updates == []
    if answer == 503:
        assert headers["X-Relay-Event"] == opened.head.event_id
        assert delivery["next_attempt_at"] is not None
    # Counted in the quota only while it waits (the held one waits too).
    assert _deliveries(client).waiting("alice") == waiting + 1

    await agent.answer(held, 200)  # alone when it started: stored first, recorded after
    assert (await asyncio.wait_for(first, WAIT))[0] == 200
    await _until(lambda: len(writes.updates) == 1, "the first webhook's outcome to be written")
    await _until(lambda: _deliveries(client).waiting("alice") == waiting, "the quota to count it out")
    dispatcher = _dispatcher(client)
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "both slots back")
    assert [s.open_streams for s in _registry(client).sessions()] == [0]
    await agent.close()


async def test_a_sender_who_leaves_while_its_first_answer_is_awaited_still_has_it_stored(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, agent, held, first = await _busy_tunnel(client, tmp_path, monkeypatch)
    left = asyncio.Event()
    real_spawn = _deliveries(client).tasks.spawn

    def spawn(coro: Any, name: str) -> Any:
        if "whose sender left" in name:
            left.set()
        return real_spawn(coro, name)

    monkeypatch.setattr(_deliveries(client).tasks, "spawn", spawn)
    sender = asyncio.create_task(_post(client, b'{"n":"second"}'))
    opened = await agent.next_request()  # its handler waits for this answer to store both
    sender.cancel()  # the sender hangs up meanwhile
    await asyncio.wait_for(left.wait(), WAIT)
    await agent.answer(opened, 200)
    await _until(
        lambda: _statuses_of(client, token, {opened.head.event_id}, "delivered"), "the webhook to be stored"
    )
    await _answer_held(agent, held, first)
    dispatcher = _dispatcher(client)
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "both slots back")
    await _until(lambda: _statuses_of(client, token, set(agent.seen), "delivered"), "both delivered")
    assert _repeats(agent.seen) == {}
    await agent.close()


async def test_a_webhook_that_cannot_be_stored_after_its_app_answered_gives_its_stream_back(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The insert failed after the first attempt had its answer: cancelling the finished
    # attempt did nothing, and its stream stayed open on the agent's connection for as
    # long as the connection lived. This case failed so before.
    token, agent, held, first = await _busy_tunnel(client, tmp_path, monkeypatch)
    answered: list[str] = []
    real_attempt = delivery_module.attempt_agent

    async def attempt_agent(session: Any, event: Any, attempt: int, timeout: float) -> Any:
        result = await real_attempt(session, event, attempt, timeout)
        answered.append(event.id)
        return result

    monkeypatch.setattr(delivery_module, "attempt_agent", attempt_agent)
    real_submit = GroupCommitter.submit
    insert: list[asyncio.Future[Any]] = []

    def submit(self: GroupCommitter, op: Any, then: Any = None, **kw: Any) -> asyncio.Future[Any]:
        monkeypatch.setattr(GroupCommitter, "submit", real_submit)  # the next insert is this one's
        insert.append(asyncio.get_running_loop().create_future())
        return insert[0]

    monkeypatch.setattr(GroupCommitter, "submit", submit)
    second = asyncio.create_task(_post(client, b'{"n":"second"}'))
    opened = await agent.next_request()
    await agent.answer(opened, 200)
    await _until(lambda: insert and answered == [opened.head.event_id], "the app's answer and the insert")
    insert[0].set_exception(StoreError("injected: the store is down"))  # it fails after the answer
    status, headers = await asyncio.wait_for(second, WAIT)
    assert (status, headers.get("X-Relay-Error")) == (503, "store-unavailable")
    assert opened.head.event_id not in await _statuses(client, token)  # never a false 2xx

    await _answer_held(agent, held, first)
    dispatcher = _dispatcher(client)
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "both slots back")
    assert [s.open_streams for s in _registry(client).sessions()] == [0]
    await agent.close()


def _suspended_line(task: asyncio.Task[Any], name: str) -> int | None:
    """The line at which ``task`` waits inside coroutine function ``name`` (None: not in it)."""
    coro: Any = task.get_coro()
    while coro is not None:
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_name == name:
            return int(coro.cr_frame.f_lineno)
        coro = getattr(coro, "cr_await", None)
    return None


async def test_a_sender_who_leaves_while_its_unstored_webhook_is_cut_short_leaks_no_stream(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a review: the cut-short of the answered attempt ran in the sender's
    # handler, and a sender hanging up at that moment cancelled it halfway, before the
    # stream was finished: it stayed open on the agent's connection. This case failed so.
    token, agent, held, first = await _busy_tunnel(client, tmp_path, monkeypatch)
    real_submit = GroupCommitter.submit
    insert: list[asyncio.Future[Any]] = []
    handler: list[asyncio.Task[Any]] = []

    def submit(self: GroupCommitter, op: Any, then: Any = None, **kw: Any) -> asyncio.Future[Any]:
        monkeypatch.setattr(GroupCommitter, "submit", real_submit)  # the next insert is this one's
        task = asyncio.current_task()
        assert task is not None
        handler.append(task)  # the sender's request handler
        insert.append(asyncio.get_running_loop().create_future())
        return insert[0]

    monkeypatch.setattr(GroupCommitter, "submit", submit)
    second = asyncio.create_task(_post(client, b'{"n":"second"}'))
    opened = await agent.next_request()
    await agent.answer(opened, 200)
    await _until(lambda: insert, "the insert, made once the app answered")
    await asyncio.sleep(0)
    committing = _suspended_line(handler[0], "_accept_body")
    assert committing is not None
    insert[0].set_exception(StoreError("injected: the store is down"))
    for _ in range(100):  # until the handler is past the commit, cutting the attempt short
        await asyncio.sleep(0)
        if _suspended_line(handler[0], "_accept_body") not in (committing, None):
            break
    else:
        raise AssertionError("the handler never went on from the failed commit")
    handler[0].cancel()  # the sender hangs up right then
    await asyncio.wait_for(second, WAIT)

    await _answer_held(agent, held, first)
    dispatcher = _dispatcher(client)
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "both slots back")
    assert opened.head.event_id not in await _statuses(client, token)
    await _until(lambda: [s.open_streams for s in _registry(client).sessions()] == [0], "no stream left open")
    await agent.close()


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "with others in flight"])
async def test_a_first_attempt_the_agent_refused_goes_again_a_second_later(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    # The README: an attempt that never reached the app "is made again a second later".
    # The first attempt's delivery carried its lease (--timeout + 30 s) as its next
    # attempt, and settling took the later of the two: a minute, not a second. Both
    # cases failed so before.
    token, agent, held, first = await _tunnel(client, tmp_path, monkeypatch, busy)
    sender = asyncio.create_task(_post(client, b'{"n":"refused"}'))
    opened = await agent.next_request()
    await agent.ws.send_bytes(agent.conn.send(Reset(opened.stream_id, RESET_REFUSED, "not now")))
    status, headers = await asyncio.wait_for(sender, WAIT)
    assert (status, headers["X-Relay-Event"]) == (202, opened.head.event_id)
    again = await agent.next_request()  # within WAIT (10 s), not a minute later
    assert again.head.event_id == opened.head.event_id
    assert _header(again, b"X-Relay-Attempt") == [b"2"]
    await agent.answer(again, 200)
    await _until(lambda: _statuses_of(client, token, {opened.head.event_id}, "delivered"), "its delivery")
    shown = (await _event(client, token, opened.head.event_id))["deliveries"][0]
    assert [a["status"] for a in shown["history"]] == [None, 200]  # the refusal spent no step
    await _answer_held(agent, held, first)
    await agent.close()


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "with others in flight"])
async def test_an_insert_that_fails_with_a_bug_cuts_its_first_attempt_short(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    # Found by a review: only StoreError cut the first attempt short; a bug in the
    # insert (any other exception) left its stream open on the agent's connection.
    token, agent, held, first = await _tunnel(client, tmp_path, monkeypatch, busy)
    real = Store.insert_event_op

    def insert_event_op(event: Any, deliveries: Any) -> Callable[[sqlite3.Connection], int]:
        monkeypatch.setattr(Store, "insert_event_op", staticmethod(real))  # this one only

        def op(db: sqlite3.Connection) -> int:
            raise RuntimeError("injected: a bug in the insert")

        return op

    monkeypatch.setattr(Store, "insert_event_op", staticmethod(insert_event_op))
    sender = asyncio.create_task(_post(client, b'{"n":"bug"}'))
    opened = await agent.next_request()
    await agent.answer(opened, 200)
    status, _ = await asyncio.wait_for(sender, WAIT)
    assert status == 500  # never a false 2xx
    assert opened.head.event_id not in await _statuses(client, token)
    await _answer_held(agent, held, first)
    dispatcher = _dispatcher(client)
    await _until(lambda: not dispatcher.in_flight and not dispatcher.recording, "the slots back")
    await _until(lambda: [s.open_streams for s in _registry(client).sessions()] == [0], "no stream left open")
    await agent.close()
