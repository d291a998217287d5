"""Shared fixtures for the companion's own tests (Python 3.11+, no Home Assistant)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from companion.app import build_services, create_app
from companion.services import SERVICES, Services
from companion.settings import Settings

REPO = Path(__file__).resolve().parents[2]
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

    async def start(
        settings: Settings | None = None,
        configure: Callable[[Services], Any] | None = None,
    ) -> Companion:
        settings = settings or make_settings(tmp_path)
        services = await build_services(settings) if configure is not None else None
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


@pytest.fixture
async def companion(companion_factory: Callable[..., Any]) -> Companion:
    result: Companion = await companion_factory()
    return result
