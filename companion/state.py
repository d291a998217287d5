"""The state database: SQLite through aiosqlite, WAL, foreign keys on, versioned migrations.

The schema version lives in ``PRAGMA user_version``. ``MIGRATIONS[i]`` moves a database from
version ``i`` to ``i + 1``; a fresh database runs them all, so a fresh and an upgraded database end
equal (tests check this). Append new migrations at the end; never edit a released one.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

Row = dict[str, Any]

# Instance lifecycle. Final states end an instance's pipeline.
INSTANCE_STATES = (
    "pending",
    "cloning",
    "starting",
    "awaiting_firstboot",
    "active",
    "rolling_back",
    "failed",
    "removed",
)
INSTANCE_FINAL_STATES = frozenset({"active", "failed", "removed"})
BUILD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
BUILD_FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RELEASE_STATES = ("available", "building", "active", "superseded")


def _in(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


MIGRATIONS: list[str] = [
    # 0 -> 1: the base schema.
    f"""
    CREATE TABLE releases (
        release TEXT PRIMARY KEY,
        state TEXT NOT NULL DEFAULT 'available' CHECK (state IN ({_in(RELEASE_STATES)})),
        manifest_sha256 TEXT,
        activated_at TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE templates (
        id INTEGER PRIMARY KEY,
        release TEXT NOT NULL REFERENCES releases(release) ON DELETE CASCADE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('lxc', 'vm')),
        node TEXT,
        template_vmid INTEGER,
        builder_ref TEXT,
        app_version TEXT,
        built_at TEXT,
        UNIQUE (release, name)
    );
    CREATE TABLE projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
        type TEXT NOT NULL,
        hostname TEXT NOT NULL,
        release TEXT NOT NULL,
        node TEXT,
        template_vmid INTEGER,
        vmid INTEGER,
        mac TEXT,
        state TEXT NOT NULL CHECK (state IN ({_in(INSTANCE_STATES)})),
        step TEXT,
        error TEXT,
        needs_binding INTEGER NOT NULL DEFAULT 0,
        overrides TEXT NOT NULL DEFAULT '{{}}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX instances_live_hostname ON instances (project_id, hostname)
        WHERE state NOT IN ('failed', 'removed');
    CREATE INDEX instances_state ON instances (state);
    CREATE TABLE assignments (
        id INTEGER PRIMARY KEY,
        instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL,
        mac TEXT,
        payload TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'served', 'consumed', 'revoked')),
        served_at TEXT,
        consumed_at TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX assignments_hostname ON assignments (hostname, state);
    CREATE TABLE builds (
        id INTEGER PRIMARY KEY,
        release TEXT NOT NULL REFERENCES releases(release),
        state TEXT NOT NULL CHECK (state IN ({_in(BUILD_STATES)})),
        percent INTEGER NOT NULL DEFAULT 0,
        templates TEXT NOT NULL DEFAULT '{{}}',
        requested TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        log_tail TEXT NOT NULL DEFAULT '[]',
        started_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT,
        last_error TEXT
    );
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 1 -> 2: when an instance's current step began (the deploy plane resumes waits from it).
    """
    ALTER TABLE instances ADD COLUMN step_at TEXT;
    """,
    # 2 -> 3: first boot: the client an assignment was served to (it alone may fetch it again
    # and complete it) and the guest's completion report.
    """
    ALTER TABLE assignments ADD COLUMN served_to TEXT;
    ALTER TABLE assignments ADD COLUMN report TEXT;
    """,
    # 3 -> 4: the HAOS (ctrlable-pro) flow's recorded steps, one row per instance (haos.py).
    """
    CREATE TABLE haos_flows (
        instance_id INTEGER PRIMARY KEY REFERENCES instances(id) ON DELETE CASCADE,
        step TEXT NOT NULL,
        address TEXT,
        port INTEGER,
        facts TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> str:
    """The current time as the ISO 8601 UTC string the DB and API use."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class Database:
    """One aiosqlite connection; writes are serialized by an asyncio lock."""

    #: aiosqlite runs functions on its thread through ``Connection._execute`` (every version
    #: this project supports; checked, not assumed): ``atomic`` uses it for one trip.
    one_trip: bool = callable(getattr(aiosqlite.Connection, "_execute", None))

    def __init__(self, conn: aiosqlite.Connection, path: Path | None) -> None:
        self._conn = conn
        self.path = path
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> Database:
        target = Path(path) if str(path) != ":memory:" else None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute("PRAGMA synchronous=NORMAL")
        db = cls(conn, target)
        try:
            await db.migrate()
        except BaseException:
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def version(self) -> int:
        row = await self.fetchone("PRAGMA user_version")
        assert row is not None
        return int(row["user_version"])

    async def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply the migrations the DB lacks, each in its own transaction."""
        current = await self.version()
        if current > SCHEMA_VERSION:
            msg = f"database schema {current} is newer than this companion ({SCHEMA_VERSION})"
            raise RuntimeError(msg)
        async with self._write_lock:
            for index in range(current, target):
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(MIGRATIONS[index]):
                        await self._conn.execute(statement)
                    await self._conn.execute(f"PRAGMA user_version = {index + 1}")
                    await self._conn.execute("COMMIT")
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise
        return target

    # Every read is ONE trip to aiosqlite's thread (execute_fetchall runs the statement to
    # its end there), every write statement one more: each trip costs a thread wake-up on
    # both sides, which is most of what a small query costs.

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row; for queries of one row (by key, an aggregate, or ``LIMIT 1``)."""
        return await _fetchone(self._conn, sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await _fetchall(self._conn, sql, params)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement on its own (SQLite makes a lone statement its own
        transaction: one trip); returns lastrowid."""
        async with self._write_lock:
            cursor = await self._conn.execute(sql, params)
            return int(cursor.lastrowid or 0)

    async def rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement on its own; returns the number of rows it changed (a
        compare-and-set ``UPDATE ... WHERE state = ?`` answers 0 when it lost)."""
        async with self._write_lock:
            cursor = await self._conn.execute(sql, params)
            return int(cursor.rowcount)

    async def atomic(
        self, statements: Sequence[tuple[str, Sequence[Any]]], *, guard: bool = False
    ) -> list[int] | None:
        """Run ``statements`` as one write transaction and return each one's lastrowid.

        With ``guard`` the first statement is a compare-and-set: if it changes no row, nothing
        is written and the answer is None. The whole transaction is ONE trip to aiosqlite's
        thread (its ``_execute`` runs a function there; where an aiosqlite lacks it, the same
        statements go one trip each)."""
        async with self._write_lock:
            if self.one_trip:
                result: list[int] | None = await self._conn._execute(  # type: ignore[no-untyped-call]
                    _atomic, self._conn._conn, statements, guard
                )
                return result
            return await self._atomic_trips(statements, guard)

    async def _atomic_trips(
        self, statements: Sequence[tuple[str, Sequence[Any]]], guard: bool
    ) -> list[int] | None:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            ids = []
            for index, (sql, params) in enumerate(statements):
                cursor = await self._conn.execute(sql, params)
                if guard and index == 0 and cursor.rowcount != 1:
                    await self._conn.execute("ROLLBACK")
                    return None
                ids.append(int(cursor.lastrowid or 0))
        except BaseException:
            await self._conn.execute("ROLLBACK")
            raise
        await self._conn.execute("COMMIT")
        return ids

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A write transaction (BEGIN IMMEDIATE); commits on success, rolls back on error."""
        async with self._write_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    # Small shared accessors -------------------------------------------------------------

    async def get_kv(self, key: str) -> str | None:
        row = await self.fetchone("SELECT value FROM kv WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    async def set_kv(self, key: str, value: str) -> None:
        await self.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def get_secret(self, name: str) -> str | None:
        row = await self.fetchone("SELECT value FROM secrets WHERE name = ?", (name,))
        return None if row is None else str(row["value"])

    async def put_secret(self, name: str, value: str) -> None:
        await self.execute(
            "INSERT INTO secrets (name, value, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value, utcnow()),
        )

    async def schema(self) -> list[tuple[str, str]]:
        """(name, sql) of every table and index, for comparing databases."""
        rows = await self.fetchall(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
        return [(str(r["name"]), " ".join(str(r["sql"]).split())) for r in rows]


class Transaction:
    """The statements of one write transaction."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        # A write statement is done when execute returns; its cursor needs no closing trip.
        cursor = await self._conn.execute(sql, params)
        return int(cursor.lastrowid or 0)

    async def rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        return int(cursor.rowcount)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return await _fetchone(self._conn, sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await _fetchall(self._conn, sql, params)


def _atomic(
    conn: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Any]]], guard: bool
) -> list[int] | None:
    """``Database.atomic`` on aiosqlite's thread."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = []
        for index, (sql, params) in enumerate(statements):
            cursor = conn.execute(sql, params)
            if guard and index == 0 and cursor.rowcount != 1:
                conn.execute("ROLLBACK")
                return None
            ids.append(int(cursor.lastrowid or 0))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return ids


async def _fetchone(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> Row | None:
    rows = await conn.execute_fetchall(sql, params)
    for row in rows:
        return dict(row)
    return None


async def _fetchall(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> list[Row]:
    return [dict(r) for r in await conn.execute_fetchall(sql, params)]


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (they contain no ';' inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
