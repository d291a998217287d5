"""Pure parsing in the Proxmox boundary: error strings, UPIDs, params, result shapes.

The strings are PVE's own (shared/reference/proxmox-api.md §1, §4, §6, §7)."""

from __future__ import annotations

import pytest

from companion.errors import ApiError
from companion.proxmox import (
    Connection,
    Guest,
    NodeStatus,
    ProxmoxClient,
    ProxmoxError,
    PveAlreadyExists,
    PveAlreadyRunning,
    PveAuthError,
    PveInvalidParameter,
    PveLocked,
    PveNotFound,
    PveNotImplemented,
    PveNotRunning,
    PvePermissionDenied,
    PveTaskFailed,
    PveUnavailable,
    RetryPolicy,
    TaskPolicy,
    classify_message,
    map_error,
    normalize_fingerprint,
    parse_permission,
    parse_upid,
    task_succeeded,
    to_pve_params,
)

UPID = "UPID:proxmox2:000D7AA2:08D5A17C:63DF62A5:vzclone:200:root@pam!api_token:"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Permission check failed (/vms/100, VM.PowerMgmt)", ("/vms/100", "VM.PowerMgmt")),
        ("Permission check failed (/nodes/pve, Sys.Audit)", ("/nodes/pve", "Sys.Audit")),
        (
            "Permission check failed (/storage/local-lvm, Datastore.AllocateSpace)",
            ("/storage/local-lvm", "Datastore.AllocateSpace"),
        ),
        ("Permission check failed", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_permission(reason: str, expected: tuple[str | None, str | None]) -> None:
    assert parse_permission(reason) == expected


def test_403_names_the_privilege_and_path() -> None:
    err = map_error(
        403, "Permission check failed (/vms/100, VM.PowerMgmt)", request="POST /nodes/pve/x"
    )
    assert isinstance(err, PvePermissionDenied)
    assert (err.path, err.privilege) == ("/vms/100", "VM.PowerMgmt")
    assert "VM.PowerMgmt" in err.message
    assert "/vms/100" in err.message
    assert err.details["privilege"] == "VM.PowerMgmt"
    bare = map_error(403, "Permission check failed")
    assert isinstance(bare, PvePermissionDenied)
    assert bare.privilege is None


@pytest.mark.parametrize(
    ("status", "reason", "errors", "cls"),
    [
        (401, "invalid token value!", {"errors": b""}, PveAuthError),
        (401, "", None, PveAuthError),
        (
            500,
            "Configuration file 'nodes/pve/qemu-server/999.conf' does not exist",
            None,
            PveNotFound,
        ),
        (500, "Configuration file 'nodes/pve/lxc/999.conf' does not exist", None, PveNotFound),
        (
            500,
            "hostname lookup 'nope' failed - failed to get address info for: nope",
            None,
            PveNotFound,
        ),
        (500, "no such cluster node 'x'", None, PveNotFound),
        (500, "CT is locked (disk)", None, PveLocked),
        (500, "VM is locked (clone)", None, PveLocked),
        (
            500,
            "can't lock file '/var/lock/qemu-server/lock-133.conf' - got timeout",
            None,
            PveLocked,
        ),
        (
            500,
            "clone failed: cfs-lock 'storage-ceph' error: got lock request timeout",
            None,
            PveLocked,
        ),
        (500, "CT 100 already running", None, PveAlreadyRunning),
        (500, "CT 100 not running", None, PveNotRunning),
        (500, "VM 100 not running", None, PveNotRunning),
        (500, "CT 101 already exists on node 'pve'", None, PveAlreadyExists),
        (500, "unable to create VM 101: config file already exists", None, PveAlreadyExists),
        (500, "cluster not ready - no quorum?", None, PveUnavailable),
        (
            400,
            "Parameter verification failed.",
            {"vmid": "VM 218 already exists"},
            PveAlreadyExists,
        ),
        (
            400,
            "Parameter verification failed.",
            {"full": "type check ('boolean') failed - got 'True'"},
            PveInvalidParameter,
        ),
        (501, "Method 'POST /nodes/pve/lxc/100/config' not implemented", None, PveNotImplemented),
        (595, "Connection refused", None, PveUnavailable),
        (500, "can't remove VM 100 - protection mode enabled", None, ProxmoxError),
    ],
)
def test_map_error(status: int, reason: str, errors: object, cls: type[ProxmoxError]) -> None:
    err = map_error(status, reason, errors)
    assert type(err) is cls
    assert err.status_code == status
    assert isinstance(err, ApiError)  # the HTTP layer answers it as JSON


def test_invalid_parameter_keeps_the_errors_map() -> None:
    err = map_error(
        400, "Parameter verification failed.", {"newid": "value must have a minimum value of 100"}
    )
    assert isinstance(err, PveInvalidParameter)
    assert err.errors == {"newid": "value must have a minimum value of 100"}
    assert "newid" in err.message


def test_http_statuses_of_the_typed_errors() -> None:
    assert map_error(500, "CT 100 not running").status == 409
    assert map_error(500, "Configuration file 'x' does not exist").status == 404
    assert map_error(403, "Permission check failed (/, Sys.Audit)").status == 502
    assert map_error(401, "").status == 502
    assert map_error(595, "x").status == 503
    failed = PveTaskFailed(UPID, "clone failed: boom", ["a", "TASK ERROR: clone failed: boom"])
    assert failed.status == 502
    assert failed.details["log_tail"][-1].startswith("TASK ERROR")
    assert "vzclone" in failed.message


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("VM 100 already running", PveAlreadyRunning),
        ("you can't start a vm if it's a template", None),
        ("VM quit/powerdown failed - got timeout", None),
        ("OK", None),
    ],
)
def test_classify_task_exit_texts(text: str, cls: type[ProxmoxError] | None) -> None:
    assert classify_message(text) is cls


