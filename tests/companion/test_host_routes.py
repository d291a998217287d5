"""`/api/v1/host`, `/api/v1/guests` and `/api/v1/guests/{vmid}/{action}` against the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from companion.proxmox import RetryPolicy
from companion.services import Services
from companion.sim import CTRLABLE_ROLE, SimConfig, Simulator, run_simulator
from companion.state import utcnow

from .conftest import Companion, make_settings

Factory = Callable[..., Any]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(SimConfig(task_seconds=0.05, seed=3)) as simulator:
        simulator.state.add_guest("lxc", 101, "pve", "zwavejs-1", running=True)
        simulator.state.add_guest("qemu", 102, "pve", "ctrlable-pro-1")
        yield simulator


async def _companion(
    factory: Factory,
    tmp_path: Path,
    sim: Simulator,
    *,
    token: Any = None,
    configure: Callable[[Services], Any] | None = None,
) -> Companion:
    settings = make_settings(
        tmp_path,
        pve_url=sim.base_url,
        pve_token_id=token.full_id if token else sim.token_id,
        pve_token_secret=token.secret if token else sim.token_secret,
        pve_ca_file=sim.ca_file,
    )
    companion: Companion = await factory(settings, configure)
    return companion


async def test_host_shape(companion_factory: Factory, tmp_path: Path, sim: Simulator) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    status, body = await companion.request("GET", "/api/v1/host")
    assert status == 200
    (node,) = body["nodes"]
    assert set(node) == {"node", "status", "cpu", "maxcpu", "mem", "maxmem", "uptime", "storages"}
    assert node["node"] == "pve"
    assert node["status"] == "online"
    assert {s["storage"] for s in node["storages"]} == {"local", "local-lvm"}
    assert set(node["storages"][0]) == {"storage", "type", "total", "used", "avail"}


async def test_guests_shape_and_instance_ids(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    async def own_101(services: Services) -> None:
        now = utcnow()
        project = await services.db.fetchone(
            "INSERT INTO projects (name, created_at) VALUES ('smith-house', ?) RETURNING id",
            (now,),
        )
        assert project is not None
        await services.db.execute(
            "INSERT INTO instances (project_id, type, hostname, release, node, vmid, state,"
            " created_at, updated_at) VALUES (?, 'zwavejs', 'zwavejs-1', '2026.06', 'pve', 101,"
            " 'active', ?, ?)",
            (project["id"], now, now),
        )

    companion = await _companion(companion_factory, tmp_path, sim, configure=own_101)
    sim.request_log.clear()
    status, body = await companion.request("GET", "/api/v1/guests")
    assert status == 200
    assert [r.path for r in sim.request_log.records()] == ["/cluster/resources"]
    guests = {g["vmid"]: g for g in body["guests"]}
    assert guests[101]["instance_id"] is not None
    assert guests[101]["status"] == "running"
    assert guests[101]["type"] == "lxc"
    assert guests[102]["instance_id"] is None
    assert guests[102]["template"] is False
    assert guests[9010]["template"] is True


async def test_power_actions(companion_factory: Factory, tmp_path: Path, sim: Simulator) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    status, body = await companion.request("POST", "/api/v1/guests/102/start")
    assert (status, body) == (200, {"vmid": 102, "action": "start", "status": "running"})
    assert sim.state.guests[102].status == "running"
    status, body = await companion.request("POST", "/api/v1/guests/102/start")  # idempotent
    assert status == 200
    status, body = await companion.request("POST", "/api/v1/guests/101/shutdown")
    assert (status, body["status"]) == (200, "stopped")
    status, body = await companion.request("POST", "/api/v1/guests/101/stop")
    assert (status, body["status"]) == (200, "stopped")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/guests/101/explode", "action"),
        ("/api/v1/guests/abc/start", "vmid"),
        ("/api/v1/guests/5/start", "vmid"),
    ],
)
async def test_bad_input_names_the_field(
    companion_factory: Factory, tmp_path: Path, sim: Simulator, path: str, field: str
) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    sim.request_log.clear()
    status, body = await companion.request("POST", path)
    assert status == 400
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["details"][0]["field"] == field
    assert sim.request_log.records() == []  # nothing was sent to PVE


async def test_unknown_guest_and_template(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    status, body = await companion.request("POST", "/api/v1/guests/777/start")
    assert (status, body["error"]["code"]) == (404, "guest_not_found")
    status, body = await companion.request("POST", "/api/v1/guests/9010/start")
    assert (status, body["error"]["code"]) == (409, "guest_is_template")


async def test_routes_need_the_token(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    for method, path in (
        ("GET", "/api/v1/host"),
        ("GET", "/api/v1/guests"),
        ("POST", "/api/v1/guests/102/start"),
    ):
        status, body = await companion.request(method, path, headers={"Authorization": "Bearer x"})
        assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert sim.state.guests[102].status == "stopped"


async def test_missing_privilege_is_a_502_naming_it(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    weak = sim.add_token("ctrlable@pve", "weak", CTRLABLE_ROLE - {"VM.PowerMgmt"})
    companion = await _companion(companion_factory, tmp_path, sim, token=weak)
    status, body = await companion.request("POST", "/api/v1/guests/102/start")
    assert status == 502
    error = body["error"]
    assert error["code"] == "pve_permission_denied"
    assert "VM.PowerMgmt" in error["message"]
    assert error["details"]["privilege"] == "VM.PowerMgmt"
    assert error["details"]["path"] == "/vms/102"


async def test_task_failure_is_a_502_with_the_log_tail(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    companion = await _companion(companion_factory, tmp_path, sim)
    sim.faults.fail_task("qmstart", "start failed: QEMU exited with code 1")
    status, body = await companion.request("POST", "/api/v1/guests/102/start")
    assert status == 502
    assert body["error"]["code"] == "pve_task_failed"
    assert body["error"]["details"]["exitstatus"] == "start failed: QEMU exited with code 1"
    assert body["error"]["details"]["log_tail"][-1].startswith("TASK ERROR: start failed")


async def test_locked_guest_is_a_409_after_retries(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    def fast(services: Services) -> None:
        services.pve.retry = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02)

    companion = await _companion(companion_factory, tmp_path, sim, configure=fast)
    sim.faults.fail_next(5, "/nodes/{node}/lxc/{vmid}/status/stop", message="CT is locked (backup)")
    status, body = await companion.request("POST", "/api/v1/guests/101/stop")
    assert status == 409
    assert body["error"]["code"] == "pve_locked"
    assert "CT is locked (backup)" in body["error"]["message"]
    assert sim.request_log.count("POST", "/nodes/pve/lxc/101/status/stop") == 3


async def test_bad_pve_token_is_a_502(
    companion_factory: Factory, tmp_path: Path, sim: Simulator
) -> None:
    settings = make_settings(
        tmp_path,
        pve_url=sim.base_url,
        pve_token_id=sim.token_id,
        pve_token_secret="wrong",
        pve_ca_file=sim.ca_file,
    )
    companion: Companion = await companion_factory(settings)
    for path in ("/api/v1/host", "/api/v1/guests"):
        status, body = await companion.request("GET", path)
        assert (status, body["error"]["code"]) == (502, "pve_auth_failed")
        assert "wrong" not in body["error"]["message"]


async def test_unreachable_pve_is_a_503(companion_factory: Factory, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, pve_url="https://127.0.0.1:9", pve_token_secret="x", pve_timeout=1.0
    )
    companion: Companion = await companion_factory(settings)
    status, body = await companion.request("GET", "/api/v1/guests")
    assert (status, body["error"]["code"]) == (503, "pve_unavailable")
