"""The dealer's path through a REAL Home Assistant: onboarding and the config flow over HA's REST
API, then `ctrlable.deploy_instance` through HA's REST API, against a real companion process
driving the PVE simulator; the new guest's entities appear with the right state."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from companion.devstack import (
    HaSession,
    Proc,
    add_ctrlable_entry,
    onboard,
    start_companion,
    start_hass,
    start_sim,
)

HOSTNAME = "zwave-e2e"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[HaSession, str, str]]:
    procs: list[Proc] = []
    http = aiohttp.ClientSession()
    try:
        sim_proc, sim = await start_sim(tmp_path, task_seconds=0.3)
        procs.append(sim_proc)
        api_token = secrets.token_urlsafe(24)
        companion_proc, companion_url = await start_companion(
            tmp_path, sim, api_token, CTRLABLE_FIRSTBOOT_TIMEOUT="600"
        )
        procs.append(companion_proc)
        hass_proc, ha_url = await start_hass(tmp_path / "ha")
        procs.append(hass_proc)
        ha = await onboard(http, ha_url, "dealer", secrets.token_urlsafe(12))
        yield ha, companion_url, api_token
    finally:
        await http.close()
        for proc in reversed(procs):
            proc.stop()


async def _states(ha: HaSession) -> dict[str, dict[str, Any]]:
    status, states = await ha.call("GET", "/api/states")
    assert status == 200
    return {s["entity_id"]: s for s in states}


async def _wait_for(ha: HaSession, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    states: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        states = await _states(ha)
        found = predicate(states)
        if found:
            return dict(found)
        await asyncio.sleep(0.5)
    ours = {
        k: v["state"] for k, v in states.items() if "ctrl" in k or HOSTNAME.replace("-", "_") in k
    }
    pytest.fail(f"condition not met within {timeout}s; entities: {ours}")


async def test_deploy_instance_through_home_assistant(
    stack: tuple[HaSession, str, str],
) -> None:
    ha, companion_url, api_token = stack
    entry = await add_ctrlable_entry(ha, companion_url, api_token)
    assert entry["type"] == "create_entry"

    # The host is there before any deploy: the node's sensors and the release update entity.
    update = await _wait_for(
        ha,
        lambda s: next((v for k, v in s.items() if k.startswith("update.")
                        and v["attributes"].get("installed_version") == "2026.06"), None),
    )  # fmt: skip
    assert update["attributes"]["latest_version"] == "2026.06"

    status, answer = await ha.call(
        "POST",
        "/api/services/ctrlable/deploy_instance?return_response",
        json={"project": "smith-house", "type": "zwavejs", "hostname": HOSTNAME},
    )
    assert status == 200, answer
    response = answer["service_response"]
    instances = response.get("instances", [response])
    assert instances[0]["hostname"] == HOSTNAME
    instance_id = instances[0]["id"]

    # The companion carried the deploy through clone and start; the guest now waits for its
    # first boot (no real guest runs here), and HA shows it without a reload.
    slug = HOSTNAME.replace("-", "_")
    guest_status = await _wait_for(
        ha,
        lambda s: next((v for k, v in s.items() if k.startswith(f"sensor.{slug}")
                        and v["state"] == "running"), None),
    )  # fmt: skip
    assert guest_status["entity_id"].startswith(f"sensor.{slug}")
    instance_state = await _wait_for(
        ha,
        lambda s: next((v for k, v in s.items() if slug in k
                        and v["state"] == "awaiting_firstboot"), None),
    )  # fmt: skip
    assert instance_state["state"] == "awaiting_firstboot"
    buttons = [k for k in await _states(ha) if k.startswith(f"button.{slug}")]
    assert len(buttons) >= 4  # start, stop, shutdown, reboot

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{companion_url}/api/v1/instances/{instance_id}",
            headers={"Authorization": f"Bearer {api_token}"},
        ) as resp,
    ):
        record = await resp.json()
    assert record["state"] == "awaiting_firstboot"
    assert record["mac"].startswith("BC:24:11:")
