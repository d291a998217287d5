"""Platform plane: report this site's state up to the central Ctrlable platform.

A report is a full snapshot (site, companion version, releases, templates, every live instance)
with a ``sequence`` number that only grows. Reports go through a durable outbox in SQLite:

- a change (``notify()`` or any non-``platform.*`` event on the bus), debounced, or the heartbeat
  writes the current snapshot into the outbox. There is at most one pending ``state`` report:
  a newer snapshot replaces the payload (and sequence) of the unsent one, so an outage of any
  length leaves one row, and the newest state wins;
- one sender delivers the pending report (``POST`` with the site's bearer credential) and deletes
  it only when the platform acknowledged exactly that sequence (``{"ack": <sequence>}``);
- failures are retried with exponential backoff and jitter; the retry time is stored with the
  row, and the row, the sequence counter and the last success survive restarts.

The wire contract is in ``docs/platform-api.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from . import __version__
from .events import EventBus
from .releases import Releases
from .settings import Settings
from .state import Database, dumps, utcnow

_LOGGER = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
OUTBOX_KIND = "state"
KV_SEQUENCE = "platform.sequence"
KV_LAST_SUCCESS = "platform.last_success"
KV_FAILING_SINCE = "platform.failing_since"
MAX_ACK_BODY = 64 * 1024
USER_AGENT = f"ctrlable-companion/{__version__}"

# Extra per-instance facts other planes add to the report (e.g. the HAOS flow's ``ha`` block):
# an async callable returning {instance_id: {key: value}}.
InstanceExtras = Callable[[], Awaitable[dict[int, dict[str, Any]]]]


def parse_time(value: str) -> datetime:
    """Parse the ISO 8601 UTC strings the DB stores."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backoff_delay(
    attempts: int, minimum: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempts`` (1-based): ``min * 2**(n-1)`` capped at ``max``,
    then "equal jitter": a uniform pick in ``[d/2, d]`` so many sites do not retry in step."""
    exponent = min(max(attempts - 1, 0), 32)
    delay = min(maximum, minimum * (2**exponent))
    return (rng or random).uniform(delay / 2, delay)


def parse_ack(status: int, body: bytes) -> int | None:
    """The acknowledged sequence, or None when the answer is not an acknowledgement."""
    if status not in (200, 202):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    ack = data.get("ack")
    if isinstance(ack, bool) or not isinstance(ack, int):
        return None
    return ack


def safe_url(url: str) -> str:
    """The URL as it may appear in logs: scheme, host, port and path only."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class PlatformPlane:
    """Durable outbox + report-up. A Component: ``start()`` / ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        events: EventBus,
        releases: Releases,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.releases = releases
        self._rng = rng or random.Random()
        self._extras: list[InstanceExtras] = []
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._last_content: str | None = None
        self._last_enqueue = 0.0
        self._enqueue_lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.platform_url)

    def add_instance_extras(self, provider: InstanceExtras) -> None:
        """Let another plane add facts to each instance of the report."""
        self._extras.append(provider)

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            _LOGGER.info("platform report-up disabled (CTRLABLE_PLATFORM_URL is empty)")
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.platform_timeout),
            headers={"User-Agent": USER_AGENT},
        )
        # A (re)start always reports, so the platform sees the companion come back.
        await self.enqueue("startup", force=True)
        self._tasks = [
            asyncio.create_task(self._trigger_loop(), name="platform-trigger"),
            asyncio.create_task(self._sender_loop(), name="platform-sender"),
            asyncio.create_task(self._event_loop(), name="platform-events"),
        ]
        _LOGGER.info("platform report-up to %s", safe_url(self.settings.platform_url))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def notify(self) -> None:
        """Something worth reporting changed; a report follows after the debounce delay."""
        if self._tasks:
            self._changed.set()

    # The report ---------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """The report's content (without ``sequence``, ``generated_at`` and ``reason``)."""
        instances = await self.db.fetchall(
            "SELECT i.id, p.name AS project, i.type, i.hostname, i.vmid, i.node, i.state,"
            " i.release, i.mac FROM instances i JOIN projects p ON p.id = i.project_id"
            " WHERE i.state != 'removed' ORDER BY i.id"
        )
        extras: dict[int, dict[str, Any]] = {}
        for provider in self._extras:
            for instance_id, facts in (await provider()).items():
                extras.setdefault(instance_id, {}).update(facts)
        for instance in instances:
            instance.update(extras.get(int(instance["id"]), {}))
        templates = await self.db.fetchall(
            "SELECT release, name, kind, node, template_vmid, app_version, built_at"
            " FROM templates ORDER BY release, name"
        )
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "site": {"id": self.settings.site_id, "name": self.settings.site_name},
            "companion": {"version": __version__},
            "release": {"active": await self.releases.active(), "latest": self.releases.latest()},
            "templates": templates,
            "instances": instances,
        }

    async def enqueue(self, reason: str, *, force: bool = False) -> int | None:
        """Put the current snapshot in the outbox; returns its sequence, or None when nothing
        changed since the last report (unless ``force``)."""
        async with self._enqueue_lock:
            content = await self.snapshot()
            digest = hashlib.sha256(dumps(content).encode()).hexdigest()
            if not force and digest == self._last_content:
                return None
            async with self.db.transaction() as tx:
                row = await tx.fetchone("SELECT value FROM kv WHERE key = ?", (KV_SEQUENCE,))
                sequence = (int(row["value"]) if row else 0) + 1
                await tx.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (KV_SEQUENCE, str(sequence)),
                )
                payload = dumps(
                    {**content, "sequence": sequence, "generated_at": utcnow(), "reason": reason}
                )
                pending = await tx.fetchone(
                    "SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT 1", (OUTBOX_KIND,)
                )
                if pending is None:
                    await tx.execute(
                        "INSERT INTO outbox (kind, payload, created_at) VALUES (?, ?, ?)",
                        (OUTBOX_KIND, payload, utcnow()),
                    )
                else:
                    # Coalesce: the newest state replaces the unsent one; the retry schedule stays.
                    await tx.execute(
                        "UPDATE outbox SET payload = ? WHERE id = ?", (payload, pending["id"])
                    )
            self._last_content = digest
            self._last_enqueue = asyncio.get_running_loop().time()
        self._wake.set()
        return sequence

    async def status(self) -> dict[str, Any]:
        """The ``platform`` block of the overview."""
        depth = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM outbox WHERE kind = ?", (OUTBOX_KIND,)
        )
        failing = await self.db.get_kv(KV_FAILING_SINCE)
        unreachable = None
        if failing is not None:
            age = datetime.now(UTC) - parse_time(failing)
            if age >= timedelta(seconds=self.settings.platform_unreachable_after):
                unreachable = failing
        return {
            "last_success": await self.db.get_kv(KV_LAST_SUCCESS),
            "outbox_depth": int(depth["n"]) if depth else 0,
            "unreachable_since": unreachable,
        }

    # Loops --------------------------------------------------------------------------------

    async def _trigger_loop(self) -> None:
        """Turns changes (debounced) and the heartbeat into outbox writes."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last_enqueue + self.settings.platform_heartbeat - loop.time()
            changed = False
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    changed = await asyncio.wait_for(self._changed.wait(), remaining)
            if changed:
                await asyncio.sleep(self.settings.platform_debounce)
                reason, force = "change", False
            else:
                reason, force = "heartbeat", True
            self._changed.clear()
            try:
                await self.enqueue(reason, force=force)
            except Exception:
                _LOGGER.exception("could not write the platform report to the outbox")
                await asyncio.sleep(self.settings.platform_retry_min)

    async def _event_loop(self) -> None:
        """Every bus event but our own is a possible change (the snapshot digest filters)."""
        while True:
            async with self.events.subscribe() as queue:
                while True:
                    event = await queue.get()
                    if event is None:
                        break  # dropped as slow or bus closing: subscribe again
                    if not event.type.startswith("platform."):
                        self.notify()
            await asyncio.sleep(self.settings.platform_retry_min)

    async def _sender_loop(self) -> None:
        while True:
            self._wake.clear()
            row = await self.db.fetchone(
                "SELECT id, payload, attempts, next_attempt_at FROM outbox WHERE kind = ?"
                " ORDER BY id LIMIT 1",
                (OUTBOX_KIND,),
            )
            if row is None:
                await self._wake.wait()
                continue
            if row["next_attempt_at"]:
                delay = (parse_time(row["next_attempt_at"]) - datetime.now(UTC)).total_seconds()
                if delay > 0:
                    # A new enqueue wakes us, but the retry schedule is kept: re-read and wait.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            try:
                await self._deliver(row)
            except Exception:
                _LOGGER.exception("platform sender failed; retrying")
                await asyncio.sleep(self.settings.platform_retry_min)

    async def _post(self, payload: str, sequence: int) -> tuple[int | None, str | None]:
        """Send one report; returns (acknowledged sequence, error text)."""
        assert self._session is not None
        headers = {
            "Authorization": f"Bearer {self.settings.platform_token.get_secret_value()}",
            "Content-Type": "application/json",
            "X-Ctrlable-Site": self.settings.site_id,
            "X-Ctrlable-Sequence": str(sequence),
            "Idempotency-Key": f"{self.settings.site_id}:{sequence}",
        }
        try:
            async with self._session.post(
                self.settings.platform_url, data=payload.encode(), headers=headers
            ) as resp:
                body = await resp.content.read(MAX_ACK_BODY)
                ack = parse_ack(resp.status, body)
                if ack is None:
                    return None, f"HTTP {resp.status} without an acknowledgement"
                return ack, None
        except TimeoutError:
            return None, f"no answer within {self.settings.platform_timeout:g} s"
        except aiohttp.ClientError as err:
            return None, f"{type(err).__name__}: {err}"

    async def _deliver(self, row: dict[str, Any]) -> None:
        payload = str(row["payload"])
        sequence = int(json.loads(payload)["sequence"])
        ack, error = await self._post(payload, sequence)
        now = utcnow()
        if ack == sequence:
            async with self.db.transaction() as tx:
                removed = await tx.rowcount(
                    "DELETE FROM outbox WHERE id = ? AND payload = ?", (row["id"], payload)
                )
                if not removed:
                    # Replaced by a newer state while in flight: send that one now.
                    await tx.execute(
                        "UPDATE outbox SET attempts = 0, next_attempt_at = NULL, last_error = NULL"
                        " WHERE id = ?",
                        (row["id"],),
                    )
                await tx.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (KV_LAST_SUCCESS, now),
                )
                was_failing = await tx.rowcount("DELETE FROM kv WHERE key = ?", (KV_FAILING_SINCE,))
            if was_failing:
                _LOGGER.info("platform reachable again; report %d acknowledged", sequence)
            else:
                _LOGGER.debug("platform acknowledged report %d", sequence)
        else:
            if error is None:
                error = f"acknowledged {ack}, expected {sequence}"
            attempts = int(row["attempts"]) + 1
            delay = backoff_delay(
                attempts,
                self.settings.platform_retry_min,
                self.settings.platform_retry_max,
                self._rng,
            )
            due = format_time(datetime.now(UTC) + timedelta(seconds=delay))
            async with self.db.transaction() as tx:
                await tx.execute(
                    "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?"
                    " WHERE id = ?",
                    (attempts, due, error[:500], row["id"]),
                )
                first = await tx.rowcount(
                    "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                    (KV_FAILING_SINCE, now),
                )
            log = _LOGGER.warning if first else _LOGGER.info
            log(
                "platform report %d not delivered to %s (attempt %d): %s; retry in %.1f s",
                sequence,
                safe_url(self.settings.platform_url),
                attempts,
                error,
                delay,
            )
        await self.events.publish("platform.report", await self.status())
