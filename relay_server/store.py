"""The store: every read and write of persistent state goes through ``Store``.

The embedded backend is SQLite in the data directory, in WAL mode, with
versioned migrations (``PRAGMA user_version``). The interface is small on
purpose so that a second backend (for several nodes) can implement it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from . import names
from .errors import NoRoomForEvents, StoreError, StoreFull
from .tokens import Claims

log = logging.getLogger("relay.server")

DB_FILE = "relay.db"

#: Schema migrations, in order; entry N takes the schema from version N to N+1.
#: Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name),
        names TEXT NOT NULL,            -- JSON list of name patterns
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE names (
        name TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name),
        claimed_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE tunnels (
        name TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        settings TEXT NOT NULL,         -- JSON object, see relay_server.settings
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
        id TEXT NOT NULL UNIQUE,
        tunnel TEXT NOT NULL,
        user TEXT NOT NULL,
        received_at REAL NOT NULL,
        method TEXT NOT NULL,
        target BLOB NOT NULL,
        headers TEXT NOT NULL,          -- JSON [[name, value], ...], bytes as latin-1
        client TEXT NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX events_by_user ON events (user, tunnel, seq);
    CREATE TABLE deliveries (
        event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
        tunnel TEXT NOT NULL,
        destination TEXT NOT NULL,
        status TEXT NOT NULL,           -- queued | failed | delivered | dead
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_status INTEGER,
        last_error TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (event_seq, destination)
    );
    CREATE INDEX deliveries_due ON deliveries (tunnel, destination, status, next_attempt_at, event_seq);
    """,
    # v3 (issue 7): the retry schedule counts failures at the destination, not attempts
    # (an attempt that never reached it spends no step), and states a user can read.
    """
    ALTER TABLE deliveries ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN dead_reason TEXT;
    ALTER TABLE deliveries ADD COLUMN since REAL;  -- the schedule's start: the last replay, else arrival
    UPDATE deliveries SET failures = attempts;
    UPDATE deliveries SET status = 'pending' WHERE status = 'queued';
    UPDATE deliveries SET status = 'retrying' WHERE status = 'failed';
    """,
    # v4 (issue 11): every attempt's outcome and time, for `events show` and the inspector
    # (a delivery row keeps only the last one).
    """
    CREATE TABLE attempts (
        event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
        destination TEXT NOT NULL,
        attempt INTEGER NOT NULL,       -- 1, 2, ... as X-Relay-Attempt
        at REAL NOT NULL,               -- when its outcome was recorded
        status INTEGER,
        error TEXT,
        PRIMARY KEY (event_seq, destination, attempt)
    );
    """,
    # v5: a waiting delivery's row holds the room its next outcome takes (OUTCOME_ROOM), so
    # that writing the outcome never grows it: a full store still records every outcome.
    """
    ALTER TABLE deliveries ADD COLUMN room BLOB;
    """,
    # v6: the names a user holds, counted at every claim (``--max-names-per-user``).
    """
    CREATE INDEX names_by_user ON names (user);
    """,
]

#: Delivery states (the README defines them for users). ``pending``: waiting for
#: its first attempt, or for an agent; ``retrying``: the destination failed at least
#: once and the next attempt is scheduled; ``delivered``: the destination answered;
#: ``dead``: given up (``dead_reason`` says why), kept for replay.
STATUSES = ("pending", "retrying", "delivered", "dead")
#: States of a delivery still waiting: the SQL list of them.
_WAITING = "('pending', 'retrying')"
_PENDING_TOTALS = (
    "SELECT e.tunnel, COUNT(*), SUM(LENGTH(e.body)) FROM events e WHERE e.seq IN"
    f" (SELECT event_seq FROM deliveries WHERE status IN {_WAITING}) GROUP BY e.tunnel"
)
#: ``dead_reason`` of the events waiting on a name when an admin released it: kept for
#: their owner to read and replay, never delivered to the name's next owner.
NAME_RELEASED = "name released"
#: Attempts kept in one delivery's history, the newest: five times the default retry
#: schedule. Attempts that spend no step of it (an early pass after TARGET_UP, or an agent
#: arriving) have no other bound until ``--max-age``: a review saw one agent's flood of
#: TARGET_UPs add 300-500 rows a second and fill the store for every tenant.
MAX_ATTEMPTS_KEPT = 50
#: Finished events deleted per round when the store is full, oldest first, so that a
#: new webhook is refused only once nothing finished is left to make room.
PRESSURE_PURGE = 500
#: Rounds of that purge for one transaction before it gives up with ``StoreFull``.
PRESSURE_ROUNDS = 20
#: Share of ``--store-max-bytes`` new events may never fill (at most
#: ``RECORD_RESERVE_MAX``): it is kept for what the events already stored need written,
#: their attempts' outcomes. Without it, a store full of waiting events could not record
#: one outcome, and every tenant's deliveries stopped until ``--max-age`` killed the
#: events (a review filled a 1 MB store with 194 of them: nothing more was delivered,
#: across restarts). An outcome is a row update and one history row (about 100 bytes).
RECORD_RESERVE = 1 / 8
RECORD_RESERVE_MAX = 64 * 1024 * 1024
#: Bytes a waiting delivery's row keeps for what its next outcome writes into it: an
#: error of up to ``states.MAX_ERROR`` (200) bytes, and the row's and its index
#: entries' other changes. Held in the row (``room``, zero bytes given back as the error
#: takes them), so that an outcome never grows a row: the reserve above then needs to hold
#: only the attempts' history, which can be trimmed. A review filled a 2 MB store with
#: 4,773 events of 50 bytes: without it, 2,645 of their first outcomes found no room.
OUTCOME_ROOM = 256
#: How far past ``--store-max-bytes`` a capped store may grow, as a share of it, and only
#: to record the outcomes of what it already accepted (never for a new event): when the
#: room above is not enough all the same (waiting deliveries stored before schema v5 held
#: it, a fan-out delivery's dead reason beside its error). Accepted webhooks' outcomes are
#: never refused for room while it lasts; a review saw a store upgraded full deliver
#: nothing. In steps of ``1 / RECORD_GROWTH_STEPS`` of the cap, with a warning.
RECORD_OVERSHOOT = 1.0
RECORD_GROWTH_STEPS = 64
#: Seconds between two log lines about purges under pressure (each says how many).
PRESSURE_LOG_INTERVAL = 30.0
#: Milliseconds a connection waits for SQLite's write lock held by another connection
#: (the admin CLI, another process) before the write fails with "database is locked".
BUSY_TIMEOUT_MS = 10_000
#: Bytes of WAL file kept once a checkpoint has emptied it: a WAL that grew while a long
#: read held it (hundreds of MB behind an online backup) is cut back to this, not kept
#: on disk beside the database and its ``--store-max-bytes``.
WAL_KEPT_BYTES = 16 * 1024 * 1024
#: Where the wal-index (the ``-shm`` file) keeps, in native byte order, the last valid
#: frame of the WAL (``mxFrame``, u32 at byte 16) and how many frames a checkpoint has
#: copied back (``nBackfill``, u32 at byte 96); each frame is a 24-byte header and a
#: page. Source: https://www.sqlite.org/walformat.html (sections 2.1 and 4.1).
_WAL_INDEX = struct.Struct("=16xI76xI")
WAL_FRAME_HEADER = 24


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    user: str
    names: list[str]
    created_at: float
    expires_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Event:
    """A stored request: everything needed to deliver it again, byte for byte."""

    seq: int
    id: str
    tunnel: str
    user: str
    received_at: float
    method: str
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    client: str
    body: bytes


