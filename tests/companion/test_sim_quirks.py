"""Each quirk of proxmox-api.md §4 (clone) and §6 (lifecycle), replayed through proxmoxer over
HTTPS: the simulator answers with PVE's status code, reason phrase, body and task exitstatus."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from companion.sim import Simulator, run_simulator

from .sim_support import fails, fast_config, prox, run, task_log, wait_task

MAC = re.compile(r"^BC:24:11:[0-9A-F]{2}:[0-9A-F]{2}:[0-9A-F]{2}$")
UPID = re.compile(
    r"^UPID:pve:[0-9A-F]{8}:[0-9A-F]{8,9}:[0-9A-F]{8}:\w+:\d+:ctrlable@pve!provisioner:$"
)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(fast_config()) as s:
        s.state.add_guest("qemu", 100, "pve", "vm100", running=True)
        s.state.add_guest("lxc", 101, "pve", "ct101", running=True)
        s.state.add_guest("qemu", 102, "pve", "vm102")
        s.state.add_guest("lxc", 103, "pve", "ct103")
        yield s


@pytest.fixture
def api(sim: Simulator) -> Any:
    return prox(sim)


def node(api: Any) -> Any:
    return api.nodes("pve")


async def task_result(api: Any, upid: str) -> tuple[str, list[str]]:
    assert UPID.match(upid), upid
    status = await wait_task(api, upid)
    return status["exitstatus"], await task_log(api, upid)


# -- §4 clone --------------------------------------------------------------------------------


async def test_lxc_clone_locks_source_with_disk_and_target_with_create(
    sim: Simulator, api: Any
) -> None:
    sim.core.set_task_duration("vzclone", 0.4)
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=200, hostname="zw-1"))
    assert upid.split(":")[5:8] == ["vzclone", "9010", "ctrlable@pve!provisioner"]
    src = await run(lambda: node(api).lxc(9010).status.current.get())
    dst = await run(lambda: node(api).lxc(200).status.current.get())
    assert (src["lock"], dst["lock"]) == ("disk", "create")
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=201))
    assert (err.status_code, err.content) == (500, "CT is locked (disk)")
    assert str(err) == "500 Internal Server Error: CT is locked (disk)"
    exitstatus, log = await task_result(api, upid)
    assert exitstatus == "OK"
    assert log == [
        "create linked clone of mount point rootfs (local-lvm:base-9010-disk-0)",
        "TASK OK",
    ]
    src = await run(lambda: node(api).lxc(9010).status.current.get())
    assert "lock" not in src
    config = await run(lambda: node(api).lxc(200).config.get())
    assert config["hostname"] == "zw-1"
    assert config["rootfs"].startswith("local-lvm:base-9010-disk-0/vm-200-disk-0")
    assert "template" not in config
    assert "lock" not in config
    upid2 = await run(lambda: node(api).lxc(9010).clone.post(newid=201))
    assert (await task_result(api, upid2))[0] == "OK"


async def test_qemu_parallel_clones_of_a_template_target_lock_clone(
    sim: Simulator, api: Any
) -> None:
    sim.core.set_task_duration("qmclone", 0.4)
    upids = [
        await run(lambda n=n: node(api).qemu(9000).clone.post(newid=n, name=f"pro-{n}"))
        for n in (210, 211)
    ]
    current = await run(lambda: node(api).qemu(210).status.current.get())
    assert current["lock"] == "clone"
    src = await run(lambda: node(api).qemu(9000).status.current.get())
    assert "lock" not in src  # the source only takes a shared flock
    for upid in upids:
        exitstatus, log = await task_result(api, upid)
        assert exitstatus == "OK"
        assert log[0] == "create linked clone of drive scsi0 (local-lvm:base-9000-disk-0)"
        assert log[-1] == "TASK OK"
    config = await run(lambda: node(api).qemu(211).config.get())
    assert config["name"] == "pro-211"
    assert "lock" not in config
    assert "template" not in config


async def test_qemu_clone_default_name_and_fresh_identity(sim: Simulator, api: Any) -> None:
    source = sim.state.guests[9000]
    source.config["net1"] = "e1000=BC:24:11:AA:BB:CC,bridge=vmbr1"
    upid = await run(lambda: node(api).qemu(9000).clone.post(newid=212))
    await wait_task(api, upid)
    new = await run(lambda: node(api).qemu(212).config.get())
    assert new["name"] == "Copy-of-VM-ctrlable-pro"
    for key in ("net0", "net1"):
        mac = new[key].split(",")[0].split("=")[1]
        assert MAC.match(mac)
        assert mac not in source.config[key]
    assert new["net1"].startswith("e1000=BC:24:11:")
    assert new["net1"].endswith(",bridge=vmbr1")
    assert new["smbios1"] != source.config["smbios1"]
    assert new["vmgenid"] != source.config["vmgenid"]


async def test_lxc_clone_regenerates_every_mac(sim: Simulator, api: Any) -> None:
    sim.state.guests[9020].config["net1"] = (
        "name=eth1,bridge=vmbr1,hwaddr=BC:24:11:01:02:03,ip=dhcp"
    )
    upid = await run(lambda: node(api).lxc(9020).clone.post(newid=220))
    await wait_task(api, upid)
    config = await run(lambda: node(api).lxc(220).config.get())
    macs = [re.search(r"hwaddr=([^,]+)", config[k]).group(1) for k in ("net0", "net1")]  # type: ignore[union-attr]
    assert all(MAC.match(m) for m in macs)
    assert "BC:24:11:01:02:03" not in macs
    assert config["hostname"] == "zigbee2mqtt"  # LXC keeps the source hostname


async def test_clone_already_exists(api: Any) -> None:
    err = await fails(lambda: node(api).qemu(9000).clone.post(newid=9010))
    assert err.content == "unable to create VM 9010: config file already exists"
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=103))
    assert err.content == "CT 103 already exists on node 'pve'"
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=9000))
    assert err.content == "VM 9000 already exists on node 'pve'"
    # the failed attempt released the source's disk lock
    assert "lock" not in await run(lambda: node(api).lxc(9010).status.current.get())


async def test_storage_only_for_full_clones(sim: Simulator, api: Any) -> None:
    for kind in ("qemu", "lxc"):
        vmid = 9000 if kind == "qemu" else 9010
        err = await fails(
            lambda k=kind, v=vmid: getattr(node(api), k)(v).clone.post(
                newid=230, storage="local-lvm"
            )
        )
        assert (err.status_code, err.content) == (
            500,
            "parameter 'storage' not allowed for linked clones",
        )
    sim.state.add_storage("fast", type="lvmthin", content=("images", "rootdir"))
    upid = await run(
        lambda: node(api).qemu(9000).clone.post(newid=231, full=1, storage="fast", format="raw")
    )
    _, log = await task_result(api, upid)
    assert log[0] == "create full clone of drive scsi0 (local-lvm:base-9000-disk-0)"
    config = await run(lambda: node(api).qemu(231).config.get())
    assert config["scsi0"].startswith("fast:vm-231-disk-0,")
    err = await fails(lambda: node(api).qemu(9000).clone.post(newid=232, full=1, storage="local"))
    assert err.status_code == 400
    assert err.errors == {"storage": "storage 'local' does not support vm images"}


async def test_linked_clone_needs_a_template(api: Any) -> None:
    err = await fails(lambda: node(api).qemu(102).clone.post(newid=240, full=0))
    assert (
        err.content == "Linked clone feature is not supported for 'local-lvm:vm-102-disk-0' (scsi0)"
    )
    err = await fails(lambda: node(api).lxc(103).clone.post(newid=240, full=0))
    assert err.content == "Linked clone feature for 'local-lvm:vm-103-disk-0' is not available"
    upid = await run(lambda: node(api).qemu(102).clone.post(newid=241))  # full by default
    assert (await task_result(api, upid))[1][0].startswith("create full clone of drive scsi0")


async def test_clone_to_another_node(sim: Simulator, api: Any) -> None:
    sim.state.add_node("pve2")
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=250, target="pve9"))
    assert err.content == "no such cluster node 'pve9'"
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=250, target="pve2"))
    assert err.content == "can't clone CT to node 'pve2' (CT uses local storage)"
    err = await fails(lambda: node(api).qemu(9000).clone.post(newid=250, target="pve2"))
    assert err.content == "can't clone VM to node 'pve2' (VM uses local storage)"
    sim.state.add_storage("ceph", type="rbd", content=("images", "rootdir"), shared=True)
    sim.state.add_guest("qemu", 9100, "pve2", "shared-tpl", template=True, storage="ceph")
    upid = await run(
        lambda: api.nodes("pve2").qemu(9100).clone.post(newid=251, target="pve", name="x")
    )
    assert upid.startswith("UPID:pve2:")
    await wait_task(api, upid)
    resources = await run(lambda: api.cluster.resources.get(type="vm"))
    assert {r["vmid"]: r["node"] for r in resources}[251] == "pve"


async def test_qemu_config_waits_for_the_clone_flock(sim: Simulator, api: Any) -> None:
    sim.core.set_task_duration("qmclone", 1.0)
    upid = await run(lambda: node(api).qemu(9000).clone.post(newid=260))
    await asyncio.sleep(0.05)
    err = await fails(lambda: node(api).qemu(260).config.put(description="x"))
    assert err.content == "can't lock file '/var/lock/qemu-server/lock-260.conf' - got timeout"
    err = await fails(lambda: node(api).qemu(9000).config.put(description="x"))
    assert err.content == "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout"
    # a start on the source waits for the flock inside its task and fails there
    start = await run(lambda: node(api).qemu(9000).status.start.post())
    exitstatus, _ = await task_result(api, start)
    assert exitstatus == "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout"
    assert (await task_result(api, upid))[0] == "OK"


async def test_failed_clone_task_cleans_up(sim: Simulator, api: Any) -> None:
    sim.faults.fail_task("vzclone", "lvcreate 'pve/vm-270-disk-0' error: out of space")
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=270))
    exitstatus, log = await task_result(api, upid)
    assert exitstatus == "clone failed: lvcreate 'pve/vm-270-disk-0' error: out of space"
    assert log[-1] == "TASK ERROR: clone failed: lvcreate 'pve/vm-270-disk-0' error: out of space"
    assert 270 not in sim.state.guests
    assert sim.state.guests[9010].lock is None
    sim.faults.fail_task("qmclone", "clone failed hard")
    upid = await run(lambda: node(api).qemu(9000).clone.post(newid=271))
    assert (await task_result(api, upid))[0] == "clone failed: clone failed hard"
    assert 271 not in sim.state.guests


async def test_vanished_clone_worker_leaves_locks(sim: Simulator, api: Any) -> None:
    sim.core.set_task_duration("vzclone", 5.0)
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=280))
    await sim.kill_task(upid, "vanish")
    status = await wait_task(api, upid)
    assert status["exitstatus"] == "unexpected status"
    assert "TASK" not in " ".join(await task_log(api, upid))
    assert sim.state.guests[9010].lock == "disk"
    assert sim.state.guests[280].lock == "create"


async def test_task_warnings_count_as_exitstatus(sim: Simulator, api: Any) -> None:
    sim.faults.warn_task("vzclone", 2)
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=290))
    exitstatus, log = await task_result(api, upid)
    assert exitstatus == "WARNINGS: 2"
    assert log[-1] == "TASK WARNINGS: 2"
    status = await wait_task(api, upid)
    assert (status["user"], status["tokenid"], status["type"], status["id"]) == (
        "ctrlable@pve",
        "provisioner",
        "vzclone",
        "9010",
    )


async def test_resources_lag_for_a_fresh_clone(sim: Simulator, api: Any) -> None:
    sim.config.resources_lag = 0.5
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=295, hostname="fresh"))
    await wait_task(api, upid)
    entry = next(
        r for r in await run(lambda: api.cluster.resources.get(type="vm")) if r["vmid"] == 295
    )
    assert entry == {
        "id": "lxc/295",
        "vmid": 295,
        "node": "pve",
        "type": "lxc",
        "status": "unknown",
    }
    # node-local lists are live
    items = await run(lambda: node(api).lxc.get())
    assert next(i for i in items if i["vmid"] == 295)["name"] == "fresh"
    await asyncio.sleep(0.55)
    entry = next(
        r for r in await run(lambda: api.cluster.resources.get(type="vm")) if r["vmid"] == 295
    )
    assert (entry["status"], entry["name"], entry["template"]) == ("stopped", "fresh", 0)


# -- §6 lifecycle ----------------------------------------------------------------------------


async def test_start_already_running(api: Any) -> None:
    upid = await run(lambda: node(api).qemu(100).status.start.post())
    exitstatus, log = await task_result(api, upid)
    assert exitstatus == "VM 100 already running"
    assert log[-1] == "TASK ERROR: VM 100 already running"
    err = await fails(lambda: node(api).lxc(101).status.start.post())
    assert (err.status_code, err.content) == (500, "CT 101 already running")


async def test_start_a_template(api: Any) -> None:
    upid = await run(lambda: node(api).qemu(9000).status.start.post())
    assert (await task_result(api, upid))[0] == "you can't start a vm if it's a template"
    upid = await run(lambda: node(api).lxc(9010).status.start.post())
    assert (await task_result(api, upid))[0] == "you can't start a CT if it's a template"


async def test_start_locked(sim: Simulator, api: Any) -> None:
    sim.state.guests[102].config["lock"] = "backup"
    upid = await run(lambda: node(api).qemu(102).status.start.post())
    assert (await task_result(api, upid))[0] == "VM is locked (backup)"
    sim.core.set_task_duration("vzclone", 1.0)
    clone = await run(lambda: node(api).lxc(9010).clone.post(newid=300))
    upid = await run(lambda: node(api).lxc(300).status.start.post())
    assert (await task_result(api, upid))[0] == "CT is locked (create)"
    await sim.kill_task(clone)


async def test_stop_and_shutdown_when_not_running(api: Any) -> None:
    for action in ("stop", "shutdown"):
        upid = await run(lambda a=action: getattr(node(api).qemu(102).status, a).post())
        exitstatus, log = await task_result(api, upid)
        assert (exitstatus, log) == ("OK", ["TASK OK"])
        err = await fails(lambda a=action: getattr(node(api).lxc(103).status, a).post())
        assert (err.status_code, err.content) == (500, "CT 103 not running")


async def test_shutdown_timeout_and_force(sim: Simulator, api: Any) -> None:
    sim.state.guests[100].ignores_shutdown = True
    sim.state.guests[101].ignores_shutdown = True
    upid = await run(lambda: node(api).qemu(100).status.shutdown.post(timeout=5))
    assert (await task_result(api, upid))[0] == "VM quit/powerdown failed - got timeout"
    upid = await run(lambda: node(api).lxc(101).status.shutdown.post(timeout=5))
    assert (await task_result(api, upid))[0] == "container did not stop"
    upid = await run(lambda: node(api).qemu(100).status.shutdown.post(forceStop=1))
    assert (await task_result(api, upid))[0] == "OK"
    assert sim.state.guests[100].status == "stopped"


async def test_reboot_not_running(api: Any) -> None:
    err = await fails(lambda: node(api).qemu(102).status.reboot.post())
    assert (err.status_code, err.content) == (500, "VM 102 not running")
    err = await fails(lambda: node(api).lxc(103).status.reboot.post())
    assert (err.status_code, err.content) == (500, "VM 103 not running")  # sic


async def test_start_stop_round_trip(sim: Simulator, api: Any) -> None:
    upid = await run(lambda: node(api).lxc(103).status.start.post())
    assert (await task_result(api, upid))[0] == "OK"
    current = await run(lambda: node(api).lxc(103).status.current.get())
    assert current["status"] == "running"
    assert current["pid"] > 0
    upid = await run(lambda: node(api).lxc(103).status.stop.post())
    assert (await task_result(api, upid))[0] == "OK"
    upid = await run(lambda: node(api).qemu(100).status.reboot.post())
    assert (await task_result(api, upid))[0] == "OK"
    assert sim.state.guests[100].running


async def test_template_conversion(sim: Simulator, api: Any) -> None:
    upid = await run(lambda: node(api).qemu(102).template.post())
    assert (await task_result(api, upid))[0] == "OK"
    assert sim.state.guests[102].config["scsi0"].startswith("local-lvm:base-102-disk-0")
    assert await run(lambda: node(api).lxc(103).template.post()) is None  # a vztemplate task runs
    vztemplate = next(t for t in sim.tasks.tasks.values() if t.type == "vztemplate")
    await sim.wait_task(vztemplate.upid)
    assert sim.state.guests[103].template
    err = await fails(lambda: node(api).qemu(9000).template.post())
    assert err.content == "you can't convert a template to a template"
    err = await fails(lambda: node(api).qemu(100).template.post())
    assert err.content == "you can't convert a VM to template if VM is running"
    err = await fails(lambda: node(api).lxc(101).template.post())
    assert err.content == "you can't convert a CT to template if the CT is running"


async def test_delete_rules(sim: Simulator, api: Any) -> None:
    err = await fails(lambda: node(api).qemu(100).delete())
    assert err.content == "VM 100 is running - destroy failed"
    err = await fails(lambda: node(api).lxc(101).delete())
    assert err.content == "unable to destroy CT 101 - container is running"
    sim.state.guests[102].config["protection"] = "1"
    err = await fails(lambda: node(api).qemu(102).delete())
    assert err.content == "can't remove VM 102 - protection mode enabled"
    sim.state.guests[103].ha_managed = True
    err = await fails(lambda: node(api).lxc(103).delete())
    assert err.content == (
        "unable to remove CT 103 - used in HA resources and purge parameter not set."
    )
    upid = await run(lambda: node(api).lxc(103).delete(purge=1))
    assert (await task_result(api, upid))[0] == "OK"
    assert 103 not in sim.state.guests
    upid = await run(lambda: node(api).lxc(101).delete(force=1))
    assert (await task_result(api, upid))[0] == "OK"


async def test_delete_locked_sync_for_lxc_task_for_qemu(sim: Simulator, api: Any) -> None:
    sim.state.add_guest("qemu", 104, "pve", "vm104", config={"lock": "backup"})
    sim.state.add_guest("lxc", 105, "pve", "ct105", config={"lock": "backup"})
    upid = await run(lambda: node(api).qemu(104).delete())
    assert (await task_result(api, upid))[0] == "VM is locked (backup)"
    err = await fails(lambda: node(api).lxc(105).delete())
    assert (err.status_code, err.content) == (500, "CT is locked (backup)")


async def test_config_sync_and_async(sim: Simulator, api: Any) -> None:
    assert await run(lambda: node(api).lxc(103).config.put(hostname="renamed")) is None
    assert await run(lambda: node(api).qemu(102).config.put(name="renamed", onboot=1)) is None
    upid = await run(lambda: node(api).qemu(102).config.post(description="async"))
    assert upid.split(":")[5] == "qmconfig"
    assert (await task_result(api, upid))[0] == "OK"
    assert await run(lambda: node(api).qemu(102).config.post(name="bg", background_delay=5)) is None
    config = await run(lambda: node(api).qemu(102).config.get())
    assert (config["name"], config["onboot"], config["description"]) == ("bg", 1, "async")
    assert re.fullmatch(r"[0-9a-f]{40}", config["digest"])
    err = await fails(lambda: node(api).lxc(103).config.put())
    assert err.content == "no options specified"
    err = await fails(lambda: node(api).qemu(102).config.put(name="x", digest="0" * 40))
    assert err.content == "detected modified configuration - file changed by other user? Try again."
    ok = await run(lambda: node(api).qemu(102).config.put(name="y", digest=config["digest"]))
    assert ok is None


async def test_config_net_without_mac_gets_a_fresh_one(api: Any) -> None:
    await run(lambda: node(api).qemu(102).config.put(net0="virtio,bridge=vmbr0,firewall=1"))
    await run(lambda: node(api).lxc(103).config.put(net0="name=eth0,bridge=vmbr0,ip=dhcp"))
    qemu = await run(lambda: node(api).qemu(102).config.get())
    lxc = await run(lambda: node(api).lxc(103).config.get())
    assert re.fullmatch(r"virtio=BC:24:11:[0-9A-F:]{8},bridge=vmbr0,firewall=1", qemu["net0"])
    assert re.fullmatch(r"name=eth0,bridge=vmbr0,hwaddr=BC:24:11:[0-9A-F:]{8},ip=dhcp", lxc["net0"])


async def test_config_on_locked_guest(sim: Simulator, api: Any) -> None:
    sim.core.set_task_duration("vzclone", 1.0)
    clone = await run(lambda: node(api).lxc(9010).clone.post(newid=310))
    err = await fails(lambda: node(api).lxc(310).config.put(hostname="x"))
    assert err.content == "CT is locked (create)"
    await sim.kill_task(clone)


# -- reads -------------------------------------------------------------------------------------


async def test_node_status_shape_and_changing_numbers(sim: Simulator, api: Any) -> None:
    status = await run(lambda: node(api).status.get())
    for key in ("uptime", "kversion", "loadavg", "current-kernel", "boot-info", "cpuinfo", "cpu",
                "wait", "memory", "swap", "ksm", "rootfs", "pveversion"):  # fmt: skip
        assert key in status
    assert all(isinstance(x, str) for x in status["loadavg"])
    assert status["pveversion"].startswith("pve-manager/8.3.2/")
    assert status["memory"]["total"] == status["memory"]["used"] + status["memory"]["free"]
    cpus = {sim.state.node_stats(sim.state.nodes["pve"])["cpu"] for _ in range(5)}
    assert len(cpus) > 1
    storage = await run(lambda: node(api).storage.get())
    assert [(s["storage"], s["shared"], s["active"]) for s in storage] == [
        ("local", 0, 1),
        ("local-lvm", 0, 1),
    ]
    assert await run(lambda: node(api).storage.get(content="images")) == [storage[1]]


async def test_lists_and_status_current(api: Any) -> None:
    qemu = {i["vmid"]: i for i in await run(lambda: node(api).qemu.get())}
    assert qemu[9000]["template"] == 1
    assert qemu[9000]["name"] == "ctrlable-pro"
    assert "template" not in qemu[100]
    assert qemu[100]["status"] == "running"
    lxc = {i["vmid"]: i for i in await run(lambda: node(api).lxc.get())}
    assert lxc[101]["type"] == "lxc"
    assert "maxswap" in lxc[101]
    current = await run(lambda: node(api).qemu(100).status.current.get())
    assert current["ha"] == {"managed": 0}
    assert (current["qmpstatus"], current["agent"]) == ("running", 1)


async def test_guest_agent_addresses(sim: Simulator) -> None:
    monitor = sim.add_token("agent@pve", "ag", {"VM.Audit", "VM.Monitor"})
    api = prox(sim, monitor)
    default = prox(sim)
    err = await fails(lambda: node(default).qemu(100).agent("network-get-interfaces").get())
    assert err.content == "Permission check failed (/vms/100, VM.Monitor)"  # not in the role
    sim.state.guests[100].agent_ip = "127.0.0.1"
    result = await run(lambda: node(api).qemu(100).agent("network-get-interfaces").get())
    addresses = [
        a["ip-address"] for i in result["result"] if i["name"] != "lo" for a in i["ip-addresses"]
    ]
    assert addresses[0] == "127.0.0.1"
    err = await fails(lambda: node(api).qemu(102).agent("network-get-interfaces").get())
    assert err.content == "VM 102 is not running"
    ifaces = await run(lambda: node(default).lxc(101).interfaces.get())
    assert ifaces[1]["name"] == "eth0"
    assert ifaces[1]["inet"].endswith("/24")


async def test_clone_into_a_pool(sim: Simulator, api: Any) -> None:
    err = await fails(lambda: node(api).lxc(9010).clone.post(newid=320, pool="nope"))
    assert (err.status_code, err.content) == (
        403,
        "Permission check failed (pool 'nope' does not exist)",
    )
    sim.state.pools["ctrlable"] = set()
    upid = await run(lambda: node(api).lxc(9010).clone.post(newid=320, pool="ctrlable"))
    await wait_task(api, upid)
    entry = next(
        r for r in await run(lambda: api.cluster.resources.get(type="vm")) if r["vmid"] == 320
    )
    assert entry["pool"] == "ctrlable"


async def test_status_lag_in_cluster_resources_only(sim: Simulator, api: Any) -> None:
    sim.config.resources_status_lag = 0.5
    upid = await run(lambda: node(api).lxc(103).status.start.post())
    await wait_task(api, upid)
    entry = next(
        r for r in await run(lambda: api.cluster.resources.get(type="vm")) if r["vmid"] == 103
    )
    assert entry["status"] == "stopped"  # pvestatd has not caught up yet
    current = await run(lambda: node(api).lxc(103).status.current.get())
    assert current["status"] == "running"


async def test_ha_managed_start_returns_hastart(sim: Simulator, api: Any) -> None:
    sim.state.guests[102].ha_managed = True
    upid = await run(lambda: node(api).qemu(102).status.start.post())
    assert upid.split(":")[5] == "hastart"
    assert (await task_result(api, upid))[0] == "OK"
    current = await run(lambda: node(api).qemu(102).status.current.get())
    assert current["ha"] == {"managed": 1, "state": "started"}


async def test_offline_node(sim: Simulator, api: Any) -> None:
    sim.state.add_node("pve2", online=False)
    nodes = {n["node"]: n for n in await run(lambda: api.nodes.get())}
    assert nodes["pve2"]["status"] == "offline"
    assert "cpu" not in nodes["pve2"]
    err = await fails(lambda: api.nodes("pve2").status.get())
    assert (err.status_code, err.content) == (595, "No route to host")
