"""The deploy plane end to end: the real simulator through the real Proxmox boundary, and the
REAL firstboot/ctrlable-firstboot.sh for every clone (sandbox root) against the running companion.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from companion.sim import Simulator, run_simulator

from .conftest import Companion
from .deploy_support import (
    LXC_TYPES,
    TYPE_OVERRIDES,
    UNITS,
    companion_settings,
    first_boot,
    guest_config,
    release_templates,
    sim_config,
    sim_guests,
    state_is,
    wait_for,
)
from .firstboot_harness import FakePortainer, assert_finished, assert_new_identity, needs_tools

Factory = Callable[..., Any]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(sim_config(), templates=release_templates()) as s:
        yield s


@pytest.fixture
async def portainer() -> AsyncIterator[FakePortainer]:
    fake = FakePortainer()
    await fake.server.start_server()
    yield fake
    await fake.server.close()


async def start_companion(
    factory: Factory, tmp_path: Path, sim: Simulator, **settings: Any
) -> Companion:
    companion: Companion = await factory(companion_settings(tmp_path, sim, **settings))
    status, body = await companion.request("GET", "/api/v1/releases")
    assert status == 200
    assert body["active"] == "2026.06"  # adopted from the simulator's tagged templates
    return companion


async def db_row(companion: Companion, instance_id: int) -> dict[str, Any]:
    row = await companion.services.db.fetchone(
        "SELECT * FROM instances WHERE id = ?", (instance_id,)
    )
    assert row is not None
    return row


async def assignment_state(companion: Companion, instance_id: int) -> str | None:
    row = await companion.services.db.fetchone(
        "SELECT state FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
        (instance_id,),
    )
    return None if row is None else str(row["state"])


# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


@needs_tools
@pytest.mark.parametrize("type_", LXC_TYPES)
async def test_deploy_one_instance_of_each_lxc_type(
    type_: str,
    sim: Simulator,
    portainer: FakePortainer,
    companion_factory: Factory,
    tmp_path: Path,
) -> None:
    companion = await start_companion(companion_factory, tmp_path, sim)
    status, created = await companion.request(
        "POST",
        "/api/v1/instances",
        json={
            "project": "smith-house",
            "type": type_,
            "hostname": f"{type_}-1",
            "overrides": TYPE_OVERRIDES.get(type_, {}),
        },
    )
    assert status == 202, created
    assert created["state"] == "pending"
    assert created["step"] == "resolve_template"
    iid = created["id"]
    waiting = await wait_for(companion, iid, state_is("awaiting_firstboot", "failed"))
    assert waiting["state"] == "awaiting_firstboot", waiting

    # The clone on PVE: named by hostname, marked as ours, running, the MAC we recorded.
    vmid = waiting["vmid"]
    guest = sim.state.guests[vmid]
    config = guest_config(sim, vmid)
    assert guest.kind == "lxc"
    assert guest.status == "running"
    assert config["hostname"] == f"{type_}-1"
    assert f"ctrlable-instance: {iid}" in config["description"]
    assert f"hwaddr={waiting['mac']}" in config["net0"]
    assert config["onboot"] in (1, "1")
    assert await assignment_state(companion, iid) == "pending"

    booted, run = await first_boot(companion, tmp_path, waiting, portainer)
    assert run.code == 0, run.stderr
    assert_new_identity(booted)
    assert_finished(booted, UNITS[type_])
    active = await wait_for(companion, iid, state_is("active", "failed"))
    assert active["state"] == "active", active
    assert active["step"] is None
    assert active["error"] is None
    row = await db_row(companion, iid)
    assert row["state"] == "active"
    assert row["vmid"] == vmid
    assert row["mac"] == waiting["mac"]
    assert await assignment_state(companion, iid) == "consumed"
    # Every state change was an event, in order.
    events = await companion.services.events.since(0, limit=10_000)
    states = [e.data["state"] for e in events if e.type == "instance.state"]
    assert states[0] == "pending"
    assert states[-1] == "active"
    seen = list(dict.fromkeys(states))
    assert seen == ["pending", "cloning", "starting", "awaiting_firstboot", "active"]


@needs_tools
async def test_deploy_a_full_lxc_stack_in_parallel(
    sim: Simulator, portainer: FakePortainer, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start_companion(companion_factory, tmp_path, sim)
    types = [*LXC_TYPES, "zwavejs"]  # a second instance of one template: clones serialize
    status, body = await companion.request(
        "POST",
        "/api/v1/deploy",
        json={
            "project": "jones",
            "types": types,
            "hostname_prefix": "j-",
            "overrides": TYPE_OVERRIDES,
        },
    )
    assert status == 202, body
    assert body["skipped"] == []
    hostnames = sorted(i["hostname"] for i in body["instances"])
    expected = ["j-zwavejs-1", "j-zwavejs-2", "j-zigbee2mqtt-1", "j-docker-portainer-1"]
    assert hostnames == sorted([*expected, "j-frigate-1", "j-freepbx-1"])
    ids = [i["id"] for i in body["instances"]]
    waiting = await asyncio.gather(
        *(wait_for(companion, i, state_is("awaiting_firstboot", "failed")) for i in ids)
    )
    assert all(w["state"] == "awaiting_firstboot" for w in waiting), waiting
    vmids = [w["vmid"] for w in waiting]
    assert len(set(vmids)) == len(vmids)
    assert len({w["mac"] for w in waiting}) == len(vmids)

    runs = await asyncio.gather(*(first_boot(companion, tmp_path, w, portainer) for w in waiting))
    for _, run in runs:
        assert run.code == 0, run.stderr
    for i in ids:
        assert (await wait_for(companion, i, state_is("active", "failed")))["state"] == "active"
    status, listed = await companion.request("GET", "/api/v1/instances?project=jones")
    assert status == 200
    assert {i["state"] for i in listed["instances"]} == {"active"}
    assert set(sim_guests(sim)) == set(vmids)


async def test_overrides_reach_the_clone_config_and_keep_the_mac(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start_companion(companion_factory, tmp_path, sim)
    status, created = await companion.request(
        "POST",
        "/api/v1/instances",
        json={
            "project": "p",
            "type": "frigate",
            "hostname": "cams",
            "overrides": {
                "onboot": False,
                "ip": "192.168.1.20/24",
                "gw": "192.168.1.1",
                "vlan": 30,
                "mqtt_server": "mqtt://broker.lan:1883",
            },
        },
    )
    assert status == 202, created
    waiting = await wait_for(companion, created["id"], state_is("awaiting_firstboot", "failed"))
    assert waiting["state"] == "awaiting_firstboot", waiting
    config = guest_config(sim, waiting["vmid"])
    net = dict(part.split("=", 1) for part in config["net0"].split(","))
    assert net["hwaddr"] == waiting["mac"]
    assert net["ip"] == "192.168.1.20/24"
    assert net["gw"] == "192.168.1.1"
    assert net["tag"] == "30"
    assert str(config.get("onboot", "0")) == "0"
    # the wiring key went to the assignment, not to PVE
    row = await companion.services.db.fetchone(
        "SELECT overrides FROM instances WHERE id = ?", (created["id"],)
    )
    assert row is not None
    assert '"mqtt_server":"mqtt://broker.lan:1883"' in row["overrides"]
