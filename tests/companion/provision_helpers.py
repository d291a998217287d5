"""Shared helpers of the provision tests: instance rows and assignments without a real deploy."""

from __future__ import annotations

import json
from typing import Any

from companion.services import Services
from companion.state import utcnow

from .conftest import FIRSTBOOT_SECRET, Companion

RELEASE = "2026.06"


def mac_for(n: int) -> str:
    return f"BC:24:11:00:{n // 256:02X}:{n % 256:02X}"


async def add_instance(
    services: Services,
    type_: str,
    hostname: str,
    mac: str,
    *,
    project: str = "smith-house",
    overrides: dict[str, Any] | None = None,
    state: str = "awaiting_firstboot",
    assign: bool = True,
) -> int:
    """An instance row as the deploy plane leaves it before the start, plus its assignment."""
    db = services.db
    now = utcnow()
    await db.execute(
        "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?, ?)", (project, now)
    )
    row = await db.fetchone("SELECT id FROM projects WHERE name = ?", (project,))
    assert row is not None
    vmid_row = await db.fetchone("SELECT COALESCE(MAX(vmid), 199) + 1 AS v FROM instances")
    assert vmid_row is not None
    instance_id = await db.execute(
        "INSERT INTO instances (project_id, type, hostname, release, node, template_vmid, vmid, "
        "mac, state, step, overrides, created_at, updated_at, step_at) "
        "VALUES (?, ?, ?, ?, 'pve', 9020, ?, ?, ?, 'firstboot', ?, ?, ?, ?)",
        (
            row["id"],
            type_,
            hostname,
            RELEASE,
            vmid_row["v"],
            mac,
            state,
            json.dumps(overrides or {}),
            now,
            now,
            now,
        ),
    )
    if assign:
        await services.provision.create_assignment(instance_id, type_, hostname, mac, project)
    return instance_id


async def stored_payload(services: Services, instance_id: int) -> dict[str, Any]:
    row = await services.db.fetchone(
        "SELECT payload FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
        (instance_id,),
    )
    assert row is not None
    payload: dict[str, Any] = json.loads(row["payload"])
    return payload


async def fetch(
    companion: Companion,
    hostname: str,
    mac: str,
    *,
    secret: str | None = FIRSTBOOT_SECRET,
    extra_query: str = "",
) -> tuple[int, Any]:
    headers = {"Authorization": ""}
    if secret is not None:
        headers["X-Ctrlable-Secret"] = secret
    path = f"/api/provision/assignment?hostname={hostname}&mac={mac}{extra_query}"
    return await companion.request("GET", path, headers=headers)


async def complete(
    companion: Companion,
    hostname: str,
    mac: str,
    *,
    secret: str | None = FIRSTBOOT_SECRET,
    **report: Any,
) -> tuple[int, Any]:
    headers = {"Authorization": ""}
    if secret is not None:
        headers["X-Ctrlable-Secret"] = secret
    body = {"hostname": hostname, "mac": mac, "status": "ok", **report}
    return await companion.request("POST", "/api/provision/complete", headers=headers, json=body)


async def instance_state(services: Services, instance_id: int) -> dict[str, Any]:
    row = await services.db.fetchone(
        "SELECT state, needs_binding FROM instances WHERE id = ?", (instance_id,)
    )
    assert row is not None
    return row


def secret_values(payload: dict[str, Any]) -> list[str]:
    """Every secret string a stored payload holds (for "never logged" checks)."""
    wiring = payload["guest"]["wiring"]
    found: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list) and key in ("network_key", "ext_pan_id"):
            found.append(json.dumps(value))
        elif isinstance(value, str) and (
            "password" in key or "secret" in key or key.startswith(("S0_", "S2_"))
        ):
            found.append(value)

    walk(wiring)
    return found
