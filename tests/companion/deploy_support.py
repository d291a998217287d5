"""Shared by the deploy tests and the deploy bench: a simulator + companion pair, waiting for
instance states, and playing a guest's first boot with the REAL ctrlable-firstboot.sh."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from companion.sim import SimConfig, Simulator, TemplateSpec, templates_from_release
from companion.sim.core import SimCore

from .conftest import REPO, Companion, make_settings
from .firstboot_harness import FakePortainer, Guest, Run, make_guest, run_script

LXC_TYPES = ("zwavejs", "zigbee2mqtt", "docker-portainer", "frigate", "freepbx")
#: wiring overrides the types need to wire fully (a network coordinator for the radios)
COORDINATOR = {"coordinator": "tcp://192.168.1.50:6638"}
TYPE_OVERRIDES: dict[str, dict[str, Any]] = {"zwavejs": COORDINATOR, "zigbee2mqtt": COORDINATOR}
#: the unit each type's first boot restarts (None: docker-portainer restarts a container)
UNITS = {
    "zwavejs": "zwave-js-ui.service",
    "zigbee2mqtt": "zigbee2mqtt.service",
    "frigate": "frigate.service",
    "freepbx": "freepbx.service",
    "docker-portainer": None,
}


def release_templates() -> list[TemplateSpec]:
    """The release's templates, tagged as the build wrapper tags them (adopted at start)."""
    return templates_from_release(REPO / "releases" / "2026.06.yaml")


def sim_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {
        "task_seconds": 0.05,
        "flock_timeout": 0.5,
        "clone_flock_timeout": 0.3,
        "seed": 11,
    }
    values.update(overrides)
    return SimConfig(**values)


def companion_settings(tmp_path: Path, sim: Simulator, **overrides: Any) -> Any:
    return make_settings(
        tmp_path,
        pve_url=sim.base_url,
        pve_token_id=sim.token_id,
        pve_token_secret=sim.token_secret,
        pve_ca_file=sim.ca_file,
        **overrides,
    )


async def wait_for(
    companion: Companion,
    instance_id: int,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Poll ``GET /api/v1/instances/{id}`` until ``predicate`` holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body: dict[str, Any] = {}
    while loop.time() < deadline:
        status, body = await companion.request("GET", f"/api/v1/instances/{instance_id}")
        assert status == 200, body
        if predicate(body):
            return body
        await asyncio.sleep(0.02)
    msg = f"instance {instance_id} never got there; last: {body}"
    raise AssertionError(msg)


def state_is(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body["state"] in states


def sim_guests(sim: Simulator) -> dict[int, Any]:
    """vmid -> guest of every non-template guest on the simulated cluster."""
    return {vmid: g for vmid, g in sim.state.guests.items() if not g.template}


def guest_config(sim: Simulator, vmid: int) -> dict[str, Any]:
    return dict(sim.state.guests[vmid].config)


def sim_core(sim: Simulator) -> SimCore:
    return sim.core


async def first_boot(
    companion: Companion,
    tmp_path: Path,
    instance: dict[str, Any],
    portainer: FakePortainer | None = None,
) -> tuple[Guest, Run]:
    """Boot the clone: a sandbox root with the hostname and MAC PVE gave it, then the REAL
    first-boot script against the running companion."""
    guest = make_guest(
        tmp_path, instance["type"], instance["hostname"], instance["mac"], companion.url
    )
    env: dict[str, str] = {}
    if portainer is not None:
        env["CTRLABLE_PORTAINER_URL"] = str(portainer.server.make_url("")).rstrip("/")
    run = await run_script(guest, **env)
    return guest, run
