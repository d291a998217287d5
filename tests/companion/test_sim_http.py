"""The simulator's wire behaviour over real HTTPS: status lines, reason phrases, bodies, headers
(proxmox-api.md §1, §2, §7, §8), plus the control API, fault injection and the request log."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator

import pytest

from companion.sim import SimConfig, Simulator, run_simulator

from .sim_support import Raw, fast_config


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(fast_config()) as s:
        yield s


@pytest.fixture
async def raw(sim: Simulator) -> AsyncIterator[Raw]:
    client = Raw(sim)
    yield client
    await client.close()


async def test_success_envelope_and_headers(raw: Raw) -> None:
    resp = await raw.request("GET", "/version")
    assert resp.status == 200
    assert resp.headers["Server"] == "pve-api-daemon/3.0"
    assert resp.headers["Content-Type"] == "application/json;charset=UTF-8"
    assert resp.json() == {
        "data": {"version": "8.3.2", "release": "8.3", "repoid": "3e76eec21c4a14a7"}
    }


async def test_certificate_fingerprint_and_ca(sim: Simulator) -> None:
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", sim.port))
    der = ssl.PEM_cert_to_DER_cert(pem)
    digest = hashlib.sha256(der).hexdigest().upper()
    assert sim.fingerprint == ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert sim.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")


async def test_401_has_an_empty_body_and_the_reason(raw: Raw, sim: Simulator) -> None:
    resp = await raw.request("GET", "/version", auth="")
    assert (resp.status, resp.reason, resp.body) == (401, "No ticket", b"")
    resp = await raw.request("GET", "/version", auth=f"PVEAPIToken={sim.token_id}=wrong")
    assert (resp.status, resp.reason, resp.body) == (401, "invalid token value!", b"")
    resp = await raw.request("GET", "/version", auth="PVEAPIToken=ctrlable@pve!other=x")
    assert resp.reason == "no such token 'other' for user 'ctrlable@pve'"
    # A space works as the first separator, as in PVE.
    ok = await raw.request("GET", "/version", auth=f"PVEAPIToken {sim.token_id}={sim.token_secret}")
    assert ok.status == 200
    sim.config.uniform_auth_error = True
    resp = await raw.request("GET", "/version", auth=f"PVEAPIToken={sim.token_id}=wrong")
    assert (resp.status, resp.reason, resp.body) == (401, "Authentication failed!", b"")
    assert resp.headers["Server"] == "pve-api-daemon/3.0"


async def test_501_for_unknown_path_or_method(raw: Raw) -> None:
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/config", data={"hostname": "x"})
    assert resp.status == 501
    assert resp.reason == "Method 'POST /nodes/pve/lxc/9010/config' not implemented"
    assert resp.json() == {"data": None}


async def test_400_carries_the_errors_map(raw: Raw) -> None:
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", data={"full": "True", "foo": "1"})
    assert (resp.status, resp.reason) == (400, "Parameter verification failed.")
    assert resp.json() == {
        "data": None,
        "errors": {
            "full": "type check ('boolean') failed - got 'True'",
            "foo": "property is not defined in schema and the schema does not allow "
            "additional properties",
            "newid": "property is missing and it is not optional",
        },
    }


async def test_json_body_with_true_false(raw: Raw, sim: Simulator) -> None:
    resp = await raw.request(
        "POST", "/nodes/pve/qemu/9000/clone", json={"newid": 150, "full": False, "name": "j"}
    )
    assert resp.status == 200
    await sim.wait_task(resp.json()["data"])
    assert sim.state.guests[150].config["scsi0"].startswith("local-lvm:base-9000-disk-0/vm-150")


async def test_duplicate_uri_parameter(raw: Raw) -> None:
    resp = await raw.request("GET", "/nodes/pve/qemu/9000/config?vmid=9001")
    assert resp.status == 400
    assert resp.json()["errors"] == {
        "vmid": "duplicate parameter (already defined in URI) with conflicting values!"
    }


async def test_missing_guest_is_500_configuration_file(raw: Raw) -> None:
    resp = await raw.request("GET", "/nodes/pve/qemu/999/status/current")
    assert resp.status == 500
    assert resp.reason == "Configuration file 'nodes/pve/qemu-server/999.conf' does not exist"
    assert resp.json() == {"data": None}
    resp = await raw.request("GET", "/nodes/pve/lxc/999/config")
    assert resp.reason == "Configuration file 'nodes/pve/lxc/999.conf' does not exist"
    # The right vmid with the wrong type is missing too.
    resp = await raw.request("GET", "/nodes/pve/lxc/9000/config")
    assert resp.reason == "Configuration file 'nodes/pve/lxc/9000.conf' does not exist"


async def test_message_in_body_knob(raw: Raw, sim: Simulator) -> None:
    sim.config.message_in_body = True
    resp = await raw.request("GET", "/nodes/pve/lxc/999/config")
    assert resp.json() == {
        "data": None,
        "message": "Configuration file 'nodes/pve/lxc/999.conf' does not exist\n",
    }


async def test_unknown_node(raw: Raw) -> None:
    resp = await raw.request("GET", "/nodes/nope/status")
    assert resp.status == 500
    assert resp.reason.startswith("hostname lookup 'nope' failed - ")


async def test_403_names_path_and_privilege(raw: Raw, sim: Simulator) -> None:
    audit = sim.add_token("viewer@pve", "ro", {"VM.Audit"})
    resp = await raw.request("POST", "/nodes/pve/qemu/9000/status/start", token=audit)
    assert (resp.status, resp.reason) == (403, "Permission check failed (/vms/9000, VM.PowerMgmt)")
    assert resp.json() == {"data": None}
    # An 'or' check fails with the bare phrase.
    cloner = sim.add_token("cloner@pve", "cl", {"VM.Clone"}, path="/vms/9010")
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", token=cloner, data={"newid": 300})
    assert (resp.status, resp.reason) == (403, "Permission check failed")
    # A handler-level check: changing the name needs VM.Config.Options.
    net_only = sim.add_token("net@pve", "nw", {"VM.Config.Network"})
    resp = await raw.request(
        "PUT", "/nodes/pve/qemu/9000/config", token=net_only, data={"name": "x"}
    )
    assert resp.reason == "Permission check failed (/vms/9000, VM.Config.Options)"
    # Lists are filtered silently.
    one = sim.add_token("one@pve", "on", {"VM.Audit"}, path="/vms/9010")
    resp = await raw.request("GET", "/cluster/resources?type=vm", token=one)
    assert [e["vmid"] for e in resp.json()["data"]] == [9010]
    resp = await raw.request("GET", "/nodes/pve/status", token=one)
    assert resp.reason == "Permission check failed (/nodes/pve, Sys.Audit)"


async def test_nextid_is_a_string_and_asserts_free_ids(raw: Raw) -> None:
    resp = await raw.request("GET", "/cluster/nextid")
    assert resp.body == b'{"data":"100"}'
    resp = await raw.request("GET", "/cluster/nextid?vmid=9000")
    assert resp.status == 400
    assert resp.json() == {"data": None, "errors": {"vmid": "VM 9000 already exists"}}
    resp = await raw.request("GET", "/cluster/nextid?vmid=4242")
    assert resp.json() == {"data": "4242"}


async def test_task_endpoints_reject_bad_and_unknown_upids(raw: Raw) -> None:
    resp = await raw.request("GET", "/nodes/pve/tasks/nonsense/status")
    assert resp.json()["errors"] == {"upid": "unable to parse worker upid"}
    fake = "UPID:pve:00001234:00ABCDEF:6650A1B2:qmstart:100:root@pam:"
    resp = await raw.request("GET", f"/nodes/pve/tasks/{fake}/status")
    assert (resp.status, resp.json()["errors"]) == (400, {"upid": "no such task"})


async def test_task_log_shape(raw: Raw, sim: Simulator) -> None:
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", data={"newid": "120"})
    upid = resp.json()["data"]
    await sim.wait_task(upid)
    resp = await raw.request("GET", f"/nodes/pve/tasks/{upid}/log")
    body = resp.json()
    assert body["total"] == len(body["data"]) == 2
    assert body["data"] == [
        {"n": 1, "t": "create linked clone of mount point rootfs (local-lvm:base-9010-disk-0)"},
        {"n": 2, "t": "TASK OK"},
    ]
    resp = await raw.request("GET", f"/nodes/pve/tasks/{upid}/log?start=1&limit=1")
    assert resp.json() == {"data": [{"n": 2, "t": "TASK OK"}], "total": 2}


async def test_fault_injection_from_python(raw: Raw, sim: Simulator) -> None:
    sim.faults.fail_next(
        2, "/nodes/{node}/lxc/{vmid}/clone", status=500, message="got no worker upid"
    )
    for _ in range(2):
        resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", data={"newid": 130})
        assert (resp.status, resp.reason) == (500, "got no worker upid")
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", data={"newid": 130})
    assert resp.status == 200
    sim.faults.set_error_rate("/cluster/*", 1.0, status=596, message="Broken pipe", method="GET")
    resp = await raw.request("GET", "/cluster/resources")
    assert (resp.status, resp.reason) == (596, "Broken pipe")
    assert (await raw.request("GET", "/version")).status == 200
    sim.faults.set_latency("/version", 0.01)
    assert sim.faults.latency_for("GET", "/version", "/version") == 0.01
    sim.faults.clear()
    assert (await raw.request("GET", "/cluster/resources")).status == 200


async def test_request_log(raw: Raw, sim: Simulator) -> None:
    sim.request_log.clear()
    await raw.request("GET", "/cluster/resources?type=vm")
    await raw.request("POST", "/nodes/pve/qemu/9000/status/start", data={"timeout": "30"})
    await raw.request("GET", "/version", auth="")
    records = sim.request_log.records()
    assert [(r.method, r.path, r.status) for r in records] == [
        ("GET", "/cluster/resources", 200),
        ("POST", "/nodes/pve/qemu/9000/status/start", 200),
        ("GET", "/version", 401),
    ]
    assert records[0].params == {"type": "vm"}
    assert records[0].endpoint == "/cluster/resources"
    assert records[1].token == sim.token_id
    assert records[2].token is None
    assert sim.request_log.count("GET", "/cluster/resources") == 1


async def test_control_api(raw: Raw, sim: Simulator) -> None:
    base = sim.base_url + "/_sim"
    resp = await raw.request("GET", "/state", base=base, auth="")
    assert resp.status == 401
    resp = await raw.request(
        "POST", "/faults", base=base, json={"endpoint": "/version", "fail_next": 1, "status": 503}
    )
    assert resp.status == 200
    assert (await raw.request("GET", "/version")).status == 503
    assert (await raw.request("GET", "/version")).status == 200
    resp = await raw.request("POST", "/faults", base=base, json={"error_rate": 2})
    assert resp.status == 400
    assert resp.json()["error"]["field"] == "error_rate"
    resp = await raw.request("PATCH", "/guests/9000", base=base, json={"agent_ip": "127.0.0.1"})
    assert resp.status == 200
    assert sim.state.guests[9000].agent_ip == "127.0.0.1"
    resp = await raw.request("PUT", "/task-durations", base=base, json={"vzclone": 0.2})
    assert sim.config.task_durations["vzclone"] == 0.2
    resp = await raw.request("POST", "/nodes/pve/lxc/9010/clone", data={"newid": 140})
    upid = resp.json()["data"]
    resp = await raw.request("POST", f"/tasks/{upid}/kill", base=base, json={"mode": "interrupt"})
    assert resp.json()["exitstatus"] == "clone failed: interrupted by signal"
    assert 140 not in sim.state.guests
    resp = await raw.request("GET", "/requests", base=base)
    assert any(r["path"] == "/version" and r["status"] == 503 for r in resp.json())
    await raw.request("DELETE", "/requests", base=base)
    assert sim.request_log.records() == []
    resp = await raw.request("PATCH", "/settings", base=base, json={"resources_lag": 1.5})
    assert sim.config.resources_lag == 1.5
    resp = await raw.request("GET", "/nope", base=base)
    assert resp.status == 404


async def test_config_validation() -> None:
    with pytest.raises(ValueError, match="task_seconds"):
        SimConfig(task_seconds=-1)
    with pytest.raises(ValueError, match="error_rate"):
        Simulator().faults.set_error_rate("*", 1.5)
