"""The SQLite store: migrations, WAL, tokens and first-come names."""

from __future__ import annotations

import dataclasses
import functools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay_server import store as store_module
from relay_server.errors import StoreError
from relay_server.store import DB_FILE, MIGRATIONS, Delivery, Event, NameRecord, Store, changed
from relay_server.tokens import Claims


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def _claims(user: str = "alice", token_id: str = "t1", names: list[str] | None = None) -> Claims:
    return Claims(user, names if names is not None else [user, f"{user}-*"], token_id, 2_000_000_000)


def _pragma(path: Path, name: str) -> object:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


# -- opening ---------------------------------------------------------------------


def test_new_store_is_at_the_latest_schema_version(tmp_path: Path) -> None:
    Store(tmp_path).close()
    assert _pragma(tmp_path / DB_FILE, "user_version") == len(MIGRATIONS)


def test_migrations_run_once(tmp_path: Path) -> None:
    # A second run of migration 0 would fail on "table users already exists".
    for _ in range(3):
        Store(tmp_path).close()
    assert _pragma(tmp_path / DB_FILE, "user_version") == len(MIGRATIONS)
    db = sqlite3.connect(tmp_path / DB_FILE)
    tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    db.close()
    assert {"names", "tokens", "users", "tunnels", "events", "deliveries"} <= set(tables)


def test_store_is_in_wal_mode(tmp_path: Path) -> None:
    Store(tmp_path).close()
    # journal_mode=WAL is persistent: a fresh connection sees it.
    assert _pragma(tmp_path / DB_FILE, "journal_mode") == "wal"


def test_store_creates_its_directory(tmp_path: Path) -> None:
    Store(tmp_path / "a" / "b").close()
    assert (tmp_path / "a" / "b" / DB_FILE).is_file()


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    first = Store(tmp_path)
    first.record_token(_claims())
    first.claim_name("alice", "alice")
    first.revoke_token("t1")
    first.close()
    second = Store(tmp_path)
    try:
        assert [(t.token_id, t.user, t.names) for t in second.list_tokens()] == [
            ("t1", "alice", ["alice", "alice-*"])
        ]
        assert second.is_revoked("t1")
        assert second.name_owner("alice") == "alice"
        assert second.claim_name("alice", "bob") == "alice"
    finally:
        second.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this relay-server"):
        Store(tmp_path)
    # Refusing must not have touched the file.
    assert _pragma(tmp_path / DB_FILE, "user_version") == len(MIGRATIONS) + 1


def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(tmp_path)


# -- tokens ----------------------------------------------------------------------


def test_record_and_list_tokens(store: Store) -> None:
    store.record_token(_claims("alice", "t1"))
    store.record_token(_claims("bob", "t2", ["bob"]))
    records = store.list_tokens()
    assert [(r.token_id, r.user, r.names, r.expires_at, r.revoked_at) for r in records] == [
        ("t1", "alice", ["alice", "alice-*"], 2_000_000_000, None),
        ("t2", "bob", ["bob"], 2_000_000_000, None),
    ]
    assert records[0].created_at <= records[1].created_at


def test_a_token_id_is_recorded_once(store: Store) -> None:
    store.record_token(_claims("alice", "t1"))
    with pytest.raises(StoreError):
        store.record_token(_claims("alice", "t1"))
    assert len(store.list_tokens()) == 1


def test_revoke_token(store: Store) -> None:
    store.record_token(_claims("alice", "t1"))
    store.record_token(_claims("alice", "t2"))
    assert not store.is_revoked("t1")
    assert store.revoke_token("t1") is True
    assert store.is_revoked("t1")
    assert not store.is_revoked("t2")
    assert store.revoke_token("t1") is False  # already revoked
    revoked = {r.token_id: r.revoked_at for r in store.list_tokens()}
    assert revoked["t1"] is not None
    assert revoked["t2"] is None


def test_revoking_an_unknown_token(store: Store) -> None:
    assert store.revoke_token("nope") is False
    assert store.is_revoked("nope") is False


# -- names -----------------------------------------------------------------------


