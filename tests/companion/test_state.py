"""The state DB: WAL + foreign keys, migrations (fresh == upgraded), the instance state machine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from companion.state import MIGRATIONS, SCHEMA_VERSION, Database, utcnow


async def test_fresh_db_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "s.db")
    try:
        assert (await db.fetchone("PRAGMA journal_mode"))["journal_mode"] == "wal"  # type: ignore[index]
        assert (await db.fetchone("PRAGMA foreign_keys"))["foreign_keys"] == 1  # type: ignore[index]
        assert await db.version() == SCHEMA_VERSION
        tables = {name for name, _ in await db.schema()}
        for table in (
            "releases",
            "templates",
            "projects",
            "instances",
            "builds",
            "assignments",
            "events",
            "outbox",
            "secrets",
        ):
            assert table in tables
    finally:
        await db.close()


async def test_every_upgrade_path_ends_equal_to_a_fresh_db(tmp_path: Path) -> None:
    fresh = await Database.open(tmp_path / "fresh.db")
    expected = await fresh.schema()
    await fresh.close()
    for start in range(1, SCHEMA_VERSION + 1):
        path = tmp_path / f"from-{start}.db"
        conn = sqlite3.connect(path)
        for index in range(start):
            conn.executescript(MIGRATIONS[index])
        conn.execute(f"PRAGMA user_version = {start}")
        conn.execute("INSERT INTO projects (name, created_at) VALUES ('kept', ?)", (utcnow(),))
        conn.commit()
        conn.close()
        upgraded = await Database.open(path)
        try:
            assert await upgraded.version() == SCHEMA_VERSION
            assert await upgraded.schema() == expected
            row = await upgraded.fetchone("SELECT name FROM projects")
            assert row == {"name": "kept"}
        finally:
            await upgraded.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this companion"):
        await Database.open(path)


async def test_state_machine_and_constraints(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "s.db")
    try:
        now = utcnow()
        await db.execute("INSERT INTO releases (release, created_at) VALUES ('2026.06', ?)", (now,))
        pid = await db.execute("INSERT INTO projects (name, created_at) VALUES ('p', ?)", (now,))
        insert = (
            "INSERT INTO instances (project_id, type, hostname, release, state, created_at,"
            " updated_at) VALUES (?, 'zwavejs', ?, '2026.06', ?, ?, ?)"
        )
        await db.execute(insert, (pid, "zw-1", "pending", now, now))
        with pytest.raises(sqlite3.IntegrityError):  # a live duplicate hostname
            await db.execute(insert, (pid, "zw-1", "pending", now, now))
        with pytest.raises(sqlite3.IntegrityError):  # not a state
            await db.execute(insert, (pid, "zw-2", "exploded", now, now))
        with pytest.raises(sqlite3.IntegrityError):  # foreign key
            await db.execute(insert, (pid + 99, "zw-3", "pending", now, now))
        await db.execute("UPDATE instances SET state = 'failed' WHERE hostname = 'zw-1'")
        await db.execute(insert, (pid, "zw-1", "pending", now, now))  # freed by failure
        rows = await db.fetchall("SELECT state FROM instances ORDER BY id")
        assert [r["state"] for r in rows] == ["failed", "pending"]
    finally:
        await db.close()


async def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "s.db")
    try:
        with pytest.raises(sqlite3.IntegrityError):  # noqa: PT012 - the block is the transaction
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO projects (name, created_at) VALUES ('a', 'x')")
                await tx.execute("INSERT INTO projects (name, created_at) VALUES ('a', 'x')")
        assert await db.fetchall("SELECT * FROM projects") == []
    finally:
        await db.close()


@pytest.mark.parametrize("one_trip", [True, False], ids=["one-trip", "trip-per-statement"])
async def test_atomic_writes_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_trip: bool
) -> None:
    db = await Database.open(tmp_path / "s.db")
    assert Database.one_trip  # the aiosqlite we install has Connection._execute
    # without it, the same statements go through the public API, trip by trip
    monkeypatch.setattr(db, "one_trip", one_trip)
    try:
        now = utcnow()
        ids = await db.atomic(
            [
                ("INSERT INTO projects (name, created_at) VALUES (?, ?)", ("a", now)),
                ("INSERT INTO kv (key, value) VALUES (?, ?)", ("k", "1")),
            ]
        )
        assert ids is not None
        assert ids[0] > 0
        assert await db.fetchone("SELECT name FROM projects WHERE id = ?", (ids[0],)) == {
            "name": "a"
        }
        # a guard that changes no row: nothing of the batch is written
        lost = await db.atomic(
            [
                ("UPDATE kv SET value = '2' WHERE key = ? AND value = ?", ("k", "0")),
                ("INSERT INTO projects (name, created_at) VALUES (?, ?)", ("b", now)),
            ],
            guard=True,
        )
        assert lost is None
        # a statement that fails rolls back the ones before it
        with pytest.raises(sqlite3.IntegrityError):
            await db.atomic(
                [
                    ("UPDATE kv SET value = '3' WHERE key = ?", ("k",)),
                    ("INSERT INTO projects (name, created_at) VALUES (?, ?)", ("a", now)),
                ]
            )
        assert await db.fetchall("SELECT name FROM projects ORDER BY name") == [{"name": "a"}]
        assert await db.get_kv("k") == "1"
        # and the connection is usable afterwards (no transaction left open)
        await db.set_kv("k", "4")
        assert await db.get_kv("k") == "4"
    finally:
        await db.close()
