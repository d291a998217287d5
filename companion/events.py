"""The event stream: every state change is appended to ``events`` and fanned out to listeners."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from .state import Database, Transaction, dumps, utcnow

_LOGGER = logging.getLogger(__name__)

RETAIN_EVENTS = 10_000

#: An event's INSERT and its parameters (ts, type, data as JSON).
Statement = tuple[str, tuple[str, str, str]]


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    ts: str
    type: str
    data: dict[str, Any]

    def as_sse(self) -> bytes:
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.data)}\n\n".encode()


class EventBus:
    """Durable, ordered events with live subscribers (bounded queues; slow ones are dropped)."""

    def __init__(self, db: Database, queue_size: int = 1000) -> None:
        self._db = db
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[Event | None]] = set()

    async def publish(self, type_: str, data: dict[str, Any]) -> Event:
        """Append an event on its own (one INSERT) and hand it to the subscribers."""
        statement = self.insert(type_, data)
        event = self.recorded(statement, await self._db.execute(*statement), data)
        self.fanout(event)  # before anything else can commit an event: ids stay in order
        await self.prune(event.id)
        return event

    def insert(self, type_: str, data: dict[str, Any]) -> Statement:
        """The INSERT of an event, e.g. for ``Database.atomic`` (its lastrowid is the event id);
        the caller builds the ``Event`` with :meth:`recorded` and fans it out after the commit."""
        return (
            "INSERT INTO events (ts, type, data) VALUES (?, ?, ?)",
            (utcnow(), type_, dumps(data)),
        )

    @staticmethod
    def recorded(statement: Statement, event_id: int, data: dict[str, Any]) -> Event:
        """The committed event of :meth:`insert`: fan it out at once (so ids reach subscribers
        in order), then :meth:`prune`."""
        _, (ts, type_, _) = statement
        return Event(event_id, ts, type_, data)

    async def prune(self, event_id: int) -> None:
        await self._prune(self._db, event_id)

    async def record(self, tx: Transaction, type_: str, data: dict[str, Any]) -> Event:
        """Append an event inside the caller's write transaction (one commit for a state change
        and its event); call :meth:`fanout` with it once the transaction has committed."""
        statement = self.insert(type_, data)
        event = self.recorded(statement, await tx.execute(*statement), data)
        await self._prune(tx, event.id)
        return event

    @staticmethod
    async def _prune(db: Database | Transaction, event_id: int) -> None:
        """Every 500th event drops those older than the last ``RETAIN_EVENTS``."""
        if event_id % 500 == 0:
            await db.execute("DELETE FROM events WHERE id <= ?", (event_id - RETAIN_EVENTS,))

    def fanout(self, event: Event) -> None:
        """Hand a committed event to the live subscribers."""
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                _LOGGER.warning("dropping a slow event subscriber")
                self._subscribers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)  # ends that stream; the client resumes with ?since=

    async def since(self, last_id: int, limit: int = 1000) -> list[Event]:
        rows = await self._db.fetchall(
            "SELECT id, ts, type, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, limit),
        )
        return [Event(int(r["id"]), r["ts"], r["type"], json.loads(r["data"])) for r in rows]

    async def last_id(self) -> int:
        row = await self._db.fetchone("SELECT COALESCE(MAX(id), 0) AS id FROM events")
        return int(row["id"]) if row else 0

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