def test_claim_name_is_first_come(store: Store) -> None:
    assert store.name_owner("alice") is None
    assert store.claim_name("alice", "alice") == "alice"
    assert store.claim_name("alice", "bob") == "alice"  # the first owner comes back
    assert store.claim_name("alice", "alice") == "alice"
    assert store.name_owner("alice") == "alice"
    assert [(r.name, r.user) for r in store.list_names()] == [("alice", "alice")]


def test_list_names_is_sorted(store: Store) -> None:
    store.claim_name("zed", "bob")
    store.claim_name("alice", "alice")
    store.claim_name("alice-dev", "alice")
    names = store.list_names()
    assert [(r.name, r.user) for r in names] == [
        ("alice", "alice"),
        ("alice-dev", "alice"),
        ("zed", "bob"),
    ]
    assert all(isinstance(r, NameRecord) and r.claimed_at > 0 for r in names)


def test_release_name(store: Store) -> None:
    store.claim_name("alice", "alice")
    assert store.release_name("alice") is True
    assert store.name_owner("alice") is None
    assert store.release_name("alice") is False
    assert store.claim_name("alice", "bob") == "bob"  # free again: next comer gets it


def test_concurrent_claims_have_one_winner(store: Store) -> None:
    owners: list[str] = []
    barrier = threading.Barrier(8)

    def claim(user: str) -> None:
        barrier.wait()
        owners.append(store.claim_name("shared", user))

    threads = [threading.Thread(target=claim, args=(f"user{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(owners) == 8
    assert len(set(owners)) == 1
    assert owners[0] == store.name_owner("shared")


@pytest.mark.parametrize(
    ("record", "changes"),
    [
        (Event(0, "evt_1", "bob", "u", 1.5, "POST", b"/x", ((b"A", b"1"),), "c", b"body"), {"seq": 7}),
        (Event(3, "evt_2", "bob", "u", 1.5, "GET", b"/", (), "", b""), {"body": b"again", "seq": 4}),
        (Delivery(0, "bob", "agent:any", "pending", 0, 2.0), {"event_seq": 9}),
        (
            Delivery(5, "bob", "agent:any", "retrying", 2, 3.0, 503, None, 2),
            {"attempts": 3, "last_status": 200, "last_error": None, "status": "delivered"},
        ),
    ],
)
def test_changed_is_dataclasses_replace(record: Event | Delivery, changes: dict[str, Any]) -> None:
    before = dataclasses.astuple(record)
    copy = changed(record, **changes)
    assert copy == dataclasses.replace(record, **changes)
    assert type(copy) is type(record) and copy is not record
    assert dataclasses.astuple(record) == before  # the original is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.status = "x"  # type: ignore[misc, union-attr]


def test_changed_refuses_what_is_not_a_field_as_replace_does() -> None:
    delivery = Delivery(0, "bob", "agent:any", "pending")
    with pytest.raises(TypeError, match="no field 'colour'"):
        changed(delivery, colour="red")
    with pytest.raises(TypeError):
        dataclasses.replace(delivery, colour="red")  # type: ignore[call-arg]


def test_changed_copies_a_subclass_as_replace_does() -> None:
    @dataclasses.dataclass(frozen=True)
    class Marked(Delivery):
        mark: str = ""

    delivery = Marked(0, "bob", "agent:any", "pending", mark="m")
    assert changed(delivery, status="delivered") == dataclasses.replace(delivery, status="delivered")


@pytest.mark.parametrize(
    "extra",
    [
        {"__post_init__": lambda self: None},
        {"waiting": functools.cached_property(lambda self: True)},
    ],
)
def test_a_record_that_is_no_longer_plain_is_refused_at_import(extra: dict[str, Any]) -> None:
    """``changed`` copies fields as they are: a record that runs code when built, or keeps
    more than its fields, must make the store fail to import, not copy it wrongly."""
    kind = dataclasses.dataclass(frozen=True)(type("Grown", (), {"__annotations__": {"a": "int"}, **extra}))
    with pytest.raises(TypeError, match="no longer a plain record"):
        store_module._plain_fields(kind)
    with pytest.raises(TypeError, match="no longer a plain record"):
        store_module._plain_fields(
            dataclasses.make_dataclass("Factory", [("a", list, dataclasses.field(default_factory=list))])
        )
