"""Shared fixtures for the companion's own tests (Python 3.11+, no Home Assistant)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite.core
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from companion.app import build_services, create_app
from companion.services import SERVICES, Services
from companion.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# Every aiosqlite connection a test opens; one left open keeps a non-daemon thread alive, and
# the test run would never exit. The autouse fixture below fails the test that leaks one.
_OPENED: list[aiosqlite.core.Connection] = []
_original_init = aiosqlite.core.Connection.__init__


def _recording_init(self: aiosqlite.core.Connection, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    _OPENED.append(self)


aiosqlite.core.Connection.__init__ = _recording_init  # type: ignore[method-assign]


def _stop(conn: aiosqlite.core.Connection) -> None:
    """End a leaked connection's worker thread (what close() would have done)."""
    conn._tx.put_nowait((None, lambda: aiosqlite.core._STOP_RUNNING_SENTINEL))


@pytest.fixture(autouse=True)
def _no_leaked_db_connections() -> Any:
    start = len(_OPENED)
    yield
    leaked = [c for c in _OPENED[start:] if c._thread.is_alive() and c._connection is not None]
    for conn in leaked:
        _stop(conn)
    del _OPENED[start:]
    assert not leaked, f"{len(leaked)} aiosqlite connection(s) left open by this test"


API_TOKEN = "test-api-token-0123456789"
FIRSTBOOT_SECRET = "test-firstboot-secret-0123456789"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_token": API_TOKEN,
        "firstboot_secret": FIRSTBOOT_SECRET,
        "data_dir": tmp_path / "data",
        "releases_dir": REPO / "releases",
    }
    values.update(overrides)
    return Settings.model_validate(values)


@dataclass
class Companion:
    """A running companion on 127.0.0.1 plus a client that sends the token."""

    server: TestServer
    session: aiohttp.ClientSession
    settings: Settings
    headers: dict[str, str] = field(
        default_factory=lambda: {"Authorization": f"Bearer {API_TOKEN}"}
    )

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def services(self) -> Services:
        return self.server.app[SERVICES]

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            try:
                body: Any = await resp.json(content_type=None) if text else None
            except ValueError:
                body = text
            return resp.status, body


@pytest.fixture
async def companion_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start companions with chosen settings and an optional services hook; all stop at the end."""
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []
    built: list[Services] = []

    async def start(
        settings: Settings | None = None,
        configure: Callable[[Services], Any] | None = None,
    ) -> Companion:
        settings = settings or make_settings(tmp_path)
        services = await build_services(settings) if configure is not None else None
        if services is not None:
            built.append(services)
        if services is not None and configure is not None:
            result = configure(services)
            if hasattr(result, "__await__"):
                await result
        app: web.Application = create_app(settings, services)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Companion(server, session, settings)

    yield start
    for server, session in reversed(started):
        await session.close()
        await server.close()
    for services in built:  # services built here are closed here (create_app leaves them open)
        await services.db.close()


@pytest.fixture
async def companion(companion_factory: Callable[..., Any]) -> Companion:
    result: Companion = await companion_factory()
    return result
