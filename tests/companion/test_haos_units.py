"""The HAOS flow's pure parts: base backup checks, address choice, agent id, MQTT login
bookkeeping, cleanup and the platform facts. The flow itself runs against a real Home Assistant
in tests/e2e/test_haos_flow.py (Python 3.13)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from companion.deploy import DeployPlane
from companion.haos import (
    BaseBackupError,
    HaosHandler,
    _agent_for,
    _made_by_us,
    inspect_base_backup,
    make_base_backup,
    pick_address,
    secret_name,
    wanted_mqtt_logins,
)
from companion.state import dumps, utcnow

from .conftest import Companion


def base_dir(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    source = tmp_path / "src"
    (source / "custom_components" / "ctrlable").mkdir(parents=True)
    (source / "configuration.yaml").write_text("http:\n")
    (source / "custom_components" / "ctrlable" / "manifest.json").write_text("{}")
    for rel, text in (extra or {}).items():
        target = source / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return source


def test_a_made_base_backup_passes_inspection(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "base.tar"
    base = make_base_backup(
        base_dir(tmp_path), dest, name="Ctrlable base", slug="abc123", ha_version="2025.4.4"
    )
    assert (base.slug, base.name, base.ha_version) == ("abc123", "Ctrlable base", "2025.4.4")
    with tarfile.open(dest) as outer:
        # HA core reads "./backup.json" and "homeassistant.tar.gz" by these exact names.
        assert outer.getnames() == ["./backup.json", "homeassistant.tar.gz"]


@pytest.mark.parametrize(
    "rel",
    [
        ".storage/auth",
        ".storage/auth_provider.homeassistant",
        ".storage/onboarding",
        ".storage/core.uuid",
        ".uuid",
        "secrets.yaml",
        ".cloud/credentials",
    ],
)
def test_a_base_carrying_site_state_is_refused(tmp_path: Path, rel: str) -> None:
    source = base_dir(tmp_path, {rel: "{}"})
    with pytest.raises(BaseBackupError, match="must not carry"):
        make_base_backup(source, tmp_path / "b.tar", name="n", slug="s", ha_version="2025.4.4")


def _write_outer(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:") as outer:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            outer.addfile(info, io.BytesIO(payload))


def _inner() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as inner:
        info = tarfile.TarInfo("data/configuration.yaml")
        info.size = 0
        inner.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


META = {"slug": "s", "name": "n", "homeassistant": {"version": "2025.4.4"}, "compressed": True}


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"homeassistant.tar.gz": b""}, "no ./backup.json"),
        ({"./backup.json": b"{}", "homeassistant.tar.gz": b""}, "lacks slug"),
        (
            {"./backup.json": json.dumps({**META, "protected": True}).encode()},
            "password-protected",
        ),
        ({"./backup.json": json.dumps(META).encode(), "./homeassistant.tar.gz": b""}, "exactly"),
        (
            {"./backup.json": json.dumps(META).encode(), "homeassistant.tar.gz": b"junk"},
            "unreadable",
        ),
    ],
)
def test_bad_backup_files_are_named(
    tmp_path: Path, members: dict[str, bytes], message: str
) -> None:
    path = tmp_path / "b.tar"
    _write_outer(path, members)
    with pytest.raises(BaseBackupError, match=message):
        inspect_base_backup(path)


def test_a_good_hand_made_backup(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    meta = {**META, "addons": [{"slug": "core_mosquitto"}], "folders": ["homeassistant", "share"]}
    _write_outer(
        path, {"./backup.json": json.dumps(meta).encode(), "homeassistant.tar.gz": _inner()}
    )
    base = inspect_base_backup(path)
    assert base.addons == ["core_mosquitto"]
    assert base.folders == ["share"]


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BaseBackupError, match="not a readable tar"):
        inspect_base_backup(path)


INTERFACES: list[dict[str, Any]] = [
    {
        "name": "lo",
        "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1"}],
    },
    {
        "name": "hassio",
        "hardware-address": "02:42:aa:bb:cc:dd",
        "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "172.30.32.1"}],
    },
    {
        "name": "enp0s18",
        "hardware-address": "bc:24:11:12:34:56",
        "ip-addresses": [
            {"ip-address-type": "ipv6", "ip-address": "fe80::1"},
            {"ip-address-type": "ipv4", "ip-address": "169.254.3.4"},
            {"ip-address-type": "ipv4", "ip-address": "192.168.1.50"},
        ],
    },
]


def test_the_address_is_the_net0_interfaces_ipv4() -> None:
    assert pick_address(INTERFACES, "BC:24:11:12:34:56") == "192.168.1.50"
    assert pick_address(INTERFACES, "BC:24:11:00:00:00") is None
    assert pick_address(INTERFACES, None) is None
    only_link_local = [{**INTERFACES[2], "ip-addresses": INTERFACES[2]["ip-addresses"][:2]}]
    assert pick_address(only_link_local, "BC:24:11:12:34:56") is None


@pytest.mark.parametrize(
    ("installation", "agent"),
    [
        ("Home Assistant OS", "hassio.local"),
        ("Home Assistant Supervised", "hassio.local"),
        ("Home Assistant Container", "backup.local"),
        ("Unsupported Third Party Container", "backup.local"),
        (None, "backup.local"),
    ],
)
def test_backup_agent(installation: str | None, agent: str) -> None:
    assert _agent_for(installation) == agent


def test_which_users_are_ours() -> None:
    ours = {
        "name": "ctrlable-z2m-1",
        "username": "ctrlable-z2m-1",
        "local_only": True,
        "group_ids": ["system-users"],
        "is_owner": False,
        "system_generated": False,
        "credentials": [{"type": "homeassistant"}],
    }
    assert _made_by_us(ours, "ctrlable-z2m-1")
    assert not _made_by_us({**ours, "group_ids": ["system-admin"]}, "ctrlable-z2m-1")
    assert not _made_by_us({**ours, "local_only": False}, "ctrlable-z2m-1")
    assert not _made_by_us({**ours, "is_owner": True}, "ctrlable-z2m-1")
    bare = {**ours, "username": None, "credentials": []}
    assert _made_by_us(bare, "ctrlable-z2m-1", bare=True)
    assert not _made_by_us(ours, "ctrlable-z2m-1", bare=True)


async def _instance(companion: Companion, type_: str, hostname: str, state: str) -> int:
    async with companion.services.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO projects (name, created_at) VALUES ('p', ?) ON CONFLICT DO NOTHING",
            (utcnow(),),
        )
        project = await tx.fetchone("SELECT id FROM projects WHERE name = 'p'")
        assert project is not None
        return await tx.execute(
            "INSERT INTO instances (project_id, type, hostname, release, state, created_at,"
            " updated_at) VALUES (?, ?, ?, '2026.06', ?, ?, ?)",
            (project["id"], type_, hostname, state, utcnow(), utcnow()),
        )


async def _assignment(companion: Companion, instance_id: int, mqtt: dict[str, Any] | None) -> None:
    payload = {"guest": {"wiring": {"mqtt": mqtt}}, "bindings": []}
    await companion.services.db.execute(
        "INSERT INTO assignments (instance_id, hostname, payload, state, created_at)"
        " VALUES (?, 'h', ?, 'pending', ?)",
        (instance_id, dumps(payload), utcnow()),
    )


async def test_wanted_mqtt_logins(companion_factory: Callable[..., Any]) -> None:
    companion: Companion = await companion_factory()
    pro_id = await _instance(companion, "ctrlable-pro", "pro-1", "awaiting_firstboot")
    z2m = await _instance(companion, "zigbee2mqtt", "z2m-1", "active")
    frigate = await _instance(companion, "frigate", "frigate-1", "awaiting_firstboot")
    elsewhere = await _instance(companion, "zigbee2mqtt", "z2m-2", "active")
    failed = await _instance(companion, "zigbee2mqtt", "z2m-3", "failed")
    portainer = await _instance(companion, "docker-portainer", "docker-1", "active")
    await _assignment(
        companion, z2m, {"server": "mqtt://pro-1:1883", "user": "old", "password": "p0"}
    )
    await _assignment(
        companion, z2m, {"server": "mqtt://pro-1:1883", "user": "ctrlable-z2m-1", "password": "p1"}
    )
    await _assignment(
        companion, frigate, {"host": "pro-1", "port": 1883, "user": "ctrlable-frigate-1",
                             "password": "p2"},
    )  # fmt: skip
    await _assignment(
        companion, elsewhere, {"server": "mqtt://broker:1883", "user": "u", "password": "p3"}
    )
    await _assignment(
        companion, failed, {"server": "mqtt://pro-1:1883", "user": "gone", "password": "p4"}
    )
    await _assignment(companion, portainer, None)
    pro = await companion.services.deploy.get(pro_id)
    assert await wanted_mqtt_logins(companion.services, pro) == {
        "ctrlable-z2m-1": "p1",
        "ctrlable-frigate-1": "p2",
    }


async def test_cleanup_forgets_credentials_and_extras_report_enrolled(
    companion_factory: Callable[..., Any],
) -> None:
    companion: Companion = await companion_factory()
    services = companion.services
    handler = HaosHandler(services)
    pro_id = await _instance(companion, "ctrlable-pro", "pro-1", "active")
    other = await _instance(companion, "ctrlable-pro", "pro-2", "active")
    for instance_id in (pro_id, other):
        await handler.prepare(services.deploy, await services.deploy.get(instance_id))
        await services.db.put_secret(secret_name(instance_id, "token"), f"tok-{instance_id}")
    ha = {"url": "http://10.0.0.5:8123", "version": "2025.4.4"}
    await services.db.execute(
        "UPDATE haos_flows SET step = 'done', facts = ? WHERE instance_id = ?",
        (dumps({"ha": ha}), pro_id),
    )
    assert await handler.report_extras() == {pro_id: {"ha": ha}}
    report = await services.platform.snapshot()
    assert [i.get("ha") for i in report["instances"]] == [ha, None]

    plane: DeployPlane = services.deploy
    await handler.cleanup(plane, await plane.get(pro_id))
    assert await services.db.get_secret(secret_name(pro_id, "token")) is None
    assert await services.db.get_secret(secret_name(other, "token")) == f"tok-{other}"
    row = await services.db.fetchone("SELECT step FROM haos_flows WHERE instance_id = ?", (pro_id,))
    assert row == {"step": "rolled_back"}
    assert await handler.report_extras() == {}