@pytest.mark.parametrize(
    ("exitstatus", "ok"),
    [
        ("OK", True),
        ("WARNINGS: 2", True),
        ("WARNINGS: x", False),
        ("unexpected status", False),
        ("VM 100 already running", False),
        ("", False),
        (None, False),
    ],
)
def test_task_success(exitstatus: str | None, ok: bool) -> None:
    assert task_succeeded(exitstatus) is ok


def test_parse_upid() -> None:
    upid = parse_upid(UPID)
    assert upid.node == "proxmox2"
    assert upid.pid == 0x000D7AA2
    assert upid.type == "vzclone"
    assert upid.id == "200"
    assert upid.user == "root@pam!api_token"
    for bad in (
        "",
        "UPID:pve:1:2:3:qmstart:100:root@pam",
        "TASK:pve:1:2:3:x:1:u:",
        "UPID:pve:zz:1:1:x:1:u:",
    ):
        with pytest.raises(ValueError, match="not a PVE UPID"):
            parse_upid(bad)


def test_booleans_go_out_as_1_and_0() -> None:
    params = to_pve_params(
        {
            "full": True,
            "purge": False,
            "name": "x",
            "newid": 101,
            "pool": None,
            "delete": ["a", "b"],
        }
    )
    assert params == {"full": 1, "purge": 0, "name": "x", "newid": 101, "delete": "a,b"}
    assert all(not isinstance(v, bool) for v in params.values())
    with pytest.raises(TypeError, match="net0"):
        to_pve_params({"net0": {"bridge": "vmbr0"}})


def test_guest_from_cluster_resources() -> None:
    guest = Guest.from_resource(
        {
            "id": "lxc/101",
            "vmid": "101",
            "node": "pve2",
            "type": "lxc",
            "status": "running",
            "name": "zwavejs-1",
            "template": 0,
            "cpu": 0.01,
            "maxcpu": 2,
            "mem": 10,
            "maxmem": 20,
            "uptime": 5,
            "tags": "ctrlable;release-2026.06",
            "lock": "disk",
        }
    )
    assert guest.vmid == 101
    assert guest.node == "pve2"
    assert guest.tags == ("ctrlable", "release-2026.06")
    assert guest.lock == "disk"
    assert guest.as_dict(7) == {
        "vmid": 101,
        "node": "pve2",
        "type": "lxc",
        "name": "zwavejs-1",
        "status": "running",
        "template": False,
        "cpu": 0.01,
        "maxcpu": 2,
        "mem": 10,
        "maxmem": 20,
        "uptime": 5,
        "instance_id": 7,
    }
    assert guest.resource()["tags"] == "ctrlable;release-2026.06"


def test_fresh_clone_with_unknown_status_is_kept() -> None:
    guest = Guest.from_resource(
        {"id": "qemu/105", "vmid": 105, "node": "pve", "type": "qemu", "status": "unknown"}
    )
    assert guest.status == "unknown"
    assert guest.settling
    assert guest.name == "VM105"
    assert guest.template is False
    lxc = Guest.from_resource({"id": "lxc/106", "node": "pve", "type": "lxc"})
    assert (lxc.vmid, lxc.name, lxc.status) == (106, "CT106", "unknown")