@dataclass(frozen=True)
class Delivery:
    """One event's state at one destination."""

    event_seq: int
    tunnel: str
    destination: str
    status: str
    attempts: int = 0
    next_attempt_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    #: Failures at the destination counted by the retry schedule (attempts that
    #: never reached it are counted in ``attempts`` only).
    failures: int = 0
    dead_reason: str | None = None
    #: When this delivery's schedule and max age started: its last replay (None: the
    #: event's arrival).
    since: float | None = None

    @property
    def waiting(self) -> bool:
        return self.status in ("pending", "retrying")


Record = TypeVar("Record", bound=Event | Delivery)


def _plain_fields(kind: type) -> frozenset[str]:
    """The field names of ``kind``, a dataclass whose instances ``changed`` may copy field
    by field: raises ``TypeError`` at import if it ever runs code when built
    (``__post_init__``, a field outside ``__init__``, a default factory) or keeps anything
    beside its fields (``__slots__``, a cached property), which such a copy would skip or
    carry over stale."""
    found = fields(kind)
    if (
        hasattr(kind, "__post_init__")
        or hasattr(kind, "__slots__")
        or any(not field.init or field.default_factory is not MISSING for field in found)
        or any(isinstance(value, functools.cached_property) for value in vars(kind).values())
    ):
        raise TypeError(f"{kind.__name__} is no longer a plain record: store.changed cannot copy it")
    return frozenset(field.name for field in found)


#: Each record's field names: what ``changed`` accepts.
_FIELDS: dict[type, frozenset[str]] = {kind: _plain_fields(kind) for kind in (Event, Delivery)}


def changed(record: Record, **changes: Any) -> Record:
    """``dataclasses.replace`` for an ``Event`` or a ``Delivery``: a copy with ``changes``.
    Raises ``TypeError`` for a name that is not a field, as ``replace`` does.

    In a third to a half of its time (0.9 against 2.6 us for an event's ``seq``, 1.2
    against 2.7 us for an attempt's outcome): ``replace`` gathers every field and runs the
    frozen class's ``__init__`` again, which sets each through ``object.__setattr__``;
    these records check nothing there (``_plain_fields``), so their fields are copied as
    they are. A queued webhook takes three (docs/performance.md). Anything else (a
    subclass) goes to ``replace``."""
    names = _FIELDS.get(type(record))
    if names is None:
        return replace(record, **changes)
    if unknown := changes.keys() - names:
        raise TypeError(f"{type(record).__name__} has no field {min(unknown)!r}")
    copy = object.__new__(type(record))
    copy.__dict__.update(record.__dict__, **changes)
    return copy


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt at one destination: the status the destination
    answered, or why it did not (``error``), recorded at ``at`` (seconds since the epoch)."""

    destination: str
    attempt: int
    at: float
    status: int | None
    error: str | None


@dataclass(frozen=True)
class Released:
    """What ``Store.release`` did to a name."""

    name: str
    #: The user who held it.
    owner: str
    #: Events that had a delivery waiting: now dead with ``NAME_RELEASED``.
    events: int
    #: The tunnel had stored settings (mode, destinations...): deleted.
    settings: bool


@dataclass(frozen=True)
class NameRecord:
    name: str
    user: str
    claimed_at: float


def _store_error(exc: sqlite3.Error) -> StoreError:
    """sqlite3's error as the store's own: ``StoreFull`` for SQLITE_FULL (disk or size cap)."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"store full: {exc}")
    return StoreError(f"store write failed: {exc}")


