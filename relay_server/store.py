"""The store: every read and write of persistent state goes through ``Store``.

The embedded backend is SQLite in the data directory, in WAL mode, with
versioned migrations (``PRAGMA user_version``). The interface is small on
purpose so that a second backend (for several nodes) can implement it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StoreError
from .tokens import Claims

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
]


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    user: str
    names: list[str]
    created_at: float
    expires_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class NameRecord:
    name: str
    user: str
    claimed_at: float


class Store:
    """SQLite store. Safe to share between the event loop and worker threads."""

    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                data_dir / DB_FILE, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._lock = threading.Lock()
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {data_dir}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

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

    def _write(self, sql: str, *args: object) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    def _read(self, sql: str, *args: object) -> list[Any]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    # -- users and tokens ------------------------------------------------------

    def record_token(self, claims: Claims) -> None:
        now = time.time()
        self._write("INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)", claims.user, now)
        self._write(
            "INSERT INTO tokens (id, user, names, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            claims.token_id,
            claims.user,
            json.dumps(claims.names),
            now,
            claims.expires_at,
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

    def claim_name(self, name: str, user: str) -> str:
        """Claim ``name`` for ``user`` unless someone holds it; returns its owner."""
        now = time.time()
        self._write("INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)", user, now)
        self._write("INSERT OR IGNORE INTO names (name, user, claimed_at) VALUES (?, ?, ?)", name, user, now)
        owner = self.name_owner(name)
        assert owner is not None
        return owner

    def name_owner(self, name: str) -> str | None:
        rows = self._read("SELECT user FROM names WHERE name = ?", name)
        return str(rows[0][0]) if rows else None

    def list_names(self) -> list[NameRecord]:
        rows = self._read("SELECT name, user, claimed_at FROM names ORDER BY name")
        return [NameRecord(*r) for r in rows]

    def release_name(self, name: str) -> bool:
        """Free a claimed name (admin); False if nobody held it."""
        return self._write("DELETE FROM names WHERE name = ?", name).rowcount == 1