def test_node_status_prefers_the_node_status_call() -> None:
    node = NodeStatus.from_api(
        {
            "node": "pve",
            "status": "online",
            "cpu": 0.5,
            "maxcpu": 4,
            "mem": 1,
            "maxmem": 2,
            "uptime": 10,
        },
        {
            "cpu": 0.25,
            "cpuinfo": {"cpus": 8},
            "memory": {"used": 100, "total": 200},
            "uptime": 99,
            "loadavg": ["0.12", "0.10", "0.09"],
            "pveversion": "pve-manager/8.3.2/x",
        },
        [
            {
                "storage": "local-lvm",
                "type": "lvmthin",
                "total": 10,
                "used": 4,
                "avail": 6,
                "active": 1,
                "enabled": 1,
                "shared": 0,
                "content": "rootdir,images",
            },
            {"storage": "local", "type": "dir", "total": 5, "used": 1, "avail": 4},
        ],
    )
    assert (node.cpu, node.maxcpu, node.mem, node.maxmem, node.uptime) == (0.25, 8, 100, 200, 99)
    assert node.loadavg == (0.12, 0.10, 0.09)
    shape = node.as_dict()
    assert [s["storage"] for s in shape["storages"]] == ["local", "local-lvm"]
    assert shape["storages"][1] == {
        "storage": "local-lvm",
        "type": "lvmthin",
        "total": 10,
        "used": 4,
        "avail": 6,
    }
    bare = NodeStatus.from_api({"node": "pve2", "status": "offline"})
    assert bare.as_dict()["storages"] == []


def test_fingerprints() -> None:
    fp = ":".join(["AB"] * 32)
    assert normalize_fingerprint(fp) == "ab" * 32
    assert normalize_fingerprint("ab" * 32) == "ab" * 32
    for bad in ("", "AB:CD", "zz" * 32, "ab" * 20):
        with pytest.raises(ValueError, match="SHA-256"):
            normalize_fingerprint(bad)


def test_connection_from_url() -> None:
    conn = Connection.from_url(
        "https://pve.lan:8006", "ctrlable@pve!provisioner", "s3cret", ca_file="/ca.pem"
    )
    assert (conn.host, conn.port, conn.user, conn.token_name) == (
        "pve.lan",
        8006,
        "ctrlable@pve",
        "provisioner",
    )
    assert conn.verify == "/ca.pem"
    assert "s3cret" not in repr(conn)
    pinned = Connection.from_url(
        "https://10.0.0.2", "a@pve!b", "x", fingerprint=":".join(["0F"] * 32)
    )
    assert pinned.port == 8006
    assert pinned.verify is False  # the pin is the trust anchor
    assert pinned.fingerprint == "0f" * 32
    assert Connection.from_url("https://h", "a@pve!b", "x").verify is True
    with pytest.raises(ValueError, match="pve_url"):
        Connection.from_url("http://h:8006", "a@pve!b", "x")
    with pytest.raises(ValueError, match="pve_token_id"):
        Connection.from_url("https://h", "a@pve", "x")


def test_policies() -> None:
    retry = RetryPolicy(attempts=5, first_delay=0.1, factor=2, max_delay=0.3, jitter=0)
    assert list(retry.delays()) == [0.1, 0.2, 0.3, 0.3]
    tasks = TaskPolicy(first_poll=0.04, growth=0.1, max_poll=2)
    assert tasks.next_poll(0) == 0.04
    assert tasks.next_poll(5) == 0.5
    assert tasks.next_poll(600) == 2


def test_poll_schedule_with_a_learned_duration() -> None:
    tasks = TaskPolicy(first_poll=0.04, growth=0.1, max_poll=2, settle=0.05)
    assert tasks.next_poll(0, 0.5) == 0.5  # first poll when the task should be done
    assert tasks.next_poll(0.48, 0.5) == 0.04  # never more often than first_poll
    assert tasks.next_poll(0, 30) == 2  # never later than max_poll
    assert tasks.next_poll(1.0, 1.0) == 0.05  # past it: every settle fraction of it
    assert tasks.next_poll(101, 1.0) == 2  # running long: growing again, capped
    assert tasks.next_poll(0.0, None) == 0.04
    assert tasks.next_poll(0.0, 0) == 0.04


def test_settings_reject_a_bad_pin_or_a_plain_http_url() -> None:
    from companion.settings import Settings, SettingsError

    base = {"CTRLABLE_API_TOKEN": "t"}
    with pytest.raises(SettingsError, match="CTRLABLE_PVE_FINGERPRINT: .*SHA-256"):
        Settings.from_mapping({**base, "CTRLABLE_PVE_FINGERPRINT": "AB:CD"})
    with pytest.raises(SettingsError, match="CTRLABLE_PVE_URL: .*https"):
        Settings.from_mapping({**base, "CTRLABLE_PVE_URL": "http://pve:8006"})
    pinned = Settings.from_mapping({**base, "CTRLABLE_PVE_FINGERPRINT": ":".join(["0A"] * 32)})
    assert ProxmoxClient.from_settings(pinned).connection.fingerprint == "0a" * 32