class _Connection(sqlite3.Connection):
    """A connection of the store; the writer's knows the pages new events may fill
    (``event_pages``; None: up to the cap or the disk) and its ``page_size``."""

    event_pages: int | None = None
    #: ``--store-max-bytes`` in pages (None: no cap).
    max_pages: int | None = None
    page_size = 4096


def _room(delivery: Delivery) -> bytes | None:
    """The ``room`` column of ``delivery``'s row (``OUTCOME_ROOM``): none once it is finished."""
    if not delivery.waiting:
        return None
    return bytes(max(0, OUTCOME_ROOM - len((delivery.last_error or "").encode())))


def _room_for_event(db: sqlite3.Connection, size: int) -> None:
    """Raise ``NoRoomForEvents`` if a new event of ``size`` body bytes would take pages
    kept for outcomes (``RECORD_RESERVE``). Pages freed by deleted rows count as room."""
    if not isinstance(db, _Connection) or db.event_pages is None:
        return
    limit = db.event_pages
    needed = size // db.page_size + 1  # and a head of at most a page: its row shares one
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    if pages + needed <= limit:
        return
    if pages - db.execute("PRAGMA freelist_count").fetchone()[0] + needed > limit:
        raise NoRoomForEvents("store full: the room left is kept for the outcomes of the events waiting")


class NewEvent:
    """``Store.insert_event_op``'s operation: a new event. When the store is full, it is
    refused rather than given room made from the attempts' history, which is the
    outcomes' (``Store.transaction``)."""

    __slots__ = ("deliveries", "event")

    def __init__(self, event: Event, deliveries: list[Delivery]) -> None:
        self.event = event
        self.deliveries = deliveries

    def __call__(self, db: sqlite3.Connection) -> int:
        event, deliveries = self.event, self.deliveries
        _room_for_event(db, len(event.body))
        headers = json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in event.headers])
        cursor = db.execute(
            "INSERT INTO events (id, tunnel, user, received_at, method, target, headers, client, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.id,
                event.tunnel,
                event.user,
                event.received_at,
                event.method,
                event.target,
                headers,
                event.client,
                event.body,
            ),
        )
        seq = int(cursor.lastrowid or 0)
        now = time.time()
        db.executemany(
            "INSERT INTO deliveries (event_seq, tunnel, destination, status, attempts, next_attempt_at,"
            " last_status, last_error, failures, dead_reason, since, updated_at, room)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    seq,
                    d.tunnel,
                    d.destination,
                    d.status,
                    d.attempts,
                    d.next_attempt_at,
                    d.last_status,
                    d.last_error,
                    d.failures,
                    d.dead_reason,
                    d.since,
                    now,
                    _room(d),
                )
                for d in deliveries
            ],
        )
        for delivery in deliveries:
            _add_attempt(db, seq, delivery, now)
        return seq


def _end_waiting(db: sqlite3.Connection, tunnel: str, owner: str | None, reason: str) -> int:
    """Make the waiting deliveries of ``tunnel``'s events not owned by ``owner`` (None: any
    owner) dead with ``reason``; returns how many events that was."""
    foreign = "SELECT seq FROM events WHERE tunnel = ? AND user IS NOT ?"
    events = db.execute(
        f"SELECT COUNT(DISTINCT event_seq) FROM deliveries WHERE tunnel = ? AND status IN {_WAITING}"
        f" AND event_seq IN ({foreign})",
        (tunnel, tunnel, owner),
    ).fetchone()[0]
    db.execute(
        "UPDATE deliveries SET status = 'dead', dead_reason = ?, next_attempt_at = NULL, room = NULL,"
        " updated_at = ?"
        f" WHERE tunnel = ? AND status IN {_WAITING} AND event_seq IN ({foreign})",
        (reason, time.time(), tunnel, tunnel, owner),
    )
    return int(events)


def _update_delivery(db: sqlite3.Connection, delivery: Delivery) -> bool:
    """Write ``delivery``'s state and the outcome of its attempt into its history; False
    (nothing written) if the delivery is no longer stored."""
    now = time.time()
    updated = db.execute(
        "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status = ?,"
        " last_error = ?, failures = ?, dead_reason = ?, since = ?, updated_at = ?, room = ?"
        " WHERE event_seq = ? AND destination = ?",
        (
            delivery.status,
            delivery.attempts,
            delivery.next_attempt_at,
            delivery.last_status,
            delivery.last_error,
            delivery.failures,
            delivery.dead_reason,
            delivery.since,
            now,
            _room(delivery),
            delivery.event_seq,
            delivery.destination,
        ),
    ).rowcount
    if updated:
        _add_attempt(db, delivery.event_seq, delivery, now)
    return bool(updated)


def _add_attempt(db: sqlite3.Connection, event_seq: int, delivery: Delivery, now: float) -> None:
    """Add the outcome of attempt number ``delivery.attempts`` to the delivery's history,
    once (an outcome written again adds nothing), keeping the newest ``MAX_ATTEMPTS_KEPT``."""
    if not delivery.attempts or (delivery.last_status is None and delivery.last_error is None):
        return
    db.execute(
        "INSERT OR IGNORE INTO attempts (event_seq, destination, attempt, at, status, error)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (event_seq, delivery.destination, delivery.attempts, now, delivery.last_status, delivery.last_error),
    )
    if delivery.attempts > MAX_ATTEMPTS_KEPT:
        db.execute(
            "DELETE FROM attempts WHERE event_seq = ? AND destination = ? AND attempt <= ?",
            (event_seq, delivery.destination, delivery.attempts - MAX_ATTEMPTS_KEPT),
        )


