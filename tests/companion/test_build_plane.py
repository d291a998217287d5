"""The build plane end to end: companion -> asyncssh (pinned host key) -> a REAL sshd with the
command= restriction -> host/ctrlable-build -> fake pct/qm and fake builders -> JSON lines ->
the builds table, the templates table and the event stream.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from companion import build_cli
from companion.build import RESTART_ERROR
from companion.state import Database, utcnow

from .build_host import FakeHost, SshServer, make_fake_host
from .conftest import API_TOKEN, FIRSTBOOT_SECRET, Companion, make_settings

ALL = ["ctrlable-pro", "zwavejs", "zigbee2mqtt", "docker-portainer", "frigate", "freepbx"]
VMIDS = {
    "ctrlable-pro": 9000,
    "zwavejs": 9010,
    "zigbee2mqtt": 9020,
    "docker-portainer": 9030,
    "frigate": 9040,
    "freepbx": 9050,
}
TIMEOUT = 90.0


@dataclass
class BuildEnv:
    host: FakeHost
    sshd: SshServer
    companion: Companion

    async def wait_build(self, build_id: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            status, body = await self.companion.request("GET", f"/api/v1/builds/{build_id}")
            assert status == 200, body
            if body["state"] in ("succeeded", "failed", "cancelled"):
                return dict(body)
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"build {build_id} did not finish: {body}")
            await asyncio.sleep(0.1)

    async def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out waiting for {what}; calls: {self.host.calls()[-5:]}")
            await asyncio.sleep(0.1)

    async def start(self, templates: list[str] | None = None) -> dict[str, Any]:
        body = {} if templates is None else {"templates": templates}
        status, built = await self.companion.request(
            "POST", "/api/v1/releases/2026.06/build", json=body
        )
        assert status == 202, built
        return dict(built)


@pytest.fixture
async def env(tmp_path: Path, companion_factory: Callable[..., Any]) -> AsyncIterator[BuildEnv]:
    host = make_fake_host(tmp_path / "host", API_TOKEN)
    sshd = SshServer(tmp_path / "sshd", host)
    sshd.start()
    try:
        settings = make_settings(
            tmp_path,
            build_ssh_host="127.0.0.1",
            build_ssh_port=sshd.port,
            build_ssh_key_file=sshd.client_key,
            build_ssh_known_hosts=sshd.known_hosts(),
        )
        companion: Companion = await companion_factory(settings)
        host.write_conf(companion.url)
        yield BuildEnv(host, sshd, companion)
    finally:
        sshd.stop()


async def _events(env: BuildEnv, build_id: int) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for event in await env.companion.services.events.since(0, limit=100_000):
        ours = event.type.startswith("build.") and event.data.get("id") == build_id
        if ours or event.type == "release.active":
            found.append((event.type, event.data))
    return found


def _wrapper_processes(host: FakeHost) -> list[int]:
    """Processes still running from this test's sandbox (wrapper, builders, tree server)."""
    marker = str(host.base).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    marker in (entry / "cmdline").read_bytes()
                    or marker in (entry / "environ").read_bytes()
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return [p for p in found if p != os.getpid()]


