"""Shared helpers of the Home Assistant tests (fixtures loading, constants)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from custom_components.ctrlable.api import CtrlableEvent, Overview

FIXTURES = Path(__file__).parent / "fixtures"
URL = "http://127.0.0.1:8580"
TOKEN = "secret-token"
ENTRY_ID = "01JCTRLABLE0000000000000001"


def load_json(name: str) -> Any:
    """A JSON fixture."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def load_overview(**changes: Any) -> Overview:
    """The overview fixture, with top-level keys replaced by `changes`."""
    data = load_json("overview.json")
    data.update(changes)
    return Overview.from_dict(data)


class EventFeed:
    """Feeds events to the mocked client's event stream, one `CtrlableEvent` at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[CtrlableEvent | BaseException | None] = asyncio.Queue()

    def stream(self, since: int | None = None) -> AsyncIterator[CtrlableEvent]:
        """What `client.events(since)` returns: items put on the queue, until None."""

        async def _gen() -> AsyncIterator[CtrlableEvent]:
            while True:
                item = await self.queue.get()
                try:
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                finally:
                    self.queue.task_done()

        return _gen()

    async def push(self, *items: CtrlableEvent | BaseException | None) -> None:
        """Put items on the stream and wait until the integration has handled them."""
        for item in items:
            self.queue.put_nowait(item)
        await self.queue.join()