class Store:
    """SQLite store. Safe to share between the event loop and worker threads."""

    def __init__(self, data_dir: Path, max_bytes: int | None = None) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._db = self._connect(data_dir, max_bytes)
            self._lock = threading.Lock()
            self._migrate()
            # Reads get their own connection: WAL lets them run while a group
            # commit holds the writer's lock through its fsync.
            self._reader = self._connect(data_dir, None)
            self._read_lock = threading.Lock()
            # Checkpoints too, once ``checkpoint_apart`` (the server's, not the CLI's).
            self._data_dir = data_dir
            self._checkpointer: sqlite3.Connection | None = None
            self._checkpoint_lock = threading.Lock()
            self._wal = data_dir / f"{DB_FILE}-wal"
            self._wal_index = data_dir / f"{DB_FILE}-shm"
            self._wal_index_fd: int | None = None
            self._wal_index_lock = threading.Lock()
            self._closed = False
            self._frame_bytes: int = self._db.execute("PRAGMA page_size").fetchone()[0] + WAL_FRAME_HEADER
            self._pressure_purged = 0
            self._pressure_logged = -PRESSURE_LOG_INTERVAL
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {data_dir}: {exc}") from exc

    @staticmethod
    def _connect(data_dir: Path, max_bytes: int | None) -> _Connection:
        db = sqlite3.connect(
            data_dir / DB_FILE,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
            factory=_Connection,
        )
        db.execute("PRAGMA journal_mode=WAL")
        # An acknowledged event must survive a power cut: fsync at every commit
        # (group commit makes that one fsync per batch, not per request).
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        if max_bytes is not None:
            db.page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.max_pages = max(1, max_bytes // db.page_size)
            db.execute(f"PRAGMA max_page_count = {db.max_pages}")
            reserve = min(int(max_bytes * RECORD_RESERVE), RECORD_RESERVE_MAX)
            db.event_pages = max(1, (max_bytes - reserve) // db.page_size)
        return db

    def close(self) -> None:
        """Close the connections, after any operation still running in a worker thread
        (a cancelled ``asyncio.to_thread`` call goes on): closing under it would crash.

        The wal-index's descriptor goes last, and never while a connection is open:
        closing any descriptor of a file drops every POSIX lock the process holds on it,
        SQLite's locks on the wal-index included (https://www.sqlite.org/howtocorrupt.html,
        2.2). Another ``Store`` of the same database in this process would lose its own:
        one per database per process, as the server has."""
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
        with self._wal_index_lock:
            self._closed = True
            if self._wal_index_fd is not None:
                os.close(self._wal_index_fd)
                self._wal_index_fd = None

    def checkpoint_apart(self) -> None:
        """From now on commits never checkpoint the WAL (copy it back into the database
        and sync that): ``checkpoint`` does, in a thread. A commit on the event loop
        that filled the WAL past SQLite's 1,000 pages checkpointed there, and after a
        long read (an online backup) the WAL had grown to hundreds of MB: the loop was
        held 1-2 s by one small webhook. Raises ``StoreError``."""
        try:
            with self._checkpoint_lock:
                if self._checkpointer is None:
                    self._checkpointer = self._connect(self._data_dir, None)
            with self._lock:
                self._db.execute("PRAGMA wal_autocheckpoint = 0")
                self._db.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {self._data_dir}: {exc}") from exc

    def wal_backlog(self) -> int:
        """Bytes of WAL frames not yet copied back into the database: what the next
        checkpoint has to do. Read from the wal-index (one ``pread``, without SQLite's locks:
        a torn read only moves a checkpoint a commit earlier or later).

        Not the WAL file's size: SQLite writes the WAL over from its start once a
        checkpoint has emptied it, and keeps the file (up to ``WAL_KEPT_BYTES``), so a
        WAL that once passed ``commits.CHECKPOINT_BYTES`` made every later commit start a
        checkpoint (and a sync of the database file): measured under 1,000 webhooks/s,
        a tenth of the server's CPU. Without a wal-index to read (there always is one in
        WAL mode with shared locking, as here), the file's size: checkpoints then run
        after every commit once the file passed ``CHECKPOINT_BYTES``, as they used to.
        0 once the store is closed (the descriptor is never opened again: see ``close``)."""
        try:
            with self._wal_index_lock:
                if self._closed:
                    return 0
                if self._wal_index_fd is None:
                    self._wal_index_fd = os.open(self._wal_index, os.O_RDONLY | os.O_CLOEXEC)
                header = os.pread(self._wal_index_fd, _WAL_INDEX.size, 0)
            last_frame, copied = _WAL_INDEX.unpack(header)
            return max(0, int(last_frame) - int(copied)) * self._frame_bytes
        except (OSError, struct.error):
            try:
                return self._wal.stat().st_size
            except OSError:
                return 0

    def checkpoint(self) -> None:
        """Copy what the WAL holds back into the database, as far as readers allow
        (``PASSIVE``: never waits for a reader or a writer, which go on meanwhile). For a
        thread: it writes and syncs the database file. Raises ``StoreError``."""
        try:
            with self._checkpoint_lock:
                if self._checkpointer is not None:  # never apart: commits checkpoint
                    self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store checkpoint failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise StoreError(f"store schema version {version} is newer than this relay-server")
                for number in range(version, len(MIGRATIONS)):
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _write(self, sql: str, *args: object, new: bool = False) -> sqlite3.Cursor:
        """Run one write. ``new``: it adds a row (a token, a name) that a store whose new
        events filled their share refuses as it refuses them (``NoRoomForEvents``): the
        rest is the outcomes' (``RECORD_RESERVE``)."""
        try:
            with self._lock:
                if new:
                    _room_for_event(self._db, 0)
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def _read(self, sql: str, *args: object) -> list[Any]:
        try:
            with self._read_lock:
                return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def transaction(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """Run ``ops`` in one transaction (one commit, one fsync); their results in order.

        When the store is full (``--store-max-bytes`` or the disk), finished events
        (every delivery delivered or dead) are purged oldest first, before their
        retention, and the transaction is tried again: a new webhook is refused only
        when nothing finished is left (``NoRoomForEvents`` once new events fill their
        share, ``RECORD_RESERVE``). When nothing finished is left and the store is full
        all the same (the disk, or the reserve spent), the oldest attempts' history goes
        instead for a transaction without a new event (``NewEvent``), then a capped
        store grows past its cap (``RECORD_OVERSHOOT``), so that outcomes are still
        written and deliveries go on. Raises ``StoreFull`` when none of that is left,
        ``StoreError`` for any other failure (I/O error), with nothing written.
        """
        with self._lock, self._cap_kept():
            for _ in range(PRESSURE_ROUNDS):
                try:
                    return self._transaction(ops)
                except NoRoomForEvents:
                    if not self._purge_finished(PRESSURE_PURGE):
                        raise
                except StoreFull:
                    if self._purge_finished(PRESSURE_PURGE):
                        continue
                    if any(isinstance(op, NewEvent) for op in ops):
                        raise
                    if not (self._trim_history(PRESSURE_PURGE) or self._grow_for_records()):
                        raise
            return self._transaction(ops)

    def transaction_now(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any] | None:
        """``transaction``, for the event loop: runs ``ops`` only if nothing makes it wait.
        Returns None, with nothing written, when something would: a worker thread holds
        the writer connection, another connection holds SQLite's write lock (the admin
        CLI), or the store is full (purging to make room is a thread's job). Then run
        ``transaction`` in a thread. Raises ``StoreError`` as ``transaction`` does; on
        any failure the connection is left out of the transaction."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            try:
                if not self._begin_now():
                    return None
            except sqlite3.Error as exc:
                raise _store_error(exc) from exc
            return self._transaction(ops, begun=True)
        except StoreFull:  # rolled back already
            return None
        except BaseException:
            self._roll_back()  # restoring the busy timeout after BEGIN failed
            raise
        finally:
            self._lock.release()

    def _begin_now(self) -> bool:
        """``BEGIN IMMEDIATE`` on the writer connection, without waiting for another
        connection's write lock: False (no transaction) if one holds it."""
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY:  # or BUSY_*
                return False
            raise
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return True

    def _roll_back(self) -> None:
        """End the writer connection's transaction, if one is open (a failure left it); a
        ROLLBACK that fails too leaves the first failure to be reported."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _transaction(self, ops: list[Callable[[sqlite3.Connection], Any]], begun: bool = False) -> list[Any]:
        try:
            if not begun:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                results = [op(self._db) for op in ops]
                self._db.execute("COMMIT")
            except BaseException:
                self._roll_back()  # SQLite already rolled back on SQLITE_FULL
                raise
            return results
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def check_writable(self) -> None:
        """Take and release the write lock (``BEGIN IMMEDIATE``): raises ``StoreError``
        when the database cannot be written (read-only file system, I/O error, closed)."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(f"the store cannot be written: {exc}") from exc

    @contextlib.contextmanager
    def _cap_kept(self) -> Iterator[None]:
        """Around a transaction that may grow the store (``_grow_for_records``): the cap
        is set back after it (SQLite keeps it at the file's size at least), so the room
        grown serves these outcomes only, never a write that comes after."""
        try:
            yield
        finally:
            if self._db.max_pages is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute(f"PRAGMA max_page_count = {self._db.max_pages}")

    def _grow_for_records(self) -> bool:
        """Let a capped store grow one step further past its cap (``RECORD_OVERSHOOT``);
        False when it is not capped, or has grown as far as that allows."""
        cap = self._db.max_pages
        if cap is None:
            return False
        try:
            current = self._db.execute("PRAGMA max_page_count").fetchone()[0]
            limit = cap + int(cap * RECORD_OVERSHOOT)
            if current >= limit or self._db.execute("PRAGMA page_count").fetchone()[0] < current:
                return False  # as far as it may, or full for another reason (the disk)
            grown = min(limit, current + max(1, cap // RECORD_GROWTH_STEPS))
            self._db.execute(f"PRAGMA max_page_count = {grown}")
        except sqlite3.Error:
            return False
        log.warning(
            "store full with events waiting: grown to %d bytes, past --store-max-bytes, for their outcomes",
            grown * self._db.page_size,
        )
        return True

    def _trim_history(self, limit: int) -> int:
        """Delete the ``limit`` oldest rows of attempts' history; how many went (0 on failure).
        Each delivery's own row keeps its last outcome."""
        try:
            deleted = self._db.execute(
                "DELETE FROM attempts WHERE rowid IN (SELECT rowid FROM attempts ORDER BY rowid LIMIT ?)",
                (limit,),
            ).rowcount
        except sqlite3.Error:
            return 0
        if deleted:
            log.warning("store full with events waiting: deleted the %d oldest attempts' history", deleted)
        return deleted

    def _purge_finished(self, limit: int) -> int:
        """Delete up to ``limit`` finished events, oldest first; how many went (0 on failure)."""
        try:
            deleted = self._db.execute(
                "DELETE FROM events WHERE seq IN (SELECT event_seq FROM deliveries GROUP BY event_seq"
                f" HAVING SUM(status IN {_WAITING}) = 0 ORDER BY event_seq LIMIT ?)",
                (limit,),
            ).rowcount
        except sqlite3.Error:
            return 0
        if deleted:
            self._pressure_purged += deleted
            now = time.monotonic()
            if now - self._pressure_logged >= PRESSURE_LOG_INTERVAL:
                log.warning(
                    "store full: purged %d finished events before their retention (oldest first)",
                    self._pressure_purged,
                )
                self._pressure_logged, self._pressure_purged = now, 0
        return deleted

    # -- users and tokens ------------------------------------------------------

    def record_token(self, claims: Claims) -> None:
        now = time.time()
        self._write(
            "INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)", claims.user, now, new=True
        )
        self._write(
            "INSERT INTO tokens (id, user, names, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            claims.token_id,
            claims.user,
            json.dumps(claims.names),
            now,
            claims.expires_at,
            new=True,
        )

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._read(
            "SELECT id, user, names, created_at, expires_at, revoked_at FROM tokens ORDER BY created_at"
        )
        return [TokenRecord(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        """Mark a token revoked; False if no such token (or already revoked)."""
        cursor = self._write(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            time.time(),
            token_id,
        )
        return cursor.rowcount == 1

    def is_revoked(self, token_id: str) -> bool:
        rows = self._read("SELECT 1 FROM tokens WHERE id = ? AND revoked_at IS NOT NULL", token_id)
        return bool(rows)

    # -- names -------------------------------------------------------------------

    def claim_name(self, name: str, user: str, limit: int | None = None) -> str | None:
        """Claim ``name`` for ``user`` unless someone holds it; returns its owner. With a
        ``limit``, only while ``user`` holds fewer names (checked in the same write): None
        when it holds that many already and ``name`` is free. A free name is a new row
        (``_write``'s ``new``): a full store refuses it; one held needs no write."""
        owner = self.name_owner(name)
        if owner is not None:
            return owner
        now = time.time()
        self._write("INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)", user, now, new=True)
        self._write(
            "INSERT OR IGNORE INTO names (name, user, claimed_at) SELECT ?, ?, ?"
            " WHERE (SELECT COUNT(*) FROM names WHERE user = ?) < ?",  # names_by_user: an index read
            name,
            user,
            now,
            user,
            sys.maxsize if limit is None else limit,
            new=True,
        )
        return self.name_owner(name)

    def namespace_of(self, name: str) -> str | None:
        """The user whose own name ``name`` is, or falls under (``USER-...``); the longest
        such user (``alice-ci`` before ``alice`` for ``alice-ci-prod``), None if none."""
        rows = self._read(
            "SELECT name FROM users WHERE name = ? OR substr(?, 1, length(name) + 1) = name || '-'"
            " ORDER BY length(name) DESC LIMIT 1",
            name,
            name,
        )
        return str(rows[0][0]) if rows else None

    def taken_from(self, user: str) -> list[NameRecord]:
        """Names in ``user``'s namespace (``user``, ``user-...``) another user holds:
        claimed before ``user`` existed, by a wildcard."""
        rows = self._read(
            "SELECT name, user, claimed_at FROM names WHERE user != ?"
            " AND (name = ? OR substr(name, 1, length(?) + 1) = ? || '-') ORDER BY name",
            user,
            user,
            user,
            user,
        )
        return [NameRecord(*r) for r in rows]

    def claim_refused(self, name: str, user: str, patterns: list[str]) -> str | None:
        """``names.claim_refused`` for a free ``name``, from what the store knows."""
        return names.claim_refused(name, user, patterns, self.namespace_of(name))

    def name_owner(self, name: str) -> str | None:
        rows = self._read("SELECT user FROM names WHERE name = ?", name)
        return str(rows[0][0]) if rows else None

    def list_names(self) -> list[NameRecord]:
        rows = self._read("SELECT name, user, claimed_at FROM names ORDER BY name")
        return [NameRecord(*r) for r in rows]

    def release_name(self, name: str) -> bool:
        """Free a claimed name (admin); False if nobody held it. See ``release``."""
        return self.release(name) is not None

    def release(self, name: str) -> Released | None:
        """Free a claimed name (admin), in one transaction, so that nothing of its owner
        passes to the next one: its settings and destinations are deleted, and its waiting
        deliveries become dead with ``NAME_RELEASED`` (kept for their owner to read and
        replay). None if nobody held the name."""

        def op(db: sqlite3.Connection) -> Released | None:
            row = db.execute("SELECT user FROM names WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM names WHERE name = ?", (name,))
            settings = db.execute("DELETE FROM tunnels WHERE name = ?", (name,)).rowcount
            died = _end_waiting(db, name, None, NAME_RELEASED)
            return Released(name, str(row[0]), died, settings > 0)

        return self.transaction([op])[0]  # type: ignore[no-any-return]

    def waiting_events(self, tunnel: str) -> int:
        """How many of ``tunnel``'s events have a delivery still waiting."""
        rows = self._read(
            f"SELECT COUNT(DISTINCT event_seq) FROM deliveries WHERE tunnel = ? AND status IN {_WAITING}",
            tunnel,
        )
        return int(rows[0][0])

    def end_foreign_waiting(self, tunnel: str, owner: str | None, reason: str) -> int:
        """Waiting deliveries of ``tunnel``'s events that belong to anyone but ``owner``
        (None: to anyone) become dead with ``reason``; how many events. Run by the server
        once it sees a name change hands: an attempt that was in flight at the release
        may have written its outcome (``retrying``) over the release's ``dead``."""

        def op(db: sqlite3.Connection) -> int:
            return _end_waiting(db, tunnel, owner, reason)

        return int(self.transaction([op])[0])

    def name_owners(self) -> dict[str, str]:
        """Every claimed name and its owner."""
        return {str(r[0]): str(r[1]) for r in self._read("SELECT name, user FROM names")}

    def revoked_tokens(self, token_ids: list[str]) -> set[str]:
        """Those of ``token_ids`` that are revoked."""
        if not token_ids:
            return set()
        rows = self._read(
            "SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND id IN (SELECT value FROM json_each(?))",
            json.dumps(token_ids),
        )
        return {str(r[0]) for r in rows}

    # -- tunnel settings -------------------------------------------------------

    def tunnel_settings(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT settings FROM tunnels WHERE name = ?", name)
        return json.loads(rows[0][0]) if rows else None

    def save_tunnel_settings(self, name: str, user: str, settings: dict[str, Any]) -> None:
        self._write(
            "INSERT INTO tunnels (name, user, settings, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET settings = excluded.settings,"
            " updated_at = excluded.updated_at",
            name,
            user,
            json.dumps(settings, sort_keys=True),
            time.time(),
        )

    def user_tunnels(self, user: str) -> list[tuple[str, dict[str, Any] | None]]:
        """The names ``user`` holds, with their settings (None: never set)."""
        rows = self._read(
            "SELECT n.name, t.settings FROM names n LEFT JOIN tunnels t ON t.name = n.name"
            " WHERE n.user = ? ORDER BY n.name",
            user,
        )
        return [(r[0], json.loads(r[1]) if r[1] else None) for r in rows]

    # -- events: writes, as operations for Store.transaction (group commit) ---------

    @staticmethod
    def insert_event_op(event: Event, deliveries: list[Delivery]) -> NewEvent:
        """An operation storing ``event`` and its deliveries; it returns the event's seq.
        A delivery may already carry an attempt's outcome (the first attempt answered
        before the event was stored): it is stored with its history, in one write."""
        return NewEvent(event, deliveries)

    @staticmethod
    def update_delivery_op(delivery: Delivery) -> Callable[[sqlite3.Connection], bool]:
        """An operation recording the outcome of an attempt (or a replay). The outcome of
        attempt number ``delivery.attempts`` joins the delivery's history once: a replay,
        or the same outcome written again after a store failure, adds nothing. Returns
        True if a delivery of the event still waits (this one, or another destination's).
        A delivery no longer stored (its event purged: released, then full) is left alone."""

        def op(db: sqlite3.Connection) -> bool:
            if not _update_delivery(db, delivery):
                return False
            if delivery.waiting:
                return True
            waiting = db.execute(
                f"SELECT 1 FROM deliveries WHERE event_seq = ? AND status IN {_WAITING} LIMIT 1",
                (delivery.event_seq,),
            ).fetchone()
            return waiting is not None

        return op

    @staticmethod
    def replay_op(delivery: Delivery) -> Callable[[sqlite3.Connection], bool]:
        """``update_delivery_op`` for a replay: returns True if nothing of the event waited
        before it (the event comes back into its tunnel's quota). Decided in the write's
        own transaction, so that replays at once count the event back once."""

        def op(db: sqlite3.Connection) -> bool:
            waited = db.execute(
                f"SELECT 1 FROM deliveries WHERE event_seq = ? AND status IN {_WAITING} LIMIT 1",
                (delivery.event_seq,),
            ).fetchone()
            return _update_delivery(db, delivery) and waited is None

        return op

    def expire(self, since_before: float, reason: str) -> int:
        """Waiting deliveries whose schedule started (arrival, or last replay) before
        ``since_before`` become dead with ``reason`` (``--max-age``: an event dies by the
        clock even if no agent ever comes for it). Returns how many."""
        return self._write(
            "UPDATE deliveries SET status = 'dead', dead_reason = ?, next_attempt_at = NULL, room = NULL,"
            f" updated_at = ? WHERE status IN {_WAITING} AND COALESCE(since,"
            " (SELECT received_at FROM events WHERE seq = event_seq)) < ?",
            reason,
            time.time(),
            since_before,
        ).rowcount

    def purge(self, before: float) -> int:
        """Delete events whose every delivery ended (delivered or dead) before ``before``."""
        cursor = self._write(
            "DELETE FROM events WHERE seq IN (SELECT event_seq FROM deliveries GROUP BY event_seq"
            f" HAVING SUM(status IN {_WAITING}) = 0 AND MAX(updated_at) < ?)",
            before,
        )
        return cursor.rowcount

    # -- events: reads ----------------------------------------------------------------

    _EVENT_COLUMNS = "e.seq, e.id, e.tunnel, e.user, e.received_at, e.method, e.target, e.headers, e.client"
    #: The columns of ``Delivery`` after ``event_seq``, in its field order.
    _DELIVERY_COLUMNS = (
        "d.tunnel, d.destination, d.status, d.attempts, d.next_attempt_at, d.last_status,"
        " d.last_error, d.failures, d.dead_reason, d.since"
    )

    @staticmethod
    def _event(row: Any, body: bytes = b"") -> Event:
        headers = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(row[7]))
        return Event(row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]), headers, row[8], body)

    def due(
        self,
        tunnel: str,
        destination: str,
        now: float,
        after_seq: int,
        limit: int,
        with_body: bool = True,
    ) -> list[tuple[Event, Delivery]]:
        """Waiting deliveries due by ``now`` (``math.inf``: all of them) with seq above
        ``after_seq``, in arrival order (without bodies if not ``with_body``: see
        ``event_body``)."""
        body = "e.body" if with_body else "x''"
        rows = self._read(
            f"SELECT {self._EVENT_COLUMNS}, {body}, {self._DELIVERY_COLUMNS}"
            " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            f" WHERE d.tunnel = ? AND d.destination = ? AND d.status IN {_WAITING}"
            " AND d.next_attempt_at <= ? AND d.event_seq > ? ORDER BY d.event_seq LIMIT ?",
            tunnel,
            destination,
            now,
            after_seq,
            limit,
        )
        return [(self._event(r, bytes(r[9])), Delivery(r[0], *r[10:])) for r in rows]

    def event_body(self, seq: int) -> bytes:
        rows = self._read("SELECT body FROM events WHERE seq = ?", seq)
        return bytes(rows[0][0]) if rows else b""

    def next_due_at(self, tunnel: str, destination: str) -> float | None:
        rows = self._read(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE tunnel = ? AND destination = ?"
            f" AND status IN {_WAITING}",
            tunnel,
            destination,
        )
        value = rows[0][0]
        return None if value is None else float(value)

    def pending_destinations(self) -> list[tuple[str, str]]:
        rows = self._read(f"SELECT DISTINCT tunnel, destination FROM deliveries WHERE status IN {_WAITING}")
        return [(r[0], r[1]) for r in rows]

    def pending_totals(self) -> dict[str, tuple[int, int]]:
        """Per tunnel: events with a delivery still waiting, and their body bytes."""
        return self._totals(self._read(_PENDING_TOTALS))

    @staticmethod
    def pending_totals_op() -> Callable[[sqlite3.Connection], dict[str, tuple[int, int]]]:
        """``pending_totals`` as an operation for ``transaction``: read in the order of the
        group commit's writes, so a count kept beside them can be checked against it."""
        return lambda db: Store._totals(db.execute(_PENDING_TOTALS).fetchall())

    @staticmethod
    def _totals(rows: list[Any]) -> dict[str, tuple[int, int]]:
        return {r[0]: (r[1], r[2] or 0) for r in rows}

    def waiting_summary(self) -> dict[str, tuple[int, int, float]]:
        """Per tunnel with events waiting for delivery: their count, body bytes, and the
        arrival time (seconds since the epoch) of the oldest."""
        rows = self._read(
            "SELECT e.tunnel, COUNT(*), SUM(LENGTH(e.body)), MIN(e.received_at) FROM events e WHERE e.seq IN"
            f" (SELECT event_seq FROM deliveries WHERE status IN {_WAITING}) GROUP BY e.tunnel"
        )
        return {r[0]: (r[1], r[2] or 0, r[3]) for r in rows}

    def stats(self) -> tuple[dict[str, int], int]:
        """Events by state (the least advanced of their deliveries', as the API shows it:
        retrying, pending, dead, delivered) and the database's size in bytes."""
        rows = self._read(
            "SELECT state, COUNT(*) FROM (SELECT CASE WHEN SUM(status = 'retrying') THEN 'retrying'"
            " WHEN SUM(status = 'pending') THEN 'pending' WHEN SUM(status = 'dead') THEN 'dead'"
            " ELSE 'delivered' END AS state FROM deliveries GROUP BY event_seq) GROUP BY state"
        )
        ((pages, page_size),) = self._read(
            "SELECT page_count, page_size FROM pragma_page_count(), pragma_page_size()"
        )
        return {r[0]: r[1] for r in rows}, pages * page_size

    def find_events(
        self, user: str, tunnel: str | None, status: str | None, limit: int, before: int | None = None
    ) -> list[tuple[Event, list[Delivery]]]:
        """``user``'s events, newest first, without bodies; filtered by tunnel and delivery
        status, and to those older than the event with seq ``before`` (the next page)."""
        where: list[str] = ["e.user = ?"]
        args: list[object] = [user]
        if before is not None:
            where.append("e.seq < ?")
            args.append(before)
        if tunnel:
            where.append("e.tunnel = ?")
            args.append(tunnel)
        if status:
            where.append("EXISTS (SELECT 1 FROM deliveries x WHERE x.event_seq = e.seq AND x.status = ?)")
            args.append(status)
        rows = self._read(
            f"SELECT {self._EVENT_COLUMNS} FROM events e WHERE {' AND '.join(where)}"
            " ORDER BY e.seq DESC LIMIT ?",
            *args,
            limit,
        )
        events = [self._event(r) for r in rows]
        return [(e, self.deliveries(e.seq)) for e in events]

    def find_event(
        self, user: str, event_id: str, with_body: bool = False
    ) -> tuple[Event, list[Delivery]] | None:
        """One of ``user``'s events by id, or None (also when it belongs to someone else)."""
        rows = self._read(
            f"SELECT {self._EVENT_COLUMNS}, e.body FROM events e WHERE e.id = ? AND e.user = ?",
            event_id,
            user,
        )
        if not rows:
            return None
        event = self._event(rows[0], bytes(rows[0][9]) if with_body else b"")
        return event, self.deliveries(event.seq)

    def attempts(self, event_seq: int) -> list[Attempt]:
        """The recorded attempts of an event, by destination then attempt number."""
        rows = self._read(
            "SELECT destination, attempt, at, status, error FROM attempts WHERE event_seq = ?"
            " ORDER BY destination, attempt",
            event_seq,
        )
        return [Attempt(*r) for r in rows]

    def deliveries(self, event_seq: int) -> list[Delivery]:
        rows = self._read(
            f"SELECT {self._DELIVERY_COLUMNS} FROM deliveries d WHERE event_seq = ? ORDER BY destination",
            event_seq,
        )
        return [Delivery(event_seq, *r) for r in rows]
