"""Deploy failures against the simulator: rollback leaves no guest, frees the hostname and says
why; duplicates and bad input are refused up front (also under concurrency); removal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from companion.services import Services
from companion.sim import Simulator, run_simulator

from .conftest import Companion
from .deploy_support import (
    companion_settings,
    first_boot,
    release_templates,
    sim_config,
    sim_guests,
    state_is,
    wait_for,
)
from .firstboot_harness import needs_tools

Factory = Callable[..., Any]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(sim_config(), templates=release_templates()) as s:
        yield s


async def start(
    factory: Factory,
    tmp_path: Path,
    sim: Simulator,
    configure: Callable[[Services], Any] | None = None,
    **settings: Any,
) -> Companion:
    companion: Companion = await factory(companion_settings(tmp_path, sim, **settings), configure)
    return companion


async def deploy(
    companion: Companion, hostname: str, type_: str = "freepbx", project: str = "p1"
) -> tuple[int, dict[str, Any]]:
    status, body = await companion.request(
        "POST",
        "/api/v1/instances",
        json={"project": project, "type": type_, "hostname": hostname},
    )
    return status, body


async def assignment_state(companion: Companion, instance_id: int) -> str | None:
    row = await companion.services.db.fetchone(
        "SELECT state FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
        (instance_id,),
    )
    return None if row is None else str(row["state"])


async def event_states(companion: Companion, instance_id: int) -> list[str]:
    events = await companion.services.events.since(0, limit=10_000)
    return [
        e.data["state"]
        for e in events
        if e.type == "instance.state" and e.data["id"] == instance_id
    ]


# --------------------------------------------------------------------------------------------
# Rollback
# --------------------------------------------------------------------------------------------


async def test_failed_clone_rolls_back(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    sim.faults.fail_task("vzclone", "no space left on device")
    status, body = await deploy(companion, "pbx")
    assert status == 202, body
    failed = await wait_for(companion, body["id"], state_is("failed", "active"))
    assert failed["state"] == "failed"
    assert failed["error"].startswith("clone: ")
    assert "no space left on device" in failed["error"]
    assert sim_guests(sim) == {}
    assert await assignment_state(companion, body["id"]) is None
    assert "rolling_back" in await event_states(companion, body["id"])
    # The hostname is free again.
    status, again = await deploy(companion, "pbx")
    assert status == 202, again
    assert (await wait_for(companion, again["id"], state_is("awaiting_firstboot", "failed")))[
        "state"
    ] == "awaiting_firstboot"


async def test_failed_start_destroys_the_clone_and_revokes(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    sim.faults.fail_task("vzstart", "startup for container failed")
    status, body = await deploy(companion, "pbx")
    assert status == 202
    failed = await wait_for(companion, body["id"], state_is("failed", "active"))
    assert failed["state"] == "failed"
    assert failed["error"].startswith("start: ")
    assert "startup for container failed" in failed["error"]
    assert failed["vmid"] is not None
    assert failed["vmid"] not in sim.state.guests
    assert sim_guests(sim) == {}
    assert await assignment_state(companion, body["id"]) == "revoked"


@needs_tools
async def test_firstboot_timeout_rolls_back_and_a_late_guest_is_refused(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim, firstboot_timeout=0.5)
    status, body = await deploy(companion, "pbx")
    assert status == 202
    waiting = await wait_for(companion, body["id"], state_is("awaiting_firstboot", "failed"))
    failed = await wait_for(companion, body["id"], state_is("failed", "active"))
    assert failed["state"] == "failed"
    assert failed["error"] == "firstboot: no first-boot callback within 0.5 s"
    assert sim_guests(sim) == {}
    assert await assignment_state(companion, body["id"]) == "revoked"
    _, run = await first_boot(companion, tmp_path, waiting)
    assert run.code != 0
    assert (await wait_for(companion, body["id"], state_is("failed")))["state"] == "failed"


async def test_a_vmid_taken_by_someone_else_is_left_alone(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    sim.faults.set_latency("/nodes/*/lxc/*/clone", 0.5, method="POST")
    status, body = await deploy(companion, "pbx")
    assert status == 202
    cloning = await wait_for(companion, body["id"], lambda b: b["step"] == "clone")
    taken = cloning["vmid"]
    # Another PVE user creates a guest with that id while our clone request is on its way.
    sim.state.add_guest("lxc", taken, "pve", "someone-elses")
    sim.faults.clear()
    waiting = await wait_for(companion, body["id"], state_is("awaiting_firstboot", "failed"))
    assert waiting["state"] == "awaiting_firstboot", waiting
    assert waiting["vmid"] != taken
    assert sim.state.guests[taken].name == "someone-elses"
    # Removing ours never touches theirs.
    status, _ = await companion.request("DELETE", f"/api/v1/instances/{body['id']}")
    assert status == 202
    await wait_for(companion, body["id"], state_is("removed"))
    assert set(sim_guests(sim)) == {taken}


# --------------------------------------------------------------------------------------------
# Refused up front
# --------------------------------------------------------------------------------------------


async def test_duplicate_hostname_under_20_concurrent_requests(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    results = await asyncio.gather(*(deploy(companion, "zw-main", "zwavejs") for _ in range(20)))
    accepted = [body for status, body in results if status == 202]
    refused = [body for status, body in results if status != 202]
    assert len(accepted) == 1
    assert len(refused) == 19
    for status, body in results:
        if status != 202:
            assert status == 400
            assert body["error"]["code"] == "duplicate_hostname"
            assert body["error"]["details"][0]["field"] == "hostname"
    rows = await companion.services.db.fetchall(
        "SELECT id FROM instances WHERE hostname = 'zw-main'"
    )
    assert [r["id"] for r in rows] == [accepted[0]["id"]]
    # Same hostname in another project is fine; the stack never collides with it.
    status, _ = await deploy(companion, "zw-main", "zwavejs", project="p2")
    assert status == 202
    status, stack = await companion.request(
        "POST",
        "/api/v1/deploy",
        json={"project": "p1", "types": ["zwavejs"], "hostname_prefix": ""},
    )
    assert status == 202
    assert stack["instances"][0]["hostname"] == "zwavejs-1"


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"project": "p", "type": "zwavejs", "hostname": "-bad"}, "hostname", "invalid_request"),
        ({"project": "p", "type": "zwavejs", "hostname": "a" * 64}, "hostname", "invalid_request"),
        ({"project": "p", "type": "zwavejs", "hostname": "a_b"}, "hostname", "invalid_request"),
        ({"project": "p", "type": "zwavejs", "hostname": "123"}, "hostname", "invalid_request"),
        ({"project": "P Q", "type": "zwavejs", "hostname": "ok"}, "project", "invalid_request"),
        ({"project": "p", "type": "nope", "hostname": "ok"}, "type", "invalid_request"),
        ({"project": "p", "type": "zwavejs"}, "hostname", "invalid_request"),
        (
            {"project": "p", "type": "zwavejs", "hostname": "ok", "overrides": {"cpu": 8}},
            "overrides.cpu",
            "invalid_request",
        ),
        (
            {
                "project": "p",
                "type": "zwavejs",
                "hostname": "ok",
                "overrides": {"coordinator": "udp://x"},
            },
            "overrides.coordinator",
            "invalid_request",
        ),
        (
            {
                "project": "p",
                "type": "zwavejs",
                "hostname": "ok",
                "overrides": {"ip": "10.0.0.300/24"},
            },
            "overrides.ip",
            "invalid_request",
        ),
        (
            {"project": "p", "type": "zwavejs", "hostname": "ok", "overrides": {"gw": "10.0.0.1"}},
            "overrides",
            "invalid_request",
        ),
        (
            {"project": "p", "type": "ctrlable-pro", "hostname": "ok", "overrides": {"ip": "dhcp"}},
            "overrides.ip",
            "invalid_request",
        ),
    ],
)
async def test_bad_instance_requests_name_the_field(
    body: dict[str, Any],
    field: str,
    code: str,
    sim: Simulator,
    companion_factory: Factory,
    tmp_path: Path,
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    status, answer = await companion.request("POST", "/api/v1/instances", json=body)
    assert status == 400, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["details"][0]["field"] == field
    assert await companion.services.db.fetchall("SELECT id FROM instances") == []


async def test_stack_requests_are_checked_whole(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    cases = [
        ({"project": "p", "types": ["zwavejs", "bogus"]}, "types.1"),
        ({"project": "p", "types": []}, "types"),
        ({"project": "p", "types": ["zwavejs"], "hostname_prefix": "-x"}, "hostname_prefix"),
        ({"project": "p", "types": ["zwavejs"], "overrides": {"frigate": {}}}, "overrides.frigate"),
        (
            {"project": "p", "types": ["zwavejs"], "overrides": {"zwavejs": {"channel": 11}}},
            "overrides.zwavejs.channel",
        ),
    ]
    for body, field in cases:
        status, answer = await companion.request("POST", "/api/v1/deploy", json=body)
        assert status == 400, (body, answer)
        assert answer["error"]["details"][0]["field"] == field, (body, answer)
    assert await companion.services.db.fetchall("SELECT id FROM instances") == []


async def test_projects_and_lookups(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    status, project = await companion.request("POST", "/api/v1/projects", json={"name": "Smith"})
    assert status == 201
    assert project["name"] == "smith"
    status, body = await companion.request("POST", "/api/v1/projects", json={"name": "smith"})
    assert status == 409
    assert body["error"]["code"] == "project_exists"
    status, body = await companion.request("GET", "/api/v1/projects")
    assert [p["name"] for p in body["projects"]] == ["smith"]
    status, body = await companion.request("GET", "/api/v1/instances?project=nobody")
    assert status == 404
    status, body = await companion.request("GET", "/api/v1/instances/999")
    assert status == 404
    status, body = await companion.request("DELETE", "/api/v1/instances/999")
    assert status == 404
    status, body = await companion.request("GET", "/api/v1/instances/abc")
    assert status == 400


async def test_no_active_release_is_a_conflict(companion_factory: Factory, tmp_path: Path) -> None:
    async with run_simulator(sim_config()) as bare:  # templates without release tags
        companion = await start(companion_factory, tmp_path, bare)
        status, body = await deploy(companion, "x")
        assert status == 409
        assert body["error"]["code"] == "no_active_release"


async def test_default_stack_skips_kinds_without_a_handler(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    def without_vm(services: Services) -> None:
        services.deploy._handlers.pop("vm")

    companion = await start(companion_factory, tmp_path, sim, configure=without_vm)
    status, body = await companion.request("POST", "/api/v1/deploy", json={"project": "p"})
    assert status == 202, body
    assert [s["type"] for s in body["skipped"]] == ["ctrlable-pro"]
    assert [i["type"] for i in body["instances"]] == [
        "zwavejs",
        "zigbee2mqtt",
        "docker-portainer",
        "frigate",
        "freepbx",
    ]
    status, body = await companion.request(
        "POST", "/api/v1/deploy", json={"project": "p", "types": ["ctrlable-pro"]}
    )
    assert status == 400
    assert body["error"]["details"][0]["field"] == "types.0"


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------


@needs_tools
async def test_remove_an_active_instance(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    _, body = await deploy(companion, "pbx")
    waiting = await wait_for(companion, body["id"], state_is("awaiting_firstboot", "failed"))
    _, run = await first_boot(companion, tmp_path, waiting)
    assert run.code == 0, run.stderr
    await wait_for(companion, body["id"], state_is("active"))
    status, removing = await companion.request("DELETE", f"/api/v1/instances/{body['id']}")
    assert status == 202
    assert removing["state"] == "rolling_back"
    assert removing["step"] == "remove"
    removed = await wait_for(companion, body["id"], state_is("removed"))
    assert removed["error"] is None
    assert sim_guests(sim) == {}
    status, listed = await companion.request("GET", "/api/v1/instances")
    assert listed["instances"] == []
    status, listed = await companion.request("GET", "/api/v1/instances?include_removed=1")
    assert [i["id"] for i in listed["instances"]] == [body["id"]]
    status, again = await companion.request("DELETE", f"/api/v1/instances/{body['id']}")
    assert status == 202
    assert again["state"] == "removed"
    # The hostname can be used again.
    status, _ = await deploy(companion, "pbx")
    assert status == 202


async def test_remove_during_the_clone_leaves_nothing_behind(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    sim.core.set_task_duration("vzclone", 0.4)
    # The clone request is still on its way to PVE when the removal comes in.
    sim.faults.set_latency("/nodes/*/lxc/*/clone", 0.5, method="POST")
    _, body = await deploy(companion, "pbx")
    await wait_for(companion, body["id"], lambda b: b["step"] == "clone")
    status, _ = await companion.request("DELETE", f"/api/v1/instances/{body['id']}")
    assert status == 202
    await wait_for(companion, body["id"], state_is("removed"))
    await asyncio.sleep(1.0)  # longer than the request and the clone task
    assert sim_guests(sim) == {}


async def test_remove_a_failed_instance(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    companion = await start(companion_factory, tmp_path, sim)
    sim.faults.fail_task("vzclone", "boom")
    _, body = await deploy(companion, "pbx")
    await wait_for(companion, body["id"], state_is("failed"))
    status, removed = await companion.request("DELETE", f"/api/v1/instances/{body['id']}")
    assert status == 202
    assert removed["state"] == "removed"
