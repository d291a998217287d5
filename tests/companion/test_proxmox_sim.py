"""The Proxmox boundary against the PVE simulator (real proxmoxer over HTTPS, no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from companion.proxmox import (
    Connection,
    ProxmoxClient,
    ProxmoxError,
    PveAlreadyExists,
    PveAuthError,
    PveLocked,
    PveNotFound,
    PveNotRunning,
    PvePermissionDenied,
    PveTaskFailed,
    PveTaskTimeout,
    PveTlsError,
    PveUnavailable,
    RetryPolicy,
)
from companion.sim import CTRLABLE_ROLE, SimConfig, Simulator, run_simulator

FAST_RETRY = RetryPolicy(attempts=5, first_delay=0.02, factor=2, max_delay=0.1)
LXC_TEMPLATE = 9010  # zwavejs in the simulator's default seed
QEMU_TEMPLATE = 9000  # ctrlable-pro

ClientFactory = Callable[..., ProxmoxClient]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(SimConfig(task_seconds=0.05, seed=7)) as simulator:
        yield simulator


@pytest.fixture
async def make_client(sim: Simulator) -> AsyncIterator[ClientFactory]:
    made: list[ProxmoxClient] = []

    def make(
        *,
        token_id: str | None = None,
        secret: str | None = None,
        ca: bool = True,
        fingerprint: str | None = None,
        retry: RetryPolicy = FAST_RETRY,
    ) -> ProxmoxClient:
        connection = Connection.from_url(
            sim.base_url,
            token_id or sim.token_id,
            sim.token_secret if secret is None else secret,
            ca_file=str(sim.ca_file) if ca else None,
            fingerprint=fingerprint,
            timeout=5,
        )
        client = ProxmoxClient(connection, retry=retry)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def pve(make_client: ClientFactory) -> ProxmoxClient:
    return make_client()


def _records(sim: Simulator, method: str | None = None, suffix: str = "") -> list[Any]:
    return [
        r
        for r in sim.request_log.records()
        if (method is None or r.method == method) and r.path.endswith(suffix)
    ]


# -- reads ------------------------------------------------------------------------------------


async def test_inventory_is_one_cluster_resources_call(sim: Simulator, pve: ProxmoxClient) -> None:
    for vmid in range(200, 240):
        sim.state.add_guest("lxc", vmid, "pve", f"ct-{vmid}", running=vmid % 2 == 0)
    sim.request_log.clear()
    guests = await pve.guests()
    assert [r.path for r in sim.request_log.records()] == ["/cluster/resources"]
    assert sim.request_log.records()[0].params == {"type": "vm"}
    by_id = {g.vmid: g for g in guests}
    assert by_id[200].status == "running"
    assert by_id[201].status == "stopped"
    assert by_id[LXC_TEMPLATE].template is True
    assert by_id[QEMU_TEMPLATE].type == "qemu"
    shape = by_id[200].as_dict()
    assert set(shape) == {
        "vmid", "node", "type", "name", "status", "template", "cpu", "maxcpu", "mem", "maxmem",
        "uptime", "instance_id",
    }  # fmt: skip


async def test_host_health_per_node(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.request_log.clear()
    nodes = await pve.nodes()
    assert sorted(r.path for r in sim.request_log.records()) == [
        "/nodes",
        "/nodes/pve/status",
        "/nodes/pve/storage",
    ]
    (node,) = nodes
    assert node.node == "pve"
    assert node.status == "online"
    assert 0 <= node.cpu <= 1
    assert node.maxcpu > 0
    assert 0 < node.mem < node.maxmem
    assert {s.storage for s in node.storages} == {"local", "local-lvm"}
    assert all(s.total >= s.used for s in node.storages)


async def test_offline_node_is_listed_without_detail_calls(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    sim.state.add_node("pve2", online=False)
    sim.request_log.clear()
    nodes = {n.node: n for n in await pve.nodes()}
    assert nodes["pve2"].status == "offline"
    assert nodes["pve2"].storages == ()
    assert not any(r.path.startswith("/nodes/pve2") for r in sim.request_log.records())


async def test_next_vmid_accepts_the_string(sim: Simulator, pve: ProxmoxClient) -> None:
    vmid = await pve.next_vmid()
    assert isinstance(vmid, int)
    assert vmid >= 100
    assert await pve.find_guest(vmid) is None


# -- typed errors -----------------------------------------------------------------------------


async def test_bad_token_is_an_auth_error(make_client: ClientFactory) -> None:
    pve = make_client(secret="00000000-0000-0000-0000-000000000000")
    with pytest.raises(PveAuthError) as caught:
        await pve.guests()
    assert caught.value.status_code == 401
    assert "invalid token value" in caught.value.message
    assert "00000000-0000" not in caught.value.message
    assert [p["code"] for p in pve.problems()] == ["pve_auth_failed"]


async def test_permission_denied_names_the_privilege(
    sim: Simulator, make_client: ClientFactory
) -> None:
    weak = sim.add_token("viewer@pve", "ro", CTRLABLE_ROLE - {"VM.PowerMgmt"})
    sim.state.add_guest("lxc", 150, "pve", "ct-150")
    pve = make_client(token_id=weak.full_id, secret=weak.secret)
    with pytest.raises(PvePermissionDenied) as caught:
        await pve.power("lxc", "pve", 150, "start")
    assert (caught.value.path, caught.value.privilege) == ("/vms/150", "VM.PowerMgmt")
    assert caught.value.status == 502
    assert pve.problems() == [
        {
            "code": "missing_privilege",
            "message": caught.value.message,
            "privilege": "VM.PowerMgmt",
            "path": "/vms/150",
        }
    ]
    assert len(_records(sim, "POST", "/status/start")) == 1  # a 403 is not retried


async def test_missing_sys_audit_degrades_host_health(
    sim: Simulator, make_client: ClientFactory
) -> None:
    weak = sim.add_token("viewer@pve", "nosys", CTRLABLE_ROLE - {"Sys.Audit"})
    pve = make_client(token_id=weak.full_id, secret=weak.secret)
    (node,) = await pve.nodes()
    assert node.node == "pve"
    assert node.status == "online"
    assert {p["privilege"] for p in pve.problems()} == {"Sys.Audit"}


async def test_missing_privilege_problem_clears_once_granted(
    sim: Simulator, make_client: ClientFactory
) -> None:
    weak = sim.add_token("viewer@pve", "later", CTRLABLE_ROLE - {"VM.PowerMgmt"})
    sim.state.add_guest("lxc", 151, "pve", "ct-151")
    pve = make_client(token_id=weak.full_id, secret=weak.secret)
    with pytest.raises(PvePermissionDenied):
        await pve.power("lxc", "pve", 151, "start")
    assert pve.problems()
    weak.set_privileges(CTRLABLE_ROLE)
    assert await pve.power("lxc", "pve", 151, "start") == "running"
    assert pve.problems() == []


async def test_missing_guest_is_not_found(pve: ProxmoxClient) -> None:
    with pytest.raises(PveNotFound) as caught:
        await pve.status("qemu", "pve", 999)
    assert "999.conf" in caught.value.message
    assert caught.value.status == 404
    with pytest.raises(PveNotFound):
        await pve.power("lxc", "pve", 999, "start")


async def test_unknown_node_is_not_found(pve: ProxmoxClient) -> None:
    with pytest.raises(PveNotFound, match="hostname lookup 'nope' failed"):
        await pve.status("lxc", "nope", LXC_TEMPLATE)


# -- tasks --------------------------------------------------------------------------------------


async def test_failed_task_raises_with_log_tail_and_is_not_retried(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    sim.state.add_guest("lxc", 160, "pve", "ct-160")
    sim.faults.fail_task("vzstart", "startup for container '160' failed")
    with pytest.raises(PveTaskFailed) as caught:
        await pve.power("lxc", "pve", 160, "start")
    err = caught.value
    assert err.exitstatus == "startup for container '160' failed"
    assert err.log_tail[-1] == "TASK ERROR: startup for container '160' failed"
    assert err.details["upid"].startswith("UPID:pve:")
    assert len(_records(sim, "POST", "/status/start")) == 1


async def test_task_warnings_are_success(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("qemu", 161, "pve", "vm-161")
    sim.faults.warn_task("qmstart", 2)
    assert await pve.power("qemu", "pve", 161, "start") == "running"
    assert (await pve.status("qemu", "pve", 161))["status"] == "running"


async def test_task_timeout(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("lxc", 162, "pve", "ct-162")
    sim.core.set_task_duration("vzstart", 5.0)
    with pytest.raises(PveTaskTimeout) as caught:
        await pve.power("lxc", "pve", 162, "start", timeout=0.3)
    assert caught.value.status == 504


async def test_unknown_task_is_polled_again_briefly(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("lxc", 163, "pve", "ct-163")
    sim.faults.fail_next(2, "/nodes/{node}/tasks/{upid}/status", status=400, message="no such task")
    assert await pve.power("lxc", "pve", 163, "start") == "running"
    assert len(_records(sim, "GET", "/status")) >= 3


# -- retries ------------------------------------------------------------------------------------


async def test_lock_errors_are_retried(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("lxc", 170, "pve", "ct-170")
    sim.faults.fail_next(
        2, "/nodes/{node}/lxc/{vmid}/status/start", message="CT is locked (backup)"
    )
    assert await pve.power("lxc", "pve", 170, "start") == "running"
    assert [r.status for r in _records(sim, "POST", "/status/start")] == [500, 500, 200]


async def test_flock_timeouts_are_retried_until_the_budget_ends(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    sim.state.add_guest("lxc", 171, "pve", "ct-171")
    sim.faults.fail_next(
        10,
        "/nodes/{node}/lxc/{vmid}/config",
        method="PUT",
        message="can't lock file '/run/lock/lxc/pve-config-171.lock' - got timeout",
    )
    with pytest.raises(PveLocked):
        await pve.set_config("lxc", "pve", 171, description="x")
    assert len(_records(sim, "PUT", "/config")) == FAST_RETRY.attempts


async def test_unreachable_node_answers_are_retried(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.faults.fail_next(1, "/cluster/resources", status=595, message="No route to host")
    assert await pve.guests(retry=True)
    assert [r.status for r in _records(sim, "GET", "/cluster/resources")] == [595, 200]
    # A dashboard read (the default) fails at once: the next poll is its retry.
    sim.faults.fail_next(1, "/cluster/resources", status=595, message="No route to host")
    with pytest.raises(PveUnavailable):
        await pve.guests()


async def test_connection_refused_is_unavailable(sim: Simulator) -> None:
    connection = Connection.from_url(
        "https://127.0.0.1:9", sim.token_id, sim.token_secret, ca_file=str(sim.ca_file)
    )
    pve = ProxmoxClient(connection, retry=RetryPolicy(attempts=2, first_delay=0.01))
    try:
        with pytest.raises(PveUnavailable) as caught:
            await pve.guests(retry=True)
        assert caught.value.status == 503
        assert pve.calls == 2
    finally:
        await pve.close()


# -- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lxc", "qemu"])
async def test_power_is_idempotent(sim: Simulator, pve: ProxmoxClient, kind: str) -> None:
    sim.state.add_guest(kind, 180, "pve", "g-180")  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "start") == "running"  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "start") == "running"  # type: ignore[arg-type]
    assert (await pve.status(kind, "pve", 180))["status"] == "running"  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "reboot") == "running"  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "shutdown") == "stopped"  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "stop") == "stopped"  # type: ignore[arg-type]
    assert await pve.power(kind, "pve", 180, "shutdown") == "stopped"  # type: ignore[arg-type]
    assert (await pve.status(kind, "pve", 180))["status"] == "stopped"  # type: ignore[arg-type]
    with pytest.raises(PveNotRunning):
        await pve.power(kind, "pve", 180, "reboot")  # type: ignore[arg-type]


async def test_starting_a_template_fails_as_a_task(pve: ProxmoxClient) -> None:
    with pytest.raises(PveTaskFailed, match="template"):
        await pve.power("lxc", "pve", LXC_TEMPLATE, "start")


async def test_destroy_stops_purges_and_is_idempotent(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("lxc", 190, "pve", "ct-190", running=True)
    await pve.destroy("lxc", "pve", 190)
    assert await pve.find_guest(190) is None
    (delete,) = _records(sim, "DELETE", "/lxc/190")
    assert delete.params["purge"] == "1"
    await pve.destroy("lxc", "pve", 190)


async def test_config_roundtrip_sends_booleans_as_ints(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_guest("lxc", 191, "pve", "ct-191")
    await pve.set_config("lxc", "pve", 191, onboot=True, description="hello")
    (put,) = _records(sim, "PUT", "/config")
    assert put.params["onboot"] == "1"
    config = await pve.guest_config("lxc", "pve", 191)
    assert str(config["onboot"]) == "1"
    assert config["description"].strip() == "hello"


async def test_agent_interfaces(sim: Simulator, make_client: ClientFactory) -> None:
    # PVE 8 checks VM.Monitor for guest agent calls (not in the least-privilege role).
    plain = make_client()
    sim.state.add_guest("qemu", 194, "pve", "x", running=True).config["agent"] = "1"
    with pytest.raises(PvePermissionDenied) as caught:
        await plain.agent_interfaces("pve", 194)
    assert caught.value.privilege == "VM.Monitor"
    token = sim.add_token("ctrlable@pve", "agent", CTRLABLE_ROLE | {"VM.Monitor"})
    pve = make_client(token_id=token.full_id, secret=token.secret)
    vm = sim.state.add_guest("qemu", 195, "pve", "haos", running=True)
    vm.config["agent"] = "1"
    vm.agent_running = False
    assert await pve.agent_interfaces("pve", 195) == []  # not answering yet: poll again
    vm.agent_running = True
    names = [i["name"] for i in await pve.agent_interfaces("pve", 195)]
    assert "enp6s18" in names
    vm.set_status("stopped")
    with pytest.raises(PveNotRunning):
        await pve.agent_interfaces("pve", 195)
    sim.state.add_guest("qemu", 196, "pve", "no-agent", running=True).config["agent"] = "0"
    with pytest.raises(ProxmoxError, match="No QEMU guest agent configured"):
        await pve.agent_interfaces("pve", 196)


# -- clone ------------------------------------------------------------------------------------


async def test_lxc_clone_sets_hostname_links_and_fresh_mac(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    newid = await pve.next_vmid()
    await pve.clone("lxc", "pve", LXC_TEMPLATE, newid, "zwavejs-1")
    (post,) = _records(sim, "POST", "/clone")
    assert post.params == {"newid": str(newid), "hostname": "zwavejs-1"}  # linked: PVE default
    config = await pve.guest_config("lxc", "pve", newid)
    assert config["hostname"] == "zwavejs-1"
    assert "base-" in config["rootfs"] or f"vm-{newid}" in config["rootfs"]
    assert "hwaddr=BC:24:11:" in config["net0"]
    assert "lock" not in config


async def test_qemu_clone_uses_name_and_full_as_int(sim: Simulator, pve: ProxmoxClient) -> None:
    await pve.clone(
        "qemu", "pve", QEMU_TEMPLATE, 300, "ctrlable-pro-1", full=True, storage="local-lvm"
    )
    (post,) = _records(sim, "POST", "/clone")
    assert post.params["name"] == "ctrlable-pro-1"
    assert post.params["full"] == "1"
    config = await pve.guest_config("qemu", "pve", 300)
    assert config["name"] == "ctrlable-pro-1"


async def test_concurrent_lxc_clones_of_one_template_are_serialized(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    sim.core.set_task_duration("vzclone", 0.3)
    # A naive second POST while a clone runs gets PVE's lock error ...
    upid = await pve.request("POST", f"nodes/pve/lxc/{LXC_TEMPLATE}/clone", {"newid": 400})
    with pytest.raises(PveLocked, match=r"CT is locked \(disk\)"):
        await pve.request(
            "POST", f"nodes/pve/lxc/{LXC_TEMPLATE}/clone", {"newid": 401}, retry=False
        )
    await pve.wait_task(upid)
    sim.request_log.clear()
    # ... while two clones through the boundary both succeed without ever meeting the lock.
    await asyncio.gather(
        pve.clone("lxc", "pve", LXC_TEMPLATE, 402, "zwavejs-a"),
        pve.clone("lxc", "pve", LXC_TEMPLATE, 403, "zwavejs-b"),
    )
    posts = _records(sim, "POST", "/clone")
    assert [r.status for r in posts] == [200, 200]
    assert posts[1].time >= posts[0].time + 0.3  # the second started after the first task ended
    names = {g.vmid: g.name for g in await pve.guests()}
    assert (names[402], names[403]) == ("zwavejs-a", "zwavejs-b")


async def test_clone_retries_while_someone_else_holds_the_template(
    sim: Simulator, make_client: ClientFactory
) -> None:
    sim.core.set_task_duration("vzclone", 0.2)
    other = make_client()  # another client: its clone is invisible to our per-template lock
    pve = make_client(retry=RetryPolicy(attempts=8, first_delay=0.05, max_delay=0.2))
    await asyncio.gather(
        other.clone("lxc", "pve", LXC_TEMPLATE, 410, "a"),
        pve.clone("lxc", "pve", LXC_TEMPLATE, 411, "b"),
    )
    statuses = [r.status for r in _records(sim, "POST", "/clone")]
    assert statuses.count(500) >= 1  # the lock error was met and retried
    assert statuses.count(200) == 2


async def test_clone_already_exists_is_done_when_ours(sim: Simulator, pve: ProxmoxClient) -> None:
    await pve.clone("lxc", "pve", LXC_TEMPLATE, 420, "zwavejs-1")
    await pve.clone("lxc", "pve", LXC_TEMPLATE, 420, "zwavejs-1")  # a retried / resumed clone
    assert [r.status for r in _records(sim, "POST", "/clone")] == [200, 500]
    with pytest.raises(PveAlreadyExists) as caught:
        await pve.clone("lxc", "pve", LXC_TEMPLATE, 420, "someone-else")
    assert caught.value.status == 409


async def test_clone_task_failure_is_reported_not_retried(
    sim: Simulator, pve: ProxmoxClient
) -> None:
    sim.faults.fail_task(
        "vzclone", "Linked clone feature for 'local-lvm:base-9010-disk-0' is not available"
    )
    with pytest.raises(PveTaskFailed) as caught:
        await pve.clone("lxc", "pve", LXC_TEMPLATE, 430, "x")
    assert caught.value.exitstatus.startswith("clone failed: Linked clone feature")
    assert any("TASK ERROR" in line for line in caught.value.log_tail)
    assert len(_records(sim, "POST", "/clone")) == 1
    assert await pve.find_guest(430) is None


async def test_fresh_clone_shows_unknown_status(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.config.resources_lag = 30
    await pve.clone("lxc", "pve", LXC_TEMPLATE, 440, "fresh")
    guest = await pve.find_guest(440)
    assert guest is not None
    assert guest.node == "pve"
    assert guest.status == "unknown"
    assert guest.settling
    assert guest.as_dict()["status"] == "unknown"
    # The guest itself is fine: direct calls work and power acts on it.
    assert await pve.power("lxc", guest.node, 440, "start") == "running"


async def test_cluster_node_resolution(sim: Simulator, pve: ProxmoxClient) -> None:
    sim.state.add_node("pve2")
    sim.state.add_guest("lxc", 9110, "pve2", "tmpl-on-pve2", template=True)
    template = await pve.find_guest(9110)
    assert template is not None
    assert template.node == "pve2"
    await pve.clone("lxc", template.node, 9110, 450, "on-two")
    assert await pve.node_of(450) == "pve2"
    assert await pve.power("lxc", await pve.node_of(450), 450, "start") == "running"
    polls = _records(sim, "GET", "/status")
    assert polls
    assert all(r.path.startswith("/nodes/pve2/") for r in polls)
    with pytest.raises(PveNotFound):
        await pve.node_of(451)
    assert {n.node for n in await pve.nodes()} == {"pve", "pve2"}


# -- TLS ------------------------------------------------------------------------------------------


async def test_pinned_fingerprint_right_works(sim: Simulator, make_client: ClientFactory) -> None:
    pve = make_client(ca=False, fingerprint=sim.fingerprint)
    assert pve.connection.verify is False
    assert await pve.guests()


async def test_pinned_fingerprint_wrong_fails_closed(
    sim: Simulator, make_client: ClientFactory
) -> None:
    wrong = ":".join(["AB"] * 32)
    assert wrong != sim.fingerprint
    pve = make_client(ca=False, fingerprint=wrong)
    sim.request_log.clear()
    with pytest.raises(PveTlsError, match="Fingerprints did not match"):
        await pve.guests()
    assert pve.calls == 1  # not retried
    assert sim.request_log.records() == []  # nothing reached the API
    assert [p["code"] for p in pve.problems()] == ["pve_tls_error"]


async def test_unknown_ca_fails_closed(sim: Simulator, make_client: ClientFactory) -> None:
    pve = make_client(ca=False)  # default verification: the system store lacks the sim's CA
    with pytest.raises(PveTlsError, match="CERTIFICATE_VERIFY_FAILED"):
        await pve.guests()
    assert sim.request_log.records() == []
