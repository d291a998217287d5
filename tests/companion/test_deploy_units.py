"""The deploy plane's pure parts: names, net strings, MACs, the config PUT, the task schedule."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from companion.deploy import (
    Instance,
    KindHandler,
    Overrides,
    VmHandler,
    check_hostname,
    check_project_name,
    format_net,
    owner_of,
    parse_net,
)
from companion.proxmox import TaskPolicy

LXC_NET = "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:2E:C1:A9,ip=dhcp,type=veth"
QEMU_NET = "virtio=BC:24:11:5E:2A:10,bridge=vmbr0,firewall=1"


def instance(**overrides: Any) -> Instance:
    return Instance(
        id=7,
        project_id=1,
        project="p",
        type="zwavejs",
        hostname="zw-1",
        release="2026.06",
        node="pve",
        template_vmid=9010,
        vmid=101,
        mac=None,
        state="cloning",
        step="configure",
        error=None,
        needs_binding=False,
        overrides=Overrides(**overrides),
        created_at="x",
        updated_at="x",
        step_at="x",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zwavejs-1", "zwavejs-1"), ("ZW-Main", "zw-main"), ("a", "a"), ("x" * 63, "x" * 63)],
)
def test_hostnames_are_dns_labels(value: str, expected: str) -> None:
    assert check_hostname(value) == expected


@pytest.mark.parametrize("value", ["", "-a", "a-", "a_b", "a.b", "x" * 64, "123", "é"])
def test_bad_hostnames(value: str) -> None:
    with pytest.raises(ValueError, match="not"):
        check_hostname(value)


def test_project_names() -> None:
    assert check_project_name("Smith-House") == "smith-house"
    with pytest.raises(ValueError, match="project name"):
        check_project_name("smith house")


def test_net_strings_round_trip() -> None:
    assert format_net(parse_net(LXC_NET)) == LXC_NET
    assert format_net(parse_net(QEMU_NET)) == QEMU_NET


def test_macs_of_both_kinds() -> None:
    assert KindHandler().mac_of({"net0": LXC_NET}) == "BC:24:11:2E:C1:A9"
    assert VmHandler().mac_of({"net0": QEMU_NET}) == "BC:24:11:5E:2A:10"
    assert KindHandler().mac_of({"net0": "name=eth0,bridge=vmbr0"}) is None
    assert KindHandler().mac_of({}) is None


def test_owner_marker() -> None:
    assert owner_of({"description": "Ctrlable x\nctrlable-instance: 12\n"}) == 12
    assert owner_of({"description": "hand made"}) is None
    assert owner_of({}) is None


def test_config_put_keeps_the_mac_and_applies_overrides() -> None:
    handler = KindHandler()
    assert handler.config_changes(instance(), {"net0": LXC_NET}) == {"onboot": True}
    assert handler.config_changes(instance(), {"net0": LXC_NET, "onboot": 1}) == {}
    changes = handler.config_changes(
        instance(onboot=False, ip="192.168.1.20/24", gw="192.168.1.1", vlan=30),
        {"net0": LXC_NET, "onboot": 1},
    )
    assert changes == {
        "onboot": False,
        "net0": "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:2E:C1:A9,"
        "ip=192.168.1.20/24,type=veth,gw=192.168.1.1,tag=30",
    }
    back = handler.config_changes(instance(ip="dhcp"), {"net0": changes["net0"], "onboot": 1})
    assert "gw=" not in back["net0"]
    assert "ip=dhcp" in back["net0"]
    assert "hwaddr=BC:24:11:2E:C1:A9" in back["net0"]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"ip": "10.0.0.1"}, "ip"),
        ({"ip": "nope"}, "ip"),
        ({"gw": "10.0.0.1"}, None),
        ({"ip": "dhcp", "gw": "10.0.0.1"}, None),
        ({"vlan": 0}, "vlan"),
        ({"vlan": 4095}, "vlan"),
    ],
)
def test_bad_overrides(values: dict[str, Any], field: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        Overrides(**values)
    if field is not None:
        assert info.value.errors()[0]["loc"] == (field,)


def test_learned_task_schedule() -> None:
    tasks = TaskPolicy(first_poll=0.04, growth=0.12, max_poll=2.0, settle=0.05)
    # Unknown duration: the growing schedule.
    assert tasks.next_poll(0) == 0.04
    assert tasks.next_poll(5) == pytest.approx(0.6)
    # Known: first poll when the task should be done, never later than max_poll ...
    assert tasks.next_poll(0, expected=1.5) == 1.5
    assert tasks.next_poll(0, expected=30) == 2.0
    assert tasks.next_poll(1.49, expected=1.5) == 0.04
    # ... then every 5 % of it, growing again when it runs long.
    assert tasks.next_poll(1.5, expected=2.0) == pytest.approx(0.5)
    assert tasks.next_poll(2.0, expected=2.0) == pytest.approx(0.1)
    assert tasks.next_poll(2.5, expected=2.0) == pytest.approx(0.1)
    assert tasks.next_poll(12.0, expected=2.0) == pytest.approx(1.2)
