"""The ctrlable-pro flow against a REAL Home Assistant (2025.4, core install).

A fresh ``hass`` stands in for the cloned VM's HA; the PVE simulator's guest agent reports
127.0.0.1 for the clone, so the companion finds that HA. The companion deploys ctrlable-pro
through its HTTP API and the test checks, in HA itself, what the flow did: the base backup
restored (core's ``backup.local`` agent: upload, restore, restart, extract), onboarding done
with the per-site owner, a working long-lived token, the ``ctrlable`` config entry loaded
against this companion, the apps' MQTT logins as HA users, and the facts in the platform report.
The companion is restarted in the middle of onboarding and resumes from its recorded step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from homeassistant.const import __version__ as HA_VERSION

from companion.app import build_services, create_app
from companion.haos import HaosFlow, inspect_base_backup, make_base_backup, secret_name
from companion.services import Services
from companion.settings import Settings
from companion.sim import CTRLABLE_ROLE, DEFAULT_TEMPLATES, SimConfig, Simulator, run_simulator
from companion.state import utcnow

from .conftest import REPO, HassProcess, free_port, ha_configuration

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

API_TOKEN = "e2e-api-token-4c1d9a7e2b"
RELEASE = "2026.06"
MARKER = "ctrlable base 2026.06 restored"


def make_base(tmp_path: Path, ha_port: int) -> Path:
    """The release's base backup, as release engineering makes it: configuration, the ctrlable
    integration, a served marker file; no users, onboarding state or instance UUID."""
    source = tmp_path / "base-src"
    (source / "www").mkdir(parents=True)
    (source / "configuration.yaml").write_text(ha_configuration(ha_port))
    (source / "www" / "ctrlable-base.txt").write_text(MARKER)
    shutil.copytree(
        REPO / "custom_components" / "ctrlable",
        source / "custom_components" / "ctrlable",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dest = tmp_path / "haos-backups" / "ctrlable-base-2026.06.tar"
    make_base_backup(
        source, dest, name="Ctrlable base 2026.06", slug="c7ab1e06", ha_version=HA_VERSION
    )
    return dest


def companion_settings(
    tmp_path: Path, sim: Simulator, port: int, ha_port: int, **kw: Any
) -> Settings:
    values: dict[str, Any] = {
        "api_token": API_TOKEN,
        "firstboot_secret": "e2e-firstboot-secret-0123456789",
        "data_dir": tmp_path / "companion",
        "releases_dir": REPO / "releases",
        "site_id": "site-e2e",
        "site_name": "Smith house",
        "listen_port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "pve_url": sim.base_url,
        "pve_token_id": sim.token_id,
        "pve_token_secret": sim.token_secret,
        "pve_ca_file": sim.ca_file,
        "haos_port": ha_port,
        "haos_backup_dir": tmp_path / "haos-backups",
        "haos_agent_timeout": 20,
        "haos_boot_timeout": 60,
        "haos_restore_timeout": 120,
        "haos_request_timeout": 20,
    }
    values.update(kw)
    return Settings.model_validate(values)


@dataclass
class RunningCompanion:
    services: Services
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.services.db.close()


async def start_companion(settings: Settings) -> RunningCompanion:
    services = await build_services(settings)
    if await services.releases.active() is None:
        for spec in DEFAULT_TEMPLATES:
            await services.releases.record_template(
                RELEASE, spec.name, node="pve", template_vmid=spec.vmid, builder_ref=None,
                app_version=None,
            )  # fmt: skip
        await services.releases.mark_active(RELEASE)
    runner = web.AppRunner(create_app(settings, services))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.listen_port).start()
    return RunningCompanion(services, runner, settings.public_url)


# The companion's role plus the guest-agent privilege the HAOS flow needs (PVE 8.3 checks
# VM.Monitor for agent/network-get-interfaces; see docs/haos.md).
AGENT_ROLE = CTRLABLE_ROLE | {"VM.Monitor"}


@asynccontextmanager
async def simulator(privileges: frozenset[str] = AGENT_ROLE) -> AsyncIterator[Simulator]:
    config = SimConfig(
        task_seconds=0.05, agent_ip="127.0.0.1", seed=11, token_privileges=privileges
    )
    async with run_simulator(config) as sim:
        yield sim


async def api(
    session: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.25)


async def ha_login(session: aiohttp.ClientSession, ha: str, username: str, password: str) -> bool:
    """HA's login flow with the homeassistant provider (what the Mosquitto add-on's auth uses)."""
    client_id = "http://127.0.0.1/"
    status, flow = await api(
        session, "POST", ha + "/auth/login_flow",
        json={"client_id": client_id, "handler": ["homeassistant", None],
              "redirect_uri": client_id + "cb"},
    )  # fmt: skip
    assert status == 200, flow
    status, result = await api(
        session, "POST", f"{ha}/auth/login_flow/{flow['flow_id']}",
        json={"client_id": client_id, "username": username, "password": password},
    )  # fmt: skip
    assert status == 200, result
    return bool(result.get("type") == "create_entry")


async def add_app(services: Services, hostname: str, state: str = "awaiting_firstboot") -> int:
    """An app of the project (zigbee2mqtt) with its first-boot assignment, as the deploy plane
    leaves it while the guest boots (its MQTT login points at the project's ctrlable-pro)."""
    async with services.db.transaction() as tx:
        project = await tx.fetchone("SELECT id FROM projects WHERE name = 'smith-house'")
        assert project is not None
        instance_id = await tx.execute(
            "INSERT INTO instances (project_id, type, hostname, release, state, step, created_at,"
            " updated_at) VALUES (?, 'zigbee2mqtt', ?, ?, ?, 'firstboot', ?, ?)",
            (project["id"], hostname, RELEASE, state, utcnow(), utcnow()),
        )
    await services.provision.create_assignment(
        instance_id, "zigbee2mqtt", hostname, "BC:24:11:AA:BB:CC", "smith-house"
    )
    await services.events.publish("instance.state", await services.deploy.instance(instance_id))
    return instance_id


async def mqtt_login_of(services: Services, instance_id: int) -> tuple[str, str]:
    row = await services.db.fetchone(
        "SELECT payload FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
        (instance_id,),
    )
    assert row is not None
    mqtt = json.loads(row["payload"])["guest"]["wiring"]["mqtt"]
    assert mqtt["server"].startswith("mqtt://ctrlable-pro-1:")
    return str(mqtt["user"]), str(mqtt["password"])


async def flow_step(services: Services, instance_id: int) -> str | None:
    row = await services.db.fetchone(
        "SELECT step FROM haos_flows WHERE instance_id = ?", (instance_id,)
    )
    return None if row is None else str(row["step"])


async def test_haos_flow_against_real_hass(
    tmp_path: Path,
    hass: HassProcess,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    # The first companion stops while at core_config (after the owner, the login and the
    # refresh token): the step is held until the companion goes down.
    held = asyncio.Event()

    async def hold(flow: HaosFlow) -> None:
        held.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(HaosFlow, "_step_core_config", hold)
    base = make_base(tmp_path, hass.port)
    assert inspect_base_backup(base).slug == "c7ab1e06"
    async with simulator() as sim, aiohttp.ClientSession() as session:
        settings = companion_settings(tmp_path, sim, free_port(), hass.port)
        companion = await start_companion(settings)
        try:
            status, created = await api(
                session, "POST", companion.url + "/api/v1/instances", API_TOKEN,
                json={"project": "smith-house", "type": "ctrlable-pro",
                      "hostname": "ctrlable-pro-1"},
            )  # fmt: skip
            assert status == 202, created
            pro_id = int(created["id"])
            app_id = await add_app(companion.services, "zigbee2mqtt-1")

            # Restart the companion in the middle of onboarding: it resumes from the record.
            await eventually(
                lambda: _at_or_after(companion.services, pro_id, "core_config"),
                150,
                "the flow reaching core_config",
            )
            await asyncio.wait_for(held.wait(), 30)
            await companion.stop()
            monkeypatch.undo()
            companion = await start_companion(settings)
            services = companion.services

            async def final_state() -> str | None:
                inst = await services.deploy.instance(pro_id)
                return inst["state"] if inst["state"] in ("active", "failed") else None

            state = await eventually(final_state, 150, "ctrlable-pro active or failed")
            instance = await services.deploy.instance(pro_id)
            assert state == "active", (instance, hass.tail())
            assert await flow_step(services, pro_id) == "done"
        except BaseException:
            await companion.stop()
            raise

        try:
            await _check_home_assistant(session, services, hass, pro_id, app_id, tmp_path, caplog)
        finally:
            await companion.stop()


async def _at_or_after(services: Services, instance_id: int, step: str) -> bool:
    from companion.haos import STEPS

    current = await flow_step(services, instance_id)
    if current in STEPS and STEPS.index(current) >= STEPS.index(step):
        return True
    inst = await services.deploy.instance(instance_id)
    if inst["state"] == "failed":
        pytest.fail(f"the flow failed: {inst['error']}")
    return False


async def _check_home_assistant(
    session: aiohttp.ClientSession,
    services: Services,
    hass: HassProcess,
    pro_id: int,
    app_id: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ha = hass.url
    # The base was restored: HA restarted (exit 100) and serves the base's files.
    assert restarted_for_restore(hass), hass.exit_codes
    status, text = await api(session, "GET", ha + "/local/ctrlable-base.txt")
    assert (status, text) == (200, MARKER)
    # Onboarding is complete.
    status, steps = await api(session, "GET", ha + "/api/onboarding")
    assert status == 200
    assert all(s["done"] for s in steps), steps

    # The per-site owner logs in with the password that only the secret store holds.
    password = await services.db.get_secret(secret_name(pro_id, "owner_password"))
    token = await services.db.get_secret(secret_name(pro_id, "token"))
    assert password
    assert token
    assert await ha_login(session, ha, "ctrlable", password)
    assert not await ha_login(session, ha, "ctrlable", password + "x")

    # The long-lived token works; the site name became HA's location name.
    status, config = await api(session, "GET", ha + "/api/config", token)
    assert status == 200
    assert config["location_name"] == "Smith house"
    assert config["version"] == HA_VERSION

    # Wiring: the ctrlable config entry points at this companion and is loaded.
    status, entries = await api(session, "GET", ha + "/api/config/config_entries/entry", token)
    assert status == 200
    ours = [e for e in entries if e["domain"] == "ctrlable"]
    assert len(ours) == 1, entries
    assert ours[0]["state"] == "loaded"
    assert ours[0]["title"] == "Smith house"

    # Wiring: the app's MQTT login (generated by the provision plane) is an HA user.
    user, mqtt_password = await mqtt_login_of(services, app_id)
    assert await ha_login(session, ha, user, mqtt_password)
    # A later app is synced when it appears; a removed one loses its login.
    second = await add_app(services, "zigbee2mqtt-2")
    user2, password2 = await mqtt_login_of(services, second)
    await eventually(lambda: ha_login(session, ha, user2, password2), 30, "second app's login")
    await services.db.execute("UPDATE instances SET state = 'removed' WHERE id = ?", (app_id,))
    await services.events.publish("instance.state", await services.deploy.instance(app_id))

    async def gone() -> bool:
        return not await ha_login(session, ha, user, mqtt_password)

    await eventually(gone, 30, "the removed app's login deleted")

    # Enrollment: the platform report carries the HA facts of the instance.
    report = await services.platform.snapshot()
    [pro] = [i for i in report["instances"] if i["id"] == pro_id]
    assert pro["ha"]["version"] == HA_VERSION
    assert pro["ha"]["url"] == ha
    assert pro["ha"]["location_name"] == "Smith house"

    # Secrets: never logged, never in a file name, never in the base backup.
    secrets = [password, token, mqtt_password, password2]
    logged = caplog.text + hass.tail(100000)
    for secret in secrets:
        assert secret not in logged
    for root in (tmp_path,):
        for path in root.rglob("*"):
            assert not any(secret in path.name for secret in secrets), path
    # Instance UUID: the base carried none (checked), HA made its own after the restore.
    uuid_file = hass.config_dir / ".storage" / "core.uuid"
    if uuid_file.exists():
        assert json.loads(uuid_file.read_text())["data"]["uuid"]


def restarted_for_restore(hass: HassProcess) -> bool:
    """hass exited 100 to restore, started again (the restore itself exits 100 once more)."""
    return 100 in hass.exit_codes and hass.starts >= 3


@pytest.mark.parametrize(
    ("privileges", "fallback"),
    [(AGENT_ROLE, None), (CTRLABLE_ROLE, "127.0.0.1")],
    ids=["guest-agent", "no-agent-privilege-fallback-address"],
)
async def test_rollback_when_home_assistant_never_answers(
    tmp_path: Path, privileges: frozenset[str], fallback: str | None
) -> None:
    """The VM's address is known (guest agent, or CTRLABLE_HAOS_ADDRESS when the token may not
    ask the agent) but nothing listens on the HA port: after the boot timeout the instance
    fails and the VM is destroyed in the simulator."""
    async with simulator(privileges) as sim, aiohttp.ClientSession() as session:
        settings = companion_settings(
            tmp_path, sim, free_port(), free_port(), haos_boot_timeout=2, haos_agent_timeout=5,
            haos_address=fallback,
        )  # fmt: skip
        companion = await start_companion(settings)
        try:
            status, created = await api(
                session, "POST", companion.url + "/api/v1/instances", API_TOKEN,
                json={"project": "smith-house", "type": "ctrlable-pro",
                      "hostname": "ctrlable-pro-1"},
            )  # fmt: skip
            assert status == 202, created
            pro_id = int(created["id"])
            services = companion.services

            async def failed() -> dict[str, Any] | None:
                inst = await services.deploy.instance(pro_id)
                return inst if inst["state"] == "failed" else None

            instance = await eventually(failed, 60, "the instance rolled back")
            assert "did not answer" in instance["error"]
            assert "127.0.0.1" in instance["error"]
            vmid = instance["vmid"]
            assert vmid is not None
            assert vmid not in sim.state.guests
            assert await flow_step(services, pro_id) == "rolled_back"
            rows = await services.db.fetchall(
                "SELECT name FROM secrets WHERE name LIKE ?", (f"haos.{pro_id}.%",)
            )
            assert rows == []
        finally:
            await companion.stop()


async def test_no_address_without_agent_privilege_or_fallback(tmp_path: Path) -> None:
    """Without the agent privilege and without CTRLABLE_HAOS_ADDRESS the flow fails at once,
    naming the privilege and the setting, and the VM is rolled back."""
    async with simulator(CTRLABLE_ROLE) as sim, aiohttp.ClientSession() as session:
        settings = companion_settings(tmp_path, sim, free_port(), free_port())
        companion = await start_companion(settings)
        try:
            status, created = await api(
                session, "POST", companion.url + "/api/v1/instances", API_TOKEN,
                json={"project": "smith-house", "type": "ctrlable-pro",
                      "hostname": "ctrlable-pro-1"},
            )  # fmt: skip
            assert status == 202, created
            services = companion.services

            async def failed() -> dict[str, Any] | None:
                inst = await services.deploy.instance(int(created["id"]))
                return inst if inst["state"] == "failed" else None

            instance = await eventually(failed, 30, "the instance rolled back")
            assert "VM.Monitor" in instance["error"]
            assert "CTRLABLE_HAOS_ADDRESS" in instance["error"]
            assert instance["vmid"] not in sim.state.guests
        finally:
            await companion.stop()
