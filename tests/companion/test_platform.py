"""Platform report-up: durable outbox, acknowledgement, backoff, coalescing, restarts.

The receiver is a small aiohttp server on 127.0.0.1 that plays the platform: it can be down,
slow (past the client timeout), answer 500, answer without a proper acknowledgement, or accept.
Like the real platform (docs/platform-api.md) it applies a report only if its sequence is newer
than the last one applied, and acknowledges duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from companion.platform import backoff_delay, parse_ack
from companion.services import Services
from companion.settings import Settings, SettingsError
from companion.state import utcnow

from .conftest import Companion, make_settings

PLATFORM_TOKEN = "platform-site-credential-5f1e2d3c4b5a"


class Receiver:
    """The platform stand-in. ``mode`` is one of ok, slow, error, noack, wrongack."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.port = 0
        self.applied: list[dict[str, Any]] = []
        self.answers: list[tuple[int, str]] = []  # (sequence, mode) of every request seen
        self.auth_ok = True
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/sites/report"

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {PLATFORM_TOKEN}":
            self.auth_ok = False
            return web.json_response({"error": "unauthorized"}, status=401)
        report = await request.json()
        sequence = int(report["sequence"])
        assert request.headers["X-Ctrlable-Sequence"] == str(sequence)
        assert request.headers["Idempotency-Key"] == f"{report['site']['id']}:{sequence}"
        mode = self.mode
        self.answers.append((sequence, mode))
        if mode == "error":
            return web.json_response({"error": "boom"}, status=500)
        if mode in ("ok", "slow") and (not self.applied or sequence > self.applied[-1]["sequence"]):
            self.applied.append(report)
        if mode == "slow":
            # Applied, but the answer comes after the client gave up: the ack is lost.
            self._release.clear()
            await asyncio.wait_for(self._release.wait(), 5)
        if mode == "noack":
            return web.json_response({"ok": True})
        if mode == "wrongack":
            return web.json_response({"ack": sequence - 1})
        return web.json_response({"ack": sequence}, status=202)

    async def up(self, mode: str = "ok") -> None:
        self.mode = mode
        app = web.Application()
        app.router.add_post("/api/v1/sites/report", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def down(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self._release.set()


@pytest.fixture
async def receiver() -> Any:
    recv = Receiver()
    yield recv
    await recv.down()


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> None:
    """Poll an (async or plain) condition until true; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def platform_settings(tmp_path: Path, receiver: Receiver, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "platform_url": receiver.url,
        "platform_token": PLATFORM_TOKEN,
        "platform_heartbeat": 3600,
        "platform_debounce": 0.02,
        "platform_retry_min": 0.05,
        "platform_retry_max": 0.2,
        "platform_timeout": 0.3,
        "platform_unreachable_after": 0.2,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


async def add_instance(services: Services, number: int) -> None:
    """One state change: a new instance row, announced on the event bus like a plane does."""
    mac = f"BC:24:11:00:00:{number:02X}"
    async with services.db.transaction() as tx:
        row = await tx.fetchone("SELECT id FROM projects WHERE name = 'smith-house'")
        project = (
            int(row["id"])
            if row
            else await tx.execute(
                "INSERT INTO projects (name, created_at) VALUES ('smith-house', ?)", (utcnow(),)
            )
        )
        await tx.execute(
            "INSERT INTO instances (project_id, type, hostname, release, node, vmid, mac, state,"
            " created_at, updated_at) VALUES (?, 'zwavejs', ?, '2026.06', 'pve', ?, ?, 'active',"
            " ?, ?)",
            (project, f"h{number}", 100 + number, mac, utcnow(), utcnow()),
        )
    await services.events.publish("instance.state", {"hostname": f"h{number}"})


def hostnames(report: dict[str, Any]) -> list[str]:
    return [i["hostname"] for i in report["instances"]]


def expected(upto: int) -> list[str]:
    return [f"h{n}" for n in range(upto + 1)]


async def depth(services: Services) -> int:
    row = await services.db.fetchone("SELECT COUNT(*) AS n FROM outbox")
    assert row is not None
    return int(row["n"])


async def drained(services: Services) -> bool:
    return await depth(services) == 0


async def stop(companion: Companion) -> None:
    await companion.session.close()
    await companion.server.close()


async def test_outage_slow_errors_restart_then_recovery(
    tmp_path: Path,
    receiver: Receiver,
    companion_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await receiver.up("ok")
    settings = platform_settings(tmp_path, receiver)
    first: Companion = await companion_factory(settings)
    services = first.services

    # Up: the startup report, then every change arrives as its own report.
    await eventually(lambda: receiver.applied)
    assert receiver.applied[0]["reason"] == "startup"
    assert hostnames(receiver.applied[0]) == []
    for number in range(3):
        await add_instance(services, number)
        await eventually(lambda n=number: hostnames(receiver.applied[-1]) == expected(n))
    await eventually(lambda: drained(services))

    # Down: changes coalesce into one pending report; the platform becomes "unreachable".
    await receiver.down()
    for number in range(3, 30):
        await add_instance(services, number)
        await asyncio.sleep(0.01)
        assert await depth(services) <= 1
    await eventually(lambda: _status_field(services, "unreachable_since"))
    status = await services.platform.status()
    assert status["outbox_depth"] == 1
    assert status["last_success"] is not None

    # Slow: the platform applies the report but the answer comes too late; more changes.
    await receiver.up("slow")
    for number in range(30, 33):
        await add_instance(services, number)
        assert await depth(services) <= 1
    await eventually(lambda: any(mode == "slow" for _, mode in receiver.answers))
    await eventually(lambda: sum(mode == "slow" for _, mode in receiver.answers) >= 2)
    assert await depth(services) == 1  # never acknowledged, so still pending

    # Restart the companion while the platform answers 500.
    await stop(first)
    receiver.set_mode("error")
    seen_before_restart = len(receiver.answers)
    last_sent = max(sequence for sequence, _ in receiver.answers)
    second: Companion = await companion_factory(settings)
    services = second.services
    row = await services.db.fetchone("SELECT attempts, last_error FROM outbox")
    assert row is not None, "the unacknowledged report survived the restart"
    assert row["attempts"] >= 2
    for number in range(33, 36):
        await add_instance(services, number)
        assert await depth(services) <= 1
    await eventually(lambda: len(receiver.answers) > seen_before_restart + 2)
    assert await depth(services) == 1
    assert min(sequence for sequence, _ in receiver.answers[seen_before_restart:]) > last_sent

    # Recovery: the newest state arrives last, the outbox drains.
    receiver.set_mode("ok")
    await eventually(lambda: receiver.applied and hostnames(receiver.applied[-1]) == expected(35))
    await eventually(lambda: drained(services))
    status = await services.platform.status()
    assert status["outbox_depth"] == 0
    assert status["unreachable_since"] is None
    assert status["last_success"] is not None

    # In order, nothing lost: sequences strictly grow, every applied state contains the one
    # before it, each change made while the platform was up has its own report, and the last
    # applied report is the current state.
    sequences = [r["sequence"] for r in receiver.applied]
    assert sequences == sorted(set(sequences))
    for earlier, later in zip(receiver.applied, receiver.applied[1:], strict=False):
        assert set(hostnames(earlier)) <= set(hostnames(later))
    applied_states = [hostnames(r) for r in receiver.applied]
    for number in range(3):
        assert expected(number) in applied_states
    assert applied_states[-1] == expected(35)
    assert receiver.applied[-1] == {**receiver.applied[-1], **await _current(services)}
    assert receiver.auth_ok
    assert PLATFORM_TOKEN not in caplog.text
    assert "not delivered" in caplog.text


async def _status_field(services: Services, key: str) -> Any:
    return (await services.platform.status())[key]


async def _current(services: Services) -> dict[str, Any]:
    return await services.platform.snapshot()


async def test_report_shape(
    tmp_path: Path, receiver: Receiver, companion_factory: Callable[..., Any]
) -> None:
    await receiver.up("ok")
    companion: Companion = await companion_factory(platform_settings(tmp_path, receiver))
    services = companion.services
    await services.releases.record_template(
        "2026.06", "zwavejs", node="pve", template_vmid=9010, builder_ref="x", app_version="10.6.1"
    )
    await add_instance(services, 7)
    await eventually(lambda: receiver.applied and hostnames(receiver.applied[-1]) == ["h7"])
    report = receiver.applied[-1]
    assert report["schema_version"] == 1
    assert report["site"] == {"id": "site-1", "name": "Ctrlable companion"}
    assert report["companion"]["version"]
    assert set(report["release"]) == {"active", "latest"}
    assert report["templates"][0]["name"] == "zwavejs"
    assert report["templates"][0]["template_vmid"] == 9010
    instance = report["instances"][0]
    assert {k: instance[k] for k in ("type", "hostname", "vmid", "node", "state", "release")} == {
        "type": "zwavejs",
        "hostname": "h7",
        "vmid": 107,
        "node": "pve",
        "state": "active",
        "release": "2026.06",
    }
    assert instance["mac"] == "BC:24:11:00:00:07"
    assert instance["project"] == "smith-house"
    assert report["reason"] == "change"
    assert report["generated_at"].endswith("Z")


@pytest.mark.parametrize("mode", ["noack", "wrongack"])
async def test_only_an_echoed_ack_removes_a_report(
    tmp_path: Path, receiver: Receiver, companion_factory: Callable[..., Any], mode: str
) -> None:
    await receiver.up(mode)
    companion: Companion = await companion_factory(platform_settings(tmp_path, receiver))
    services = companion.services
    await eventually(lambda: len(receiver.answers) >= 3)
    row = await services.db.fetchone("SELECT attempts, last_error FROM outbox")
    assert row is not None
    assert row["attempts"] >= 2
    assert "acknowledg" in row["last_error"]
    receiver.set_mode("ok")
    await eventually(lambda: drained(services))


async def test_wrong_credentials_are_retried_and_not_logged(
    tmp_path: Path,
    receiver: Receiver,
    companion_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await receiver.up("ok")
    settings = platform_settings(tmp_path, receiver, platform_token="not-the-right-credential")
    companion: Companion = await companion_factory(settings)
    await eventually(lambda: _status_field(companion.services, "unreachable_since"))
    assert not receiver.applied
    assert await depth(companion.services) == 1
    assert "HTTP 401" in caplog.text
    assert "not-the-right-credential" not in caplog.text


async def test_heartbeat_reports_without_changes(
    tmp_path: Path, receiver: Receiver, companion_factory: Callable[..., Any]
) -> None:
    await receiver.up("ok")
    settings = platform_settings(tmp_path, receiver, platform_heartbeat=0.1)
    await companion_factory(settings)
    await eventually(lambda: sum(r["reason"] == "heartbeat" for r in receiver.applied) >= 2)
    contents = {
        str({k: v for k, v in r.items() if k not in ("sequence", "generated_at", "reason")})
        for r in receiver.applied
    }
    assert len(contents) == 1


async def test_unchanged_state_is_not_reported_twice(
    tmp_path: Path, receiver: Receiver, companion_factory: Callable[..., Any]
) -> None:
    await receiver.up("ok")
    companion: Companion = await companion_factory(platform_settings(tmp_path, receiver))
    services = companion.services
    await eventually(lambda: receiver.applied)
    for _ in range(5):
        await services.events.publish("build.progress", {"percent": 1})
        services.platform.notify()
    await add_instance(services, 1)
    await eventually(lambda: hostnames(receiver.applied[-1]) == ["h1"])
    assert [hostnames(r) for r in receiver.applied] == [[], ["h1"]]


async def test_disabled_without_url(companion_factory: Callable[..., Any]) -> None:
    companion: Companion = await companion_factory()
    services = companion.services
    assert not services.platform.enabled
    services.platform.notify()
    await add_instance(services, 1)
    assert await services.platform.status() == {
        "last_success": None,
        "outbox_depth": 0,
        "unreachable_since": None,
    }


def test_backoff_doubles_with_jitter_and_caps() -> None:
    rng = random.Random(7)
    for attempts, full in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 60.0), (500, 60.0)]:
        for _ in range(50):
            delay = backoff_delay(attempts, 1.0, 60.0, rng)
            assert full / 2 <= delay <= full


@pytest.mark.parametrize(
    ("status", "body", "ack"),
    [
        (202, b'{"ack": 5}', 5),
        (200, b'{"ack": 5, "applied": false}', 5),
        (201, b'{"ack": 5}', None),
        (500, b'{"ack": 5}', None),
        (200, b'{"ack": "5"}', None),
        (200, b'{"ack": true}', None),
        (200, b"[5]", None),
        (200, b"ok", None),
    ],
)
def test_parse_ack(status: int, body: bytes, ack: int | None) -> None:
    assert parse_ack(status, body) == ack


@pytest.mark.parametrize(
    "url",
    ["ftp://platform/x", "https://user:pw@platform/report", "https://platform/r?token=x", "nohost"],
)
def test_platform_url_is_checked(url: str) -> None:
    with pytest.raises(SettingsError, match="CTRLABLE_PLATFORM_URL"):
        Settings.from_mapping({"CTRLABLE_API_TOKEN": "t", "CTRLABLE_PLATFORM_URL": url})
