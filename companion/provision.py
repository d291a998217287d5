"""The provision plane: first-boot assignments, their one-guest lifecycle, and rate limits.

An assignment is what one freshly cloned guest fetches on its first boot: its service wiring
with secrets made for it alone (:mod:`companion.wiring`). Its life:

``pending``  recorded by the deploy plane before the guest starts (bound to hostname + MAC)
``served``   the first ``GET /api/provision/assignment`` with that hostname and MAC; the client
             address is recorded and only that client may fetch it again or complete it
``consumed`` ``POST /api/provision/complete``; any later fetch is 410, any later complete 409
``revoked``  the instance was rolled back or removed; it can no longer be fetched

Secrets leave the companion only in the answer to the guest's fetch. Nothing here logs a
payload; log lines and events carry the instance id, hostname and client address only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ApiError, Conflict, InvalidRequest, NotFound, TooManyRequests, Unavailable
from .events import EventBus
from .settings import Settings
from .state import Database, Row, dumps, utcnow
from .wiring import BROKER_TYPE, Wiring, WiringContext, build_wiring

_LOGGER = logging.getLogger(__name__)

_MAC = re.compile(r"^[0-9A-F]{2}([:-])[0-9A-F]{2}(\1[0-9A-F]{2}){4}$")
_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
#: instance states in which a guest may fetch or complete (the deploy plane's "wait" states)
SERVABLE_STATES = ("starting", "awaiting_firstboot")

Completed = Callable[[int, Mapping[str, Any]], Awaitable[None]]


def normalize_mac(value: str, field: str = "mac") -> str:
    """``bc:24:11:aa:bb:cc`` or ``BC-24-...`` -> ``BC:24:11:AA:BB:CC``; else a 400 naming it."""
    upper = value.strip().upper()
    if not _MAC.match(upper):
        raise InvalidRequest.field(field, "must be a MAC address like BC:24:11:AA:BB:CC")
    return upper.replace("-", ":")


def normalize_hostname(value: str, field: str = "hostname") -> str:
    lower = value.strip().lower()
    if not _HOSTNAME.match(lower):
        raise InvalidRequest.field(field, "must be a DNS label (a-z, 0-9, '-', 1-63 chars)")
    return lower


class Gone(ApiError):
    status = 410
    code = "gone"


class RateLimited(TooManyRequests):
    """429 with the seconds after which a retry can succeed (sent as ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, details={"retry_after": math.ceil(retry_after)})
        self.retry_after = max(1, math.ceil(retry_after))


