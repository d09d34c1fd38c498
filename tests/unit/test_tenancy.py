"""Tenants stay apart over time (issue 8 §6), unit by unit: the registry's owners, the
store's release, the watch loop's verdicts, and ``relay-server names release``.

The end-to-end side (real processes, the admin CLI beside a running server) is
``tests/e2e/test_tenancy.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_server import cli
from relay_server.commits import GroupCommitter
from relay_server.delivery import Deliveries, QueueConfig
from relay_server.registry import Registry
from relay_server.settings import TunnelSettings
from relay_server.states import Outcome
from relay_server.store import NAME_RELEASED, Delivery, Event, Store
from relay_server.tokens import Claims
from relay_server.watch import Watch


class FakeSession:
    """What the registry and the watch loop look at in an ``AgentSession``."""

    def __init__(self, user: str, *names: str, label: str = "laptop") -> None:
        self.user = user
        self.names = list(names)
        self.label = label
        self.closed = False
        self.id = f"{user}-{'-'.join(names)}"
        self.closes: list[tuple[int, str]] = []

    async def close(self, code: int, reason: str) -> None:
        self.closed = True
        self.closes.append((code, reason))


def _add(registry: Registry, session: FakeSession, token_id: str = "t", expires_at: float = 2e9) -> None:
    registry.add(session, token_id, expires_at)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    for user in ("alice", "bob"):
        store.record_token(Claims(user, [user], f"token-{user}", int(time.time()) + 3600))
    return store


def _event(store: Store, tunnel: str, user: str, *deliveries: tuple[str, str]) -> int:
    """Store an event of ``user`` on ``tunnel`` with (destination, status) deliveries."""
    event = Event(
        0, f"evt_{tunnel}_{user}_{time.monotonic_ns()}", tunnel, user, time.time(), "POST", b"/", (), "", b"x"
    )
    op = Store.insert_event_op(
        event, [Delivery(0, tunnel, d, status, 0, time.time()) for d, status in deliveries]
    )
    return int(store.transaction([op])[0])


def _statuses(store: Store, seq: int) -> list[tuple[str, str, str | None]]:
    return [(d.destination, d.status, d.dead_reason) for d in store.deliveries(seq)]


# -- the registry never hands out another tenant's session -------------------------------------------


def test_pick_never_returns_a_session_of_a_user_who_no_longer_owns_the_name() -> None:
    registry = Registry()
    registry.set_owners({"shared": "alice"})
    alice = FakeSession("alice", "shared")
    _add(registry, alice)
    assert registry.pick("shared") is alice

    # Released by the admin and claimed by bob before alice's session is closed:
    registry.set_owners({})
    assert registry.pick("shared") is None
    registry.claimed("shared", "bob")
    assert registry.pick("shared") is None
    bob = FakeSession("bob", "shared")
    _add(registry, bob)
    assert [registry.pick("shared") for _ in range(4)] == [bob] * 4
    assert registry.pick("shared", "laptop") is bob
    assert registry.pick("shared", owner="alice") is None


def test_pick_by_owner() -> None:
    registry = Registry()  # owners not loaded yet: only the owner argument filters
    alice, bob = FakeSession("alice", "n"), FakeSession("bob", "n")
    _add(registry, alice)
    _add(registry, bob)
    assert {registry.pick("n", owner="bob") for _ in range(3)} == {bob}
    assert registry.pick("n", owner="carol") is None


def test_owner_changes_are_reported_once_and_only_when_a_name_changes_hands() -> None:
    registry = Registry()
    seen: list[str] = []
    registry.on_owner_change.append(seen.append)
    assert registry.set_owners({"a": "alice", "b": "bob"}) == set()  # the first load
    registry.claimed("c", "carol")  # a free name claimed: no hands changed
    registry.claimed("a", "alice")
    assert seen == []
    assert registry.set_owners({"a": "alice", "b": "bob", "c": "carol"}) == set()
    # "b" released, "a" released and taken by bob (both seen by the watch at once)
    assert registry.set_owners({"a": "bob", "c": "carol"}) == {"a", "b"}
    assert sorted(seen) == ["a", "b"]
    assert registry.owner_changed("a", "alice") and not registry.owner_changed("a", "bob")
    assert registry.owner_changed("b", "bob")  # released: bob's old events must not retry
    assert not registry.owner_changed("c", "carol")
    # Released and claimed by another user in this process before the watch saw it:
    registry.claimed("c", "dave")
    assert seen[-1] == "c"
    registry.claimed("b", "bob")  # bob takes back his released name: his again
    assert not registry.owner_changed("b", "bob")


def test_a_claim_made_while_the_store_was_read_is_not_taken_for_a_release() -> None:
    registry = Registry()
    seen: list[str] = []
    registry.on_owner_change.append(seen.append)
    registry.set_owners({})
    read_at = registry.owners_version
    registry.claimed("new", "alice")  # an agent claims it while the watch reads the store
    assert registry.set_owners({}, read_at) == set()  # the read predates the claim
    assert (registry.owner("new"), seen) == ("alice", [])
    assert not registry.owner_changed("new", "alice")
    assert registry.set_owners({"new": "alice"}, registry.owners_version) == set()
    assert registry.set_owners({}, registry.owners_version) == {"new"}  # now a release
    assert seen == ["new"]


# -- the store's release ---------------------------------------------------------------------------


def test_release_removes_settings_and_kills_waiting_events_in_one_go(store: Store) -> None:
    store.claim_name("shared", "alice")
    store.save_tunnel_settings("shared", "alice", {"destinations": ["agent:*", "https://alice.example/in"]})
    waiting = _event(
        store, "shared", "alice", ("agent:*", "pending"), ("https://alice.example/in", "retrying")
    )
    half = _event(store, "shared", "alice", ("agent:*", "delivered"), ("https://alice.example/in", "pending"))
    done = _event(store, "shared", "alice", ("agent:*", "delivered"))
    other = _event(store, "other", "alice", ("agent:*", "pending"))
    assert store.waiting_events("shared") == 2

    released = store.release("shared")
    assert released is not None
    assert (released.owner, released.events, released.settings) == ("alice", 2, True)
    assert store.name_owner("shared") is None
    assert store.tunnel_settings("shared") is None
    assert store.waiting_events("shared") == 0
    assert _statuses(store, waiting) == [
        ("agent:*", "dead", NAME_RELEASED),
        ("https://alice.example/in", "dead", NAME_RELEASED),
    ]
    assert _statuses(store, half) == [
        ("agent:*", "delivered", None),
        ("https://alice.example/in", "dead", NAME_RELEASED),
    ]
    assert _statuses(store, done) == [("agent:*", "delivered", None)]
    assert _statuses(store, other) == [("agent:*", "pending", None)]
    # Still the owner's to read (a replay is refused by the API while the name is not hers).
    assert store.find_event("alice", store.find_events("alice", "shared", None, 10)[0][0].id) is not None
    assert store.release("shared") is None
    assert store.release_name("shared") is False


def test_end_foreign_waiting_spares_the_new_owners_events(store: Store) -> None:
    old = _event(store, "shared", "alice", ("agent:*", "retrying"))
    new = _event(store, "shared", "bob", ("agent:*", "pending"))
    assert store.end_foreign_waiting("shared", "bob", NAME_RELEASED) == 1
    assert _statuses(store, old) == [("agent:*", "dead", NAME_RELEASED)]
    assert _statuses(store, new) == [("agent:*", "pending", None)]
    assert store.end_foreign_waiting("shared", None, NAME_RELEASED) == 1  # free: nobody's wait
    assert _statuses(store, new) == [("agent:*", "dead", NAME_RELEASED)]


def test_revoked_tokens_and_name_owners(store: Store) -> None:
    assert store.revoked_tokens(["token-alice", "token-bob", "nope"]) == set()
    assert store.revoke_token("token-bob")
    assert store.revoked_tokens(["token-alice", "token-bob", "nope"]) == {"token-bob"}
    assert store.revoked_tokens([]) == set()
    store.claim_name("a", "alice")
    store.claim_name("b", "bob")
    assert store.name_owners() == {"a": "alice", "b": "bob"}


# -- the watch loop --------------------------------------------------------------------------------


@pytest.fixture
async def stack(store: Store) -> AsyncIterator[tuple[Store, Registry, Deliveries, Watch]]:
    registry = Registry()
    commits = GroupCommitter(store)
    commits.start()
    deliveries = Deliveries(store=store, commits=commits, registry=registry, config=QueueConfig())
    watch = Watch(store=store, registry=registry, deliveries=deliveries)
    store.claim_name("shared", "alice")
    store.claim_name("bobs", "bob")
    registry.set_owners(store.name_owners())
    try:
        yield store, registry, deliveries, watch
    finally:
        await deliveries.stop()
        await commits.stop()


async def test_the_watch_closes_sessions_of_revoked_and_expired_tokens(
    stack: tuple[Store, Registry, Deliveries, Watch],
) -> None:
    store, registry, _, watch = stack
    now = time.time()
    revoked, expiring, fine = (
        FakeSession("alice", "shared"),
        FakeSession("bob", "bobs"),
        FakeSession("alice", "shared"),
    )
    _add(registry, revoked, "token-alice", now + 3600)
    _add(registry, expiring, "token-bob", now + 10)
    _add(registry, fine, "another-token", now + 3600)
    assert await watch.check(now) == 0

    store.revoke_token("token-alice")
    assert await watch.check(now) == 1
    assert revoked.closes == [(4001, "token revoked")]
    assert await watch.check(now + 11) == 1
    assert expiring.closes == [(4001, "token expired")]
    assert fine.closes == []


async def test_the_watch_acts_on_a_released_name(stack: tuple[Store, Registry, Deliveries, Watch]) -> None:
    store, registry, deliveries, watch = stack
    alice, bob = FakeSession("alice", "shared", "alice"), FakeSession("bob", "bobs")
    store.claim_name("alice", "alice")
    registry.claimed("alice", "alice")
    _add(registry, alice)
    _add(registry, bob)
    await deliveries.save_settings(
        "shared", "alice", TunnelSettings().updated({"destinations": ["https://a.example/"]})
    )
    assert ("shared", "https://a.example/") in deliveries._dispatchers

    store.release("shared")
    # An attempt in flight at the release writes "retrying" over the release's "dead":
    late = _event(store, "shared", "alice", ("agent:*", "retrying"))
    assert await watch.check() == 1
    assert alice.closes == [(4003, "name 'shared' was released by the server admin")]
    assert bob.closes == []
    assert _statuses(store, late) == [("agent:*", "dead", NAME_RELEASED)]
    # Nothing of alice's tunnel is cached for the next owner.
    assert "shared" not in deliveries._settings
    assert not [key for key in deliveries._dispatchers if key[0] == "shared"]
    assert (await deliveries.settings("shared")).destinations == ("agent:*",)
    assert await watch.check() == 0


async def test_an_outcome_written_after_the_release_is_seen_is_dead(
    stack: tuple[Store, Registry, Deliveries, Watch],
) -> None:
    store, registry, deliveries, watch = stack
    seq = _event(store, "shared", "alice", ("agent:*", "pending"))
    [(event, delivery)] = store.due("shared", "agent:*", float("inf"), 0, 10)
    store.release("shared")
    await watch.check()
    store.claim_name("shared", "bob")
    registry.claimed("shared", "bob")
    failed = Outcome(503, None)  # the app failed: it would be retried
    updated = await deliveries.record(event, delivery, failed, TunnelSettings(), scheduled=True)
    assert (updated.status, updated.dead_reason) == ("dead", NAME_RELEASED)
    assert _statuses(store, seq) == [("agent:*", "dead", NAME_RELEASED)]


async def test_a_session_on_a_name_another_user_holds_now_is_closed(
    stack: tuple[Store, Registry, Deliveries, Watch],
) -> None:
    store, registry, _, watch = stack
    alice = FakeSession("alice", "shared")
    _add(registry, alice)
    store.release("shared")
    store.claim_name("shared", "bob")
    assert await watch.check() == 1
    assert alice.closes == [(4003, "name 'shared' belongs to another user")]


async def test_an_agent_claiming_a_name_during_a_watch_round_is_not_closed(
    stack: tuple[Store, Registry, Deliveries, Watch], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, registry, _, watch = stack
    seq = _event(store, "other", "alice", ("agent:*", "pending"))
    newcomer = FakeSession("alice", "other")
    read = store.name_owners

    def read_then_claim() -> dict[str, str]:
        owners = read()  # the store is read before the agent's claim ...
        store.claim_name("other", "alice")  # ... which lands before the round goes on
        registry.claimed("other", "alice")
        _add(registry, newcomer)
        return owners

    monkeypatch.setattr(store, "name_owners", read_then_claim)
    assert await watch.check() == 0
    assert newcomer.closes == []
    assert _statuses(store, seq) == [("agent:*", "pending", None)]
    monkeypatch.setattr(store, "name_owners", read)
    assert await watch.check() == 0
    assert registry.pick("other") is newcomer


# -- relay-server names release ----------------------------------------------------------------------


def _release(data_dir: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli.main, ["names", "release", *args, "--data-dir", str(data_dir)], input=input
    )
    return result.exit_code, result.output


def test_release_without_yes_off_a_terminal_refuses_and_counts(store: Store, tmp_path: Path) -> None:
    store.claim_name("shared", "alice")
    _event(store, "shared", "alice", ("agent:*", "pending"))
    _event(store, "shared", "alice", ("agent:*", "retrying"), ("https://a.example/", "delivered"))
    code, output = _release(tmp_path, "shared")
    assert code == 1
    assert (
        "not releasing 'shared' (held by alice) without --yes: 2 events waiting for delivery would be dead"
        in output
    )
    assert store.name_owner("shared") == "alice"

    code, output = _release(tmp_path, "shared", "--yes")
    assert code == 0, output
    assert "released shared (held by alice): 2 events dead" in output
    assert store.name_owner("shared") is None


def test_release_on_a_terminal_asks_first(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    store.claim_name("shared", "alice")
    _event(store, "shared", "alice", ("agent:*", "pending"))
    code, output = _release(tmp_path, "shared", input="n\n")
    assert code == 1
    assert "releasing 'shared' (held by alice): 1 event waiting for delivery would be dead" in output
    assert "Release it?" in output
    assert store.name_owner("shared") == "alice"
    code, output = _release(tmp_path, "shared", input="y\n")
    assert code == 0, output
    assert "1 event dead" in output
    assert store.name_owner("shared") is None


def test_releasing_a_free_name_fails(tmp_path: Path) -> None:
    code, output = _release(tmp_path, "nobody", "--yes")
    assert code == 1
    assert "nobody holds the name 'nobody'" in output
