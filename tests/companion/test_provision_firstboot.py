"""The REAL firstboot/ctrlable-firstboot.sh, run in a sandbox root against a running companion.

Each test copies ``fixtures/firstboot/common`` and the type's fixture into a temp dir standing for
"/", writes the guest's hostname, MAC and firstboot.conf, and runs the script with fake
systemctl/docker/mysql/logger (``fakes/firstboot``) that record their calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from companion.app import build_services, create_app

from .conftest import FIRSTBOOT_SECRET, Companion, make_settings
from .firstboot_harness import (
    FAKES,
    SCRIPT,
    UNIT,
    FakePortainer,
    Guest,
    Run,
    assert_finished,
    assert_new_identity,
    make_guest,
    needs_tools,
    run_script,
)
from .provision_helpers import add_instance, instance_state, mac_for, secret_values, stored_payload

COORDINATOR = {"coordinator": "tcp://192.168.1.50:6638"}


def assert_no_secret_leaked(guest: Guest, run: Run, payload: dict[str, Any]) -> None:
    journal = guest.journal.read_text()
    assert "first boot complete" in journal
    for value in [*secret_values(payload), FIRSTBOOT_SECRET]:
        assert value not in journal
        assert value not in run.stderr
        assert value not in run.stdout
        assert value not in "\n".join(guest.calls())


async def deployed(
    companion: Companion, tmp_path: Path, type_: str, n: int = 1, **kwargs: Any
) -> tuple[Guest, int]:
    hostname = f"{type_}-{n}"
    mac = mac_for(n)
    instance_id = await add_instance(companion.services, type_, hostname, mac, **kwargs)
    return make_guest(tmp_path, type_, hostname, mac, companion.url), instance_id


# --------------------------------------------------------------------------------------------
# The five LXC types
# --------------------------------------------------------------------------------------------


@needs_tools
async def test_zigbee2mqtt(companion: Companion, tmp_path: Path) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    guest, iid = await deployed(companion, tmp_path, "zigbee2mqtt", overrides=COORDINATOR)
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    payload = await stored_payload(services, iid)
    wiring = payload["guest"]["wiring"]
    text = guest.read("opt/zigbee2mqtt/data/configuration.yaml")
    config = yaml.safe_load(text)
    assert config["mqtt"] == {
        "base_topic": "zigbee2mqtt",
        "server": "mqtt://pro:1883",
        "user": "ctrlable-zigbee2mqtt-1",
        "password": wiring["mqtt"]["password"],
    }
    assert config["serial"] == {"port": "tcp://192.168.1.50:6638", "adapter": "zstack"}
    assert config["advanced"] == {
        "network_key": wiring["network"]["network_key"],
        "pan_id": wiring["network"]["pan_id"],
        "ext_pan_id": wiring["network"]["ext_pan_id"],
        "log_level": "info",
    }
    assert config["frontend"] == {"enabled": True, "port": 8080}  # untouched
    assert "# MQTT settings" in text  # comments kept
    assert "GENERATE" not in text
    assert not (guest.root / "opt/zigbee2mqtt/data/state.json").exists()
    mode = (guest.root / "opt/zigbee2mqtt/data/configuration.yaml").stat().st_mode & 0o777
    assert mode & 0o077 == 0
    assert_new_identity(guest)
    assert_finished(guest, "zigbee2mqtt.service")
    assert_no_secret_leaked(guest, run, payload)
    assert (await instance_state(services, iid))["state"] == "active"
    row = await services.db.fetchone("SELECT report FROM assignments WHERE instance_id = ?", (iid,))
    assert row is not None
    report = json.loads(row["report"])
    assert report["machine_id_changed"] is True
    assert report["app_restart"] == "queued"
    assert len(report["ssh_host_keys"]) == 3
    assert "/opt/zigbee2mqtt/data/configuration.yaml" in report["changed_files"]


@needs_tools
async def test_zwavejs(companion: Companion, tmp_path: Path) -> None:
    services = companion.services
    guest, iid = await deployed(companion, tmp_path, "zwavejs", overrides=COORDINATOR)
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    payload = await stored_payload(services, iid)
    wiring = payload["guest"]["wiring"]
    settings = json.loads(guest.read("opt/zwave_store/settings.json"))
    assert settings["zwave"]["port"] == "tcp://192.168.1.50:6638"
    assert settings["zwave"]["securityKeys"] == wiring["security_keys"]
    assert settings["zwave"]["securityKeysLongRange"] == wiring["security_keys_long_range"]
    assert settings["zwave"]["serverPort"] == 3000  # untouched
    assert settings["mqtt"]["disabled"] is True  # untouched: Z-Wave JS UI talks to HA directly
    assert settings["gateway"]["authEnabled"] is True
    users = json.loads(guest.read("opt/zwave_store/users.json"))
    assert [u["username"] for u in users] == ["admin"]
    salt, key = users[0]["passwordHash"].split(":")
    expected = hashlib.scrypt(
        wiring["admin"]["password"].encode(), salt=salt.encode(), n=16384, r=8, p=1, dklen=64
    )
    assert key == expected.hex()
    env = guest.read("opt/.env").splitlines()
    assert f"SESSION_SECRET={wiring['session_secret']}" in env
    assert "STORE_DIR=/opt/zwave_store" in env
    assert_new_identity(guest)
    assert_finished(guest, "zwave-js-ui.service")
    assert_no_secret_leaked(guest, run, payload)
    assert (await instance_state(services, iid))["state"] == "active"


@needs_tools
async def test_frigate(companion: Companion, tmp_path: Path) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    guest, iid = await deployed(companion, tmp_path, "frigate")
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    payload = await stored_payload(services, iid)
    mqtt = payload["guest"]["wiring"]["mqtt"]
    config = yaml.safe_load(guest.read("config/config.yml"))
    assert config["mqtt"] == {
        "enabled": True,
        "host": "pro",
        "port": 1883,
        "user": "ctrlable-frigate-1",
        "password": mqtt["password"],
    }
    assert config["cameras"]["test"]["detect"]["fps"] == 5  # untouched
    assert config["detectors"] == {"cpu1": {"type": "cpu"}}
    assert_new_identity(guest)
    assert_finished(guest, "frigate.service")
    assert_no_secret_leaked(guest, run, payload)
    assert (await instance_state(services, iid))["state"] == "active"


@needs_tools
async def test_docker_portainer_and_rerun_after_a_failure(
    companion: Companion, tmp_path: Path
) -> None:
    services = companion.services
    portainer = FakePortainer(fail_init=1)
    await portainer.server.start_server()
    try:
        guest, iid = await deployed(companion, tmp_path, "docker-portainer")
        env = {"CTRLABLE_PORTAINER_URL": str(portainer.server.make_url("")).rstrip("/")}
        first = await run_script(guest, **env)
        assert first.code == 1
        assert "portainer: creating the admin failed (HTTP 500)" in first.stderr
        machine_id = guest.read("etc/machine-id")
        host_key = guest.read("etc/ssh/ssh_host_ed25519_key")
        assert (await instance_state(services, iid))["state"] == "awaiting_firstboot"
        # The unit runs again on the next boot (or by hand): it resumes, the identity is kept.
        second = await run_script(guest, **env)
        assert second.code == 0, second.stderr
        assert guest.read("etc/machine-id") == machine_id
        assert guest.read("etc/ssh/ssh_host_ed25519_key") == host_key
    finally:
        await portainer.server.close()
    payload = await stored_payload(services, iid)
    assert portainer.admins == [
        {"Username": "admin", "Password": payload["guest"]["wiring"]["portainer"]["password"]}
    ]
    assert guest.calls().count("docker restart portainer") == 2
    assert_new_identity(guest)
    assert_finished(guest, None)
    assert_no_secret_leaked(guest, second, payload)
    assert (await instance_state(services, iid))["state"] == "active"


@needs_tools
async def test_freepbx(companion: Companion, tmp_path: Path) -> None:
    services = companion.services
    guest, iid = await deployed(companion, tmp_path, "freepbx")
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    payload = await stored_payload(services, iid)
    wiring = payload["guest"]["wiring"]
    db_password = wiring["db_password"]
    conf = guest.read("etc/freepbx.conf")
    assert f"$amp_conf['AMPDBPASS'] = '{db_password}';" in conf
    assert "$amp_conf['AMPDBUSER'] = 'freepbxuser';" in conf
    assert "TemplateDbSecret" not in conf
    assert f"password=>{db_password}" in guest.read("etc/asterisk/res_odbc_additional.conf")
    assert f"AMPDBPASS={db_password}" in guest.read("etc/amportal.conf")
    sql = Path(str(guest.log) + ".mysql").read_text()
    assert f"ALTER USER 'freepbxuser'@'localhost' IDENTIFIED BY '{db_password}';" in sql
    # FreePBX stores SHA-1 of the admin password (ampusers.password_sha1): its format, not ours.
    sha1 = hashlib.sha1(wiring["admin"]["password"].encode()).hexdigest()  # noqa: S324
    assert "INSERT INTO `asterisk`.ampusers" in sql
    assert f"'admin', '{sha1}'" in sql
    assert wiring["admin"]["password"] not in sql  # only its hash reaches the database
    assert "mysql " in guest.calls()  # the SQL went in on stdin, not on the command line
    assert_new_identity(guest)
    assert_finished(guest, "freepbx.service")
    journal_and_calls = guest.journal.read_text() + "\n".join(guest.calls())
    assert db_password not in journal_and_calls
    assert (await instance_state(services, iid))["state"] == "active"


# --------------------------------------------------------------------------------------------
# Behaviour around the steps
# --------------------------------------------------------------------------------------------


@needs_tools
async def test_rerun_after_success_is_a_noop(companion: Companion, tmp_path: Path) -> None:
    guest, _ = await deployed(companion, tmp_path, "freepbx")
    assert (await run_script(guest)).code == 0
    calls = guest.calls()
    config = guest.read("etc/freepbx.conf")
    again = await run_script(guest)
    assert again.code == 0
    assert "already done" in again.stderr
    assert guest.calls() == calls
    assert guest.read("etc/freepbx.conf") == config


@needs_tools
async def test_usb_coordinator_keeps_the_port_and_reports_binding(
    companion: Companion, tmp_path: Path
) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    guest, iid = await deployed(
        companion, tmp_path, "zigbee2mqtt", overrides={"coordinator": "usb"}
    )
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    config = yaml.safe_load(guest.read("opt/zigbee2mqtt/data/configuration.yaml"))
    assert config["serial"] == {"port": "/dev/ttyACM0"}
    assert config["mqtt"]["server"] == "mqtt://pro:1883"
    state = await instance_state(services, iid)
    assert state == {"state": "active", "needs_binding": 1}


@needs_tools
async def test_refused_guest_changes_no_app_config(companion: Companion, tmp_path: Path) -> None:
    services = companion.services
    await add_instance(services, "frigate", "frigate-1", mac_for(1))
    # Same hostname, another MAC: not this guest's assignment.
    guest = make_guest(tmp_path, "frigate", "frigate-1", mac_for(2), companion.url)
    before = guest.read("config/config.yml")
    run = await run_script(guest)
    assert run.code == 1
    assert "assignment refused: no_assignment" in run.stderr
    assert guest.read("config/config.yml") == before
    assert "systemctl disable ctrlable-firstboot.service" not in guest.calls()
    assert not (guest.root / "var/lib/ctrlable/firstboot.done").exists()


@needs_tools
async def test_wrong_template_type_is_refused(companion: Companion, tmp_path: Path) -> None:
    await add_instance(companion.services, "frigate", "frigate-1", mac_for(1))
    guest = make_guest(
        tmp_path, "frigate", "frigate-1", mac_for(1), companion.url, TEMPLATE_TYPE="freepbx"
    )
    run = await run_script(guest)
    assert run.code == 1
    assert "does not match this template" in run.stderr


@needs_tools
async def test_bad_config_names_the_key(tmp_path: Path) -> None:
    guest = make_guest(tmp_path, "frigate", "frigate-1", mac_for(1), "ftp://nope")
    run = await run_script(guest)
    assert run.code == 1
    assert "COMPANION_URL must be" in run.stderr
    conf = guest.root / "etc/ctrlable/firstboot.conf"
    conf.write_text("COMPANION_URL=http://127.0.0.1:1\nFIRSTBOOT_SECRET=short\n")
    run = await run_script(guest)
    assert run.code == 1
    assert "FIRSTBOOT_SECRET" in run.stderr
    assert "short" not in run.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@needs_tools
async def test_gives_up_after_the_retry_bound(tmp_path: Path) -> None:
    port = _free_port()
    guest = make_guest(tmp_path, "frigate", "frigate-1", mac_for(1), f"http://127.0.0.1:{port}")
    run = await run_script(guest, CTRLABLE_RETRY_MAX_SECONDS="3")
    assert run.code == 1
    assert "retrying in 1s" in run.stderr
    assert "giving up after 3s" in run.stderr
    assert FIRSTBOOT_SECRET not in run.stderr
    assert not (guest.root / "var/lib/ctrlable/firstboot.done").exists()


@needs_tools
async def test_waits_for_a_companion_that_comes_up_late(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    services = await build_services(settings)
    await add_instance(services, "frigate", "frigate-1", mac_for(1))
    port = _free_port()
    guest = make_guest(tmp_path, "frigate", "frigate-1", mac_for(1), f"http://127.0.0.1:{port}")
    script = asyncio.ensure_future(run_script(guest, CTRLABLE_RETRY_MAX_SECONDS="30"))
    for _ in range(200):  # until the script has failed at least once
        if guest.journal.exists() and "retrying" in guest.journal.read_text():
            break
        await asyncio.sleep(0.05)
    server = TestServer(create_app(settings, services), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        run = await script
    finally:
        await server.close()
        await services.db.close()
    assert run.code == 0, run.stderr
    assert "retrying" in run.stderr


# --------------------------------------------------------------------------------------------
# Static checks of the shipped files
# --------------------------------------------------------------------------------------------


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    fakes = sorted(str(p) for p in FAKES.iterdir())
    result = subprocess.run(
        [shellcheck, str(SCRIPT), *fakes], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_unit_matches_the_script() -> None:
    unit = UNIT.read_text()
    script = SCRIPT.read_text()
    assert "Type=oneshot" in unit
    assert "After=network-online.target" in unit
    assert "Wants=network-online.target" in unit
    assert "ConditionPathExists=!/var/lib/ctrlable/firstboot.done" in unit
    assert "ConditionPathExists=/etc/ctrlable/firstboot.conf" in unit
    # The script's defaults are the paths the unit tests.
    assert "$ROOT/var/lib/ctrlable" in script
    assert "$STATE_DIR/firstboot.done" in script
    assert "$ROOT/etc/ctrlable/firstboot.conf" in script
    assert 'UNIT="ctrlable-firstboot.service"' in script
    # Every app unit the script restarts is ordered after the wiring.
    before = re.search(r"^Before=(.*)$", unit, re.M)
    assert before is not None
    for app_unit in re.findall(r"printf '([a-z0-9-]+\.service)'", script):
        assert app_unit in before.group(1).split()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert os.access(SCRIPT, os.X_OK)


@needs_tools
async def test_a_missing_app_config_is_named_and_nothing_is_completed(
    companion: Companion, tmp_path: Path
) -> None:
    services = companion.services
    guest, iid = await deployed(companion, tmp_path, "zigbee2mqtt", overrides=COORDINATOR)
    (guest.root / "opt/zigbee2mqtt/data/configuration.yaml").unlink()
    run = await run_script(guest)
    assert run.code == 1
    assert "wiring: applying the zigbee2mqtt wiring failed: " in run.stderr
    assert "configuration.yaml not found" in guest.journal.read_text()
    assert (await instance_state(services, iid))["state"] == "awaiting_firstboot"
    assert "systemctl disable ctrlable-firstboot.service" not in guest.calls()


@needs_tools
async def test_zigbee2mqtt_yaml_edits_keep_other_shapes(
    companion: Companion, tmp_path: Path
) -> None:
    """A 1.x-style file: scalar sections, no `advanced`, a list, an inline map to be replaced."""
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    guest, iid = await deployed(
        companion, tmp_path, "zigbee2mqtt", overrides={**COORDINATOR, "channel": 25}
    )
    config_path = guest.root / "opt/zigbee2mqtt/data/configuration.yaml"
    config_path.write_text(
        "homeassistant: false\n"
        "permit_join: false\n"
        "mqtt: {server: 'mqtt://localhost'}\n"
        "serial:\n"
        "    port: /dev/ttyUSB0   # four-space indent\n"
        "    disable_led: true\n"
        "blocklist:\n"
        "  - '0x000b57fffec6a5b2'\n"
        "devices:\n"
        "  '0x00158d0001':\n"
        "    friendly_name: hall\n"
    )
    run = await run_script(guest)
    assert run.code == 0, run.stderr
    wiring = (await stored_payload(services, iid))["guest"]["wiring"]
    config = yaml.safe_load(config_path.read_text())
    assert config["homeassistant"] is False
    assert config["permit_join"] is False
    assert config["mqtt"]["server"] == "mqtt://pro:1883"
    assert config["mqtt"]["password"] == wiring["mqtt"]["password"]
    assert config["serial"] == {
        "port": "tcp://192.168.1.50:6638",
        "disable_led": True,
        "adapter": "zstack",
    }
    assert config["blocklist"] == ["0x000b57fffec6a5b2"]
    assert config["devices"] == {"0x00158d0001": {"friendly_name": "hall"}}
    assert config["advanced"] == {
        "network_key": wiring["network"]["network_key"],
        "pan_id": wiring["network"]["pan_id"],
        "ext_pan_id": wiring["network"]["ext_pan_id"],
        "channel": 25,
    }