class TokenBuckets:
    """One token bucket per key: ``capacity`` attempts, refilled at ``capacity`` per ``period``.

    Keys are bounded (least recently used dropped first) so a flood of addresses cannot grow
    memory without limit.
    """

    def __init__(
        self,
        capacity: int,
        period: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Spend one token; 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


@dataclass(frozen=True, slots=True)
class Served:
    instance_id: int
    payload: dict[str, Any]


class ProvisionPlane:
    """Assignments for first boot. Built in ``app.build_services`` as ``services.provision``."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        events: EventBus,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.by_ip = TokenBuckets(settings.firstboot_rate_ip, clock=clock)
        self.by_host = TokenBuckets(settings.firstboot_rate_host, clock=clock)
        self._completing: set[int] = set()

    # -- the deploy plane's side -------------------------------------------------------------

    async def create_assignment(
        self, instance_id: int, type: str, hostname: str, mac: str, project: str | int | None
    ) -> None:
        """Record the pending assignment of one instance, with secrets made for it alone.

        Idempotent for a resumed deploy: a live assignment with the same hostname and MAC is
        kept (the guest may already have fetched it); one with another MAC is revoked and
        replaced. Raises ``WiringError`` (a ``ValueError`` naming the field) for overrides that
        cannot be wired, ``NotFound`` for an unknown instance.
        """
        mac_n = normalize_mac(mac)
        host_n = normalize_hostname(hostname)
        row = await self.db.fetchone(
            "SELECT i.id, i.project_id, i.type, i.hostname, i.release, i.overrides, "
            "i.needs_binding "
            "FROM instances i WHERE i.id = ?",
            (instance_id,),
        )
        if row is None:
            raise NotFound(f"instance {instance_id} not found")
        if row["type"] != type:
            raise InvalidRequest.field("type", f"instance {instance_id} is a {row['type']}")
        overrides = json.loads(row["overrides"] or "{}")
        broker = await self.db.fetchone(
            "SELECT hostname FROM instances WHERE project_id = ? AND type = ? "
            "AND state NOT IN ('failed', 'removed', 'rolling_back') ORDER BY id LIMIT 1",
            (row["project_id"], BROKER_TYPE),
        )
        wiring: Wiring = build_wiring(
            WiringContext(
                instance_id=instance_id,
                type=type,
                hostname=host_n,
                release=str(row["release"]),
                overrides=overrides if isinstance(overrides, dict) else {},
                broker_hostname=None if broker is None else str(broker["hostname"]),
                default_mqtt_url=self.settings.mqtt_url,
            )
        )
        stored = {
            "guest": wiring.guest,
            "bindings": [b.as_dict() for b in wiring.bindings],
        }
        # Only the instance's own pipeline makes its assignment (one step at a time), so the
        # check below and the writes after it cannot interleave with another maker.
        live = await self.db.fetchall(
            "SELECT id, hostname, mac FROM assignments WHERE instance_id = ? "
            "AND state IN ('pending', 'served')",
            (instance_id,),
        )
        if any(r["hostname"] == host_n and r["mac"] == mac_n for r in live):
            return
        writes: list[tuple[str, tuple[Any, ...]]] = []
        if live:
            writes.append(
                (
                    "UPDATE assignments SET state = 'revoked' WHERE instance_id = ? "
                    "AND state IN ('pending', 'served')",
                    (instance_id,),
                )
            )
        writes.append(
            (
                "INSERT INTO assignments (instance_id, hostname, mac, payload, state, created_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                (instance_id, host_n, mac_n, dumps(stored), utcnow()),
            )
        )
        if bool(row["needs_binding"]) != bool(wiring.bindings):
            writes.append(
                (
                    "UPDATE instances SET needs_binding = ? WHERE id = ?",
                    (int(bool(wiring.bindings)), instance_id),
                )
            )
        await self.db.atomic(writes)
        _LOGGER.info(
            "assignment recorded for instance %s (%s, project %s)%s",
            instance_id,
            host_n,
            project,
            f"; needs binding: {', '.join(b.what for b in wiring.bindings)}"
            if wiring.bindings
            else "",
        )

    async def revoke(self, instance_id: int) -> None:
        """The instance's live assignment can no longer be fetched or completed."""
        await self.db.execute(
            "UPDATE assignments SET state = 'revoked' WHERE instance_id = ? "
            "AND state IN ('pending', 'served')",
            (instance_id,),
        )

    async def assignment_state(self, instance_id: int) -> dict[str, Any] | None:
        """The newest assignment of an instance without its payload (for status and tests)."""
        row = await self.db.fetchone(
            "SELECT id, hostname, mac, state, served_at, served_to, consumed_at, created_at "
            "FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
            (instance_id,),
        )
        return row

    # -- rate limits -------------------------------------------------------------------------

    def check_ip(self, client: str) -> None:
        """Every attempt from a client address (failed authentication included)."""
        wait = self.by_ip.take(client)
        if wait > 0:
            _LOGGER.warning("first-boot rate limit hit by client %s", client)
            raise RateLimited("too many first-boot attempts from this address", wait)

    def check_host(self, hostname: str) -> None:
        """Authenticated attempts for one hostname."""
        wait = self.by_host.take(hostname)
        if wait > 0:
            _LOGGER.warning("first-boot rate limit hit for hostname %s", hostname)
            raise RateLimited("too many first-boot attempts for this hostname", wait)

    # -- the guest's side --------------------------------------------------------------------

    async def _find(self, hostname: str, mac: str) -> Row:
        """The newest assignment for exactly this hostname and MAC (else 404, same for both)."""
        row = await self.db.fetchone(
            "SELECT a.*, i.state AS instance_state FROM assignments a "
            "JOIN instances i ON i.id = a.instance_id "
            "WHERE a.hostname = ? AND a.mac = ? AND a.state != 'revoked' "
            "ORDER BY a.id DESC LIMIT 1",
            (hostname, mac),
        )
        if row is None:
            raise NotFound("no assignment for this hostname and MAC", code="no_assignment")
        return row

    async def serve(self, hostname: str, mac: str, client: str) -> Served:
        """The guest's fetch: pending -> served (bound to ``client``); then again for it alone."""
        host_n, mac_n = normalize_hostname(hostname), normalize_mac(mac)
        self.check_host(host_n)
        row = await self._find(host_n, mac_n)
        instance_id = int(row["instance_id"])
        if row["state"] == "consumed":
            raise Gone("this assignment was already completed", code="assignment_consumed")
        if row["instance_state"] not in SERVABLE_STATES:
            raise NotFound("no assignment for this hostname and MAC", code="no_assignment")
        if row["state"] == "served" and row["served_to"] != client:
            await self._refused(instance_id, host_n, client, "fetch from a second client")
            raise Conflict("assignment already served to another client", code="served_elsewhere")
        if row["state"] == "pending":
            changed = await self.db.rowcount(
                "UPDATE assignments SET state = 'served', served_at = ?, served_to = ? "
                "WHERE id = ? AND state = 'pending'",
                (utcnow(), client, row["id"]),
            )
            if changed != 1:  # another fetch won the race: judge again
                return await self.serve(hostname, mac, client)
            _LOGGER.info("assignment of instance %s served to %s (%s)", instance_id, client, host_n)
            await self.events.publish(
                "provision.served", {"instance_id": instance_id, "hostname": host_n}
            )
        else:
            _LOGGER.info("assignment of instance %s served again to %s", instance_id, client)
        stored = json.loads(row["payload"])
        return Served(instance_id, dict(stored["guest"]))

    async def complete(
        self,
        hostname: str,
        mac: str,
        client: str,
        report: Mapping[str, Any],
        on_completed: Completed,
    ) -> int:
        """The guest's report: served -> consumed, then ``on_completed(instance_id, report)``.

        If the callback raises an ``ApiError`` (the instance is no longer waiting) the
        assignment is revoked and the error goes to the guest; any other failure puts it back
        to ``served`` so the guest's retry can succeed (503).
        """
        host_n, mac_n = normalize_hostname(hostname), normalize_mac(mac)
        self.check_host(host_n)
        row = await self._find(host_n, mac_n)
        instance_id = int(row["instance_id"])
        if row["state"] == "consumed":
            await self._refused(instance_id, host_n, client, "complete replayed")
            raise Conflict("this assignment was already completed", code="already_completed")
        if row["state"] != "served":
            raise Conflict("fetch the assignment before completing it", code="not_served")
        if row["served_to"] != client:
            await self._refused(instance_id, host_n, client, "complete from a second client")
            raise Conflict("assignment was served to another client", code="served_elsewhere")
        if row["instance_state"] not in SERVABLE_STATES:
            raise NotFound("no assignment for this hostname and MAC", code="no_assignment")
        if instance_id in self._completing:
            raise Conflict("a completion is already in progress", code="completing")
        self._completing.add(instance_id)
        try:
            stored = json.loads(row["payload"])
            bindings = list(stored.get("bindings") or [])
            final_report = {
                **{k: v for k, v in report.items() if k not in ("hostname", "mac")},
                "needs_binding": bool(bindings),
                "bindings": bindings,
            }
            changed = await self.db.rowcount(
                "UPDATE assignments SET state = 'consumed', consumed_at = ?, report = ? "
                "WHERE id = ? AND state = 'served'",
                (utcnow(), dumps(final_report), row["id"]),
            )
            if changed != 1:
                raise Conflict("this assignment was already completed", code="already_completed")
            try:
                await on_completed(instance_id, final_report)
            except ApiError:
                await self.db.execute(
                    "UPDATE assignments SET state = 'revoked' WHERE id = ?", (row["id"],)
                )
                raise
            except Exception:
                _LOGGER.exception("first-boot completion of instance %s failed", instance_id)
                await self.db.execute(
                    "UPDATE assignments SET state = 'served', consumed_at = NULL, report = NULL "
                    "WHERE id = ?",
                    (row["id"],),
                )
                raise Unavailable("could not record the completion; retry") from None
        finally:
            self._completing.discard(instance_id)
        _LOGGER.info("first boot of instance %s completed (%s)", instance_id, host_n)
        await self.events.publish(
            "provision.completed", {"instance_id": instance_id, "hostname": host_n}
        )
        return instance_id

    async def _refused(self, instance_id: int, hostname: str, client: str, why: str) -> None:
        _LOGGER.warning(
            "first-boot request refused for instance %s (%s) from %s: %s",
            instance_id,
            hostname,
            client,
            why,
        )
        await self.events.publish(
            "provision.refused",
            {"instance_id": instance_id, "hostname": hostname, "client": client, "reason": why},
        )

    # -- without a deploy plane --------------------------------------------------------------

    async def mark_active(self, instance_id: int, report: Mapping[str, Any]) -> None:
        """What ``complete`` does when no deploy plane is built: the instance becomes active."""
        async with self.db.transaction() as tx:
            changed = await tx.rowcount(
                "UPDATE instances SET state = 'active', step = NULL, error = NULL, "
                "needs_binding = ?, updated_at = ? WHERE id = ? "
                "AND state IN ('starting', 'awaiting_firstboot')",
                (int(bool(report.get("needs_binding"))), utcnow(), instance_id),
            )
            row = await tx.fetchone(
                "SELECT i.id, p.name AS project, i.type, i.hostname, i.release, i.node, i.vmid, "
                "i.mac, i.state, i.step, i.error, i.needs_binding, i.created_at, i.updated_at "
                "FROM instances i JOIN projects p ON p.id = i.project_id WHERE i.id = ?",
                (instance_id,),
            )
        if changed != 1 or row is None:
            raise Conflict(f"instance {instance_id} is not waiting for its first boot")
        row["needs_binding"] = bool(row["needs_binding"])
        await self.events.publish("instance.state", row)