async def test_every_template_builds_end_to_end_through_sshd(
    env: BuildEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = env.host
    monkeypatch.setenv("CTRLABLE_API_TOKEN", API_TOKEN)  # the CLI reads the token from env/.env
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    code = await asyncio.to_thread(
        build_cli.main,
        ["2026.06", "--url", env.companion.url, "--interval", "0.2"],
        out,
    )
    text = out.getvalue()
    assert code == 0, text
    assert "100% succeeded (6/6)" in text
    assert "started" in text
    lines = text.splitlines()
    assert any("zwavejs" in line and "builder" in line for line in lines)  # live progress
    for name, vmid in VMIDS.items():
        assert any(
            line.split()[:3] == [name, "ok", "template"] and str(vmid) in line for line in lines
        )

    # The builds table.
    row = await env.companion.services.db.fetchone("SELECT * FROM builds")
    assert row is not None
    assert row["state"] == "succeeded"
    assert row["percent"] == 100
    assert row["finished_at"] is not None
    progress = json.loads(row["templates"])
    assert set(progress) == set(ALL)
    for name, item in progress.items():
        assert item["state"] == "succeeded", (name, item)
        assert item["template_vmid"] == VMIDS[name]
        assert item["builder_ref"] == "2026-05-29"
        assert item["builder_sha"] == host.scripts_sha  # the tag, not main's later commit
        assert item["node"] == "pve"
    assert progress["zwavejs"]["app_version"] == "10.6.1"
    assert progress["zigbee2mqtt"]["app_version"] == "2.5.1"
    assert progress["docker-portainer"]["app_version"] == "2.27.9"
    assert progress["ctrlable-pro"]["app_version"] == "16.0"

    # The templates table and the release.
    templates = {
        r["name"]: r for r in await env.companion.services.db.fetchall("SELECT * FROM templates")
    }
    assert {n: r["template_vmid"] for n, r in templates.items()} == VMIDS
    assert all(r["builder_ref"] == "2026-05-29" for r in templates.values())
    assert templates["frigate"]["app_version"] == "0.16.1"
    assert await env.companion.services.releases.active() == "2026.06"

    # The event stream: state changes, per-template progress, the release becoming active.
    events = await _events(env, int(row["id"]))
    states = [d["state"] for t, d in events if t == "build.state"]
    assert states[0] == "running"
    assert states[-1] == "succeeded"
    percents = [d["percent"] for t, d in events if t == "build.progress"]
    assert len(percents) > 20
    assert percents == sorted(percents)
    assert 0 < percents[len(percents) // 2] < 100
    running = [
        d["templates"]["zigbee2mqtt"]
        for t, d in events
        if t == "build.progress" and d["templates"]["zigbee2mqtt"]["state"] == "running"
    ]
    assert {item["step"] for item in running} >= {"builder", "verify", "scrub", "template"}
    assert ("release.active", {"release": "2026.06"}) in events

    # What happened on the host.
    pct = host.calls("pct")
    for name, vmid in VMIDS.items():
        if name != "ctrlable-pro":
            assert ["pct", "template", str(vmid)] in pct
            assert "template: 1" in host.lxc_conf(vmid).read_text()
            assert f"tags: ctrlable;release-2026.06;tmpl-{name}" in host.lxc_conf(vmid).read_text()
    assert not any(c[1] == "destroy" for c in pct)
    qm = host.calls("qm")
    assert [c[1] for c in qm if c[1] in ("create", "disk", "set", "resize", "template")] == [
        "create", "disk", "set", "resize", "set", "template",
    ]  # fmt: skip
    assert not any(c[1] == "start" for c in qm), "the HAOS VM must never boot"
    assert "haos_ova-16.0.qcow2" in " ".join(next(c for c in qm if c[1] == "disk"))
    vm_conf = host.qemu_conf(9000).read_text()
    assert "template: 1" in vm_conf
    assert "scsi0: local-lvm:vm-9000-disk-0,ssd=1,discard=on,size=32G" in vm_conf

    # The builders ran pinned and unattended, without SSH's variables or a terminal.
    env_z2m = (host.state / "builder-env-zigbee2mqtt").read_text().splitlines()
    for line in (
        "mode=generated", "var_unattended=yes", "PHS_SILENT=1", "DISABLE_UPDATE=yes", "TERM=xterm",
        "var_ctid=9020", "var_hostname=ctrlable-zigbee2mqtt", "var_cpu=2", "var_ram=2048",
        "var_disk=8", "var_os=debian", "var_version=12", "var_unprivileged=1", "var_net=dhcp",
        "var_gpu=no", "var_container_storage=local-lvm", "var_template_storage=local",
        "var_appversion=2.5.1",
    ):  # fmt: skip
        assert line in env_z2m, line
    assert not any(line.startswith("SSH_") for line in env_z2m)
    assert "var_appversion=v10.6.1" in (host.state / "builder-env-zwave-js-ui").read_text()
    assert "var_appversion" not in (host.state / "builder-env-frigate").read_text()
    diagnostics = host.root / "usr/local/community-scripts/diagnostics"
    assert diagnostics.read_text() == "DIAGNOSTICS=no\n"

    # Post-build: first boot in, instance state and passthrough out.
    for name, vmid in VMIDS.items():
        if name == "ctrlable-pro":
            continue
        fs = host.rootfs(vmid)
        assert (fs / "usr/local/sbin/ctrlable-firstboot.sh").read_bytes() == (
            Path(__file__).parents[2] / "firstboot/ctrlable-firstboot.sh"
        ).read_bytes()
        assert os.stat(fs / "usr/local/sbin/ctrlable-firstboot.sh").st_mode & 0o777 == 0o755
        wants = fs / "etc/systemd/system/multi-user.target.wants/ctrlable-firstboot.service"
        assert os.readlink(wants) == "/etc/systemd/system/ctrlable-firstboot.service"
        conf = fs / "etc/ctrlable/firstboot.conf"
        assert os.stat(conf).st_mode & 0o777 == 0o600
        conf_text = conf.read_text()
        assert f"FIRSTBOOT_SECRET={FIRSTBOOT_SECRET}\n" in conf_text
        assert f"TEMPLATE_TYPE={name}\n" in conf_text
        assert "COMPANION_URL=http://127.0.0.1:8580\n" in conf_text
        assert (fs / "etc/machine-id").read_text() == ""
        assert list((fs / "etc/ssh").glob("ssh_host_*")) == []
        assert not (fs / "etc/systemd/system/container-getty@1.service.d/override.conf").exists()
        update = (fs / "usr/bin/update").read_text()
        assert "curl" not in update
        assert "exit 1" in update
        assert list((fs / "root").glob(".install-*")) == []
        assert not (fs / "tmp/ctrlable-firstboot").exists()
    z2m = (host.rootfs(9020) / "opt/zigbee2mqtt/data/configuration.yaml").read_text()
    assert "  network_key: GENERATE\n  pan_id: GENERATE\n  ext_pan_id: GENERATE\n" in z2m
    assert "- 17" not in z2m
    assert "  log_level: info\n" in z2m
    assert not (host.rootfs(9020) / "opt/zigbee2mqtt/data/state.json").exists()
    assert list((host.rootfs(9010) / "opt/zwave_store").iterdir()) == []
    assert not (host.rootfs(9040) / "config/frigate.db").exists()
    assert not (host.rootfs(9040) / "config/.jwt_secret").exists()
    docker_log = (host.rootfs(9030) / ".fake/docker.log").read_text()
    assert "pull portainer/portainer-ce:2.27.9" in docker_log
    assert "create --name portainer" in docker_log
    assert "start" not in docker_log.replace("--restart", "")  # created, never started
    for vmid in (9030, 9040):  # privileged: the builder added USB/GPU passthrough lines
        conf_text = host.lxc_conf(vmid).read_text()
        assert "lxc.cgroup2.devices.allow" not in conf_text
        assert "lxc.mount.entry: /dev/" not in conf_text
        assert "dev0:" not in conf_text
        assert "lxc.cap.drop" not in conf_text
    assert not _wrapper_processes(host)


async def test_failed_builds_are_destroyed_and_reported(env: BuildEnv) -> None:
    host = env.host
    host.behave("frigate", "exit0-nocontainer")  # exit 0, no container
    host.behave("freepbx", "fail-install")  # the container stays behind without a TTY
    host.behave("zwave-js-ui", "moved-id")  # silently built under the next free id
    host.behave("docker", "unit-inactive")  # exit 0, but the app is not running
    host.behave("zigbee2mqtt", "tty-prompt")  # reads /dev/tty: must not block
    built = await env.start(["zwavejs", "zigbee2mqtt", "docker-portainer", "frigate", "freepbx"])
    final = await env.wait_build(built["id"])

    assert final["state"] == "failed"
    assert final["error"] == (
        "4 of 5 templates failed: zwavejs, docker-portainer, frigate, freepbx"
    )
    t = final["templates"]
    assert t["zigbee2mqtt"]["state"] == "succeeded"
    assert t["frigate"]["error"] == "ct/frigate.sh exited 0 but container 9040 does not exist"
    assert t["freepbx"]["error"] == "ct/freepbx.sh failed with exit code 1"
    assert t["docker-portainer"]["error"] == "unit docker is not active in CT 9030 (inactive)"
    assert t["zwavejs"]["error"] == "ct/zwave-js-ui.sh exited 0 but container 9010 does not exist"
    for name in ("zwavejs", "docker-portainer", "frigate", "freepbx"):
        assert t[name]["state"] == "failed"
        assert t[name]["percent"] == 100
    assert final["percent"] == 100

    pct = host.calls("pct")
    for vmid in ("9011", "9030", "9050"):
        assert ["pct", "destroy", vmid, "--purge"] in pct, vmid
        assert not host.guest_exists(int(vmid))
    assert not host.guest_exists(9040)
    assert host.guest_exists(9020)
    assert "[freepbx] | E: the install of freepbx failed" in final["log_tail"]
    assert "[freepbx] destroyed [9050]" in final["log_tail"]

    # The tty prompt failed fast (no controlling terminal) and took its default.
    [log_dir] = host.log_dirs()
    assert "answer: n" in (log_dir / "zigbee2mqtt.log").read_text()

    names = [r["name"] for r in await env.companion.services.db.fetchall("SELECT * FROM templates")]
    assert names == ["zigbee2mqtt"]
    assert await env.companion.services.releases.active() is None
    row = await env.companion.services.db.fetchone(
        "SELECT state FROM releases WHERE release = '2026.06'"
    )
    assert row == {"state": "available"}
    assert not _wrapper_processes(host)


async def test_a_dropped_ssh_connection_fails_the_build_and_the_host_cleans_up(
    env: BuildEnv,
) -> None:
    host = env.host
    host.behave("zwave-js-ui", "hang")
    built = await env.start(["zwavejs"])
    await env.wait_for("the container", lambda: host.guest_exists(9010))
    sessions = env.sshd.session_pids()
    assert sessions
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    final = await env.wait_build(built["id"])
    assert final["state"] == "failed"
    assert "dropped" in final["error"] or "connection" in final["error"].lower()
    assert final["templates"]["zwavejs"]["state"] == "failed"
    # The wrapper saw its stdin close (hang-up): it killed the builder and destroyed the CT.
    await env.wait_for(
        "pct destroy 9010", lambda: ["pct", "destroy", "9010", "--purge"] in host.calls("pct")
    )
    await env.wait_for("the sandbox to be idle", lambda: not _wrapper_processes(host))
    assert not host.guest_exists(9010)
    [log_dir] = host.log_dirs()
    host_events = [json.loads(x) for x in (log_dir / "events.jsonl").read_text().splitlines()]
    assert host_events[-1]["event"] == "done"
    assert host_events[-1]["error"] == "build cancelled (SIGHUP)"
    assert host_events[-2]["destroyed"] == [9010]
    status = host.run("status")
    assert '"running":false' in status.stdout


async def test_a_second_build_is_refused_and_cancel_cleans_up(env: BuildEnv) -> None:
    host = env.host
    host.behave("zwave-js-ui", "hang")
    built = await env.start(["zwavejs"])
    status, body = await env.companion.request(
        "POST", "/api/v1/releases/2026.06/build", json={"templates": ["frigate"]}
    )
    assert status == 409
    assert body["error"]["code"] == "conflict"
    assert body["error"]["details"] == {"build_id": built["id"]}
    await env.wait_for("the container", lambda: host.guest_exists(9010))
    plane = env.companion.services.build
    await env.wait_for("the host build id", lambda: (plane.current() or {}).get("host_build_id"))
    running = host.run("status")
    assert '"running":true' in running.stdout
    assert '"template":"zwavejs"' in running.stdout

    status, body = await env.companion.request("POST", f"/api/v1/builds/{built['id']}/cancel")
    assert status == 202
    final = await env.wait_build(built["id"])
    assert final["state"] == "cancelled"
    assert final["templates"]["zwavejs"]["state"] == "failed"
    assert final["templates"]["zwavejs"]["error"] == "build cancelled (SIGTERM)"
    assert ["pct", "destroy", "9010", "--purge"] in host.calls("pct")
    assert not host.guest_exists(9010)
    await env.wait_for("the sandbox to be idle", lambda: not _wrapper_processes(host))
    status, body = await env.companion.request("POST", f"/api/v1/builds/{built['id']}/cancel")
    assert status == 409
    # The host is free again: the next build runs.
    host.behave("zwave-js-ui", "ok")
    again = await env.start(["zwavejs"])
    assert (await env.wait_build(again["id"]))["state"] == "succeeded"


async def test_an_unknown_host_key_is_refused(env: BuildEnv, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    env.sshd.known_hosts(env.companion.settings.build_ssh_known_hosts, key=other)
    built = await env.start(["zwavejs"])
    final = await env.wait_build(built["id"])
    assert final["state"] == "failed"
    assert "does not match CTRLABLE_BUILD_SSH_KNOWN_HOSTS" in final["error"]
    assert env.host.calls() == []


async def test_build_requests_are_checked(env: BuildEnv) -> None:
    request = env.companion.request
    status, body = await request("POST", "/api/v1/releases/2099.01/build")
    assert status == 404
    status, body = await request(
        "POST", "/api/v1/releases/2026.06/build", json={"templates": ["zwavejs", "nope"]}
    )
    assert status == 400
    assert body["error"]["details"][0]["field"] == "templates.1"
    status, body = await request(
        "POST", "/api/v1/releases/2026.06/build", json={"templates": ["Bad Name"]}
    )
    assert status == 400
    assert body["error"]["details"][0]["field"] == "templates.0"
    status, body = await request("POST", "/api/v1/releases/2026.06/build", json={"templates": []})
    assert status == 400
    status, body = await request("POST", "/api/v1/releases/2026.06/build", json={"x": 1})
    assert status == 400
    status, body = await request("GET", "/api/v1/builds/999")
    assert status == 404
    assert env.host.calls() == []


async def test_manifest_route_serves_what_the_wrapper_needs(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    companion: Companion = await companion_factory(make_settings(tmp_path))
    status, body = await companion.request("GET", "/api/v1/releases/2026.06/manifest")
    assert status == 200
    assert body["release"] == "2026.06"
    assert body["community_scripts_ref"] == "2026-05-29"
    assert body["templates"]["zwavejs"]["vmid_base"] == 9010
    assert body["build"]["firstboot_secret"] == FIRSTBOOT_SECRET
    assert body["build"]["companion_url"] == "http://127.0.0.1:8580"
    assert len(body["build"]["manifest_sha256"]) == 64
    status, body = await companion.request("GET", "/api/v1/releases/1999.01/manifest")
    assert status == 404
    status, body = await companion.request(
        "GET", "/api/v1/releases/2026.06/manifest", headers={"Authorization": "Bearer nope"}
    )
    assert status == 401


async def test_builds_need_the_ssh_settings(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    companion: Companion = await companion_factory(make_settings(tmp_path))
    status, body = await companion.request("POST", "/api/v1/releases/2026.06/build")
    assert status == 503
    assert body["error"]["code"] == "build_not_configured"
    assert "CTRLABLE_BUILD_SSH_HOST" in body["error"]["message"]
    assert "CTRLABLE_BUILD_SSH_KNOWN_HOSTS" in body["error"]["message"]


async def test_a_restart_during_a_build_marks_it_failed(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    await db.execute(
        "INSERT INTO releases (release, state, created_at) VALUES ('2026.06', 'building', ?)",
        (utcnow(),),
    )
    templates = {
        "zwavejs": {"state": "succeeded", "percent": 100},
        "frigate": {"state": "running", "percent": 40},
    }
    await db.execute(
        "INSERT INTO builds (release, state, percent, templates, started_at)"
        " VALUES ('2026.06', 'running', 70, ?, ?)",
        (json.dumps(templates), utcnow()),
    )
    await db.close()
    companion: Companion = await companion_factory(settings)
    status, body = await companion.request("GET", "/api/v1/builds/1")
    assert status == 200
    assert body["state"] == "failed"
    assert body["error"] == RESTART_ERROR
    assert body["finished_at"] is not None
    assert body["templates"]["zwavejs"]["state"] == "succeeded"
    assert body["templates"]["frigate"]["state"] == "failed"
    row = await companion.services.db.fetchone(
        "SELECT state FROM releases WHERE release = '2026.06'"
    )
    assert row == {"state": "available"}
    events = await companion.services.events.since(0)
    assert any(e.type == "build.state" and e.data["state"] == "failed" for e in events)


def test_cli_reports_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CTRLABLE_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.env
    assert build_cli.main(["2026.06", "--url", "http://127.0.0.1:9"], io.StringIO()) == 2
    assert "CTRLABLE_API_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("CTRLABLE_API_TOKEN", "x")
    assert build_cli.main(["2026.06", "--url", "ftp://host"], io.StringIO()) == 2
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert build_cli.main(["2026.06", "--url", "http://127.0.0.1:9"], io.StringIO()) == 2
    assert "cannot reach the companion" in capsys.readouterr().err


def test_progress_line_rendering() -> None:
    line = build_cli.render(
        {
            "state": "running",
            "percent": 40,
            "templates": {
                "zwavejs": {"state": "succeeded", "percent": 100},
                "frigate": {"state": "running", "percent": 55, "step": "builder", "message": "x"},
            },
        }
    )
    assert line == "[############------------------]  40% running (1/2) frigate 55% builder: x"
