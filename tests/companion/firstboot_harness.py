"""Run the REAL firstboot/ctrlable-firstboot.sh in a sandbox root (shared by the first-boot tests
and the deploy end-to-end tests).

``make_guest`` copies ``fixtures/firstboot/common`` and the type's fixture into a temp dir standing
for "/" of a fresh clone, with its hostname, eth0 MAC and ``firstboot.conf``; ``run_script`` runs
the script there with fake systemctl/hostnamectl/docker/mysql/logger (``fakes/firstboot``) that
record their calls (``Guest.calls()``) and journal lines (``Guest.journal``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import FIRSTBOOT_SECRET, REPO

SCRIPT = REPO / "firstboot" / "ctrlable-firstboot.sh"
UNIT = REPO / "firstboot" / "ctrlable-firstboot.service"
FIXTURES = Path(__file__).parent / "fixtures" / "firstboot"
FAKES = Path(__file__).parent / "fakes" / "firstboot"
TEMPLATE_MACHINE_ID = "0123456789abcdef0123456789abcdef"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

needs_tools = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("ssh-keygen")),
    reason="the script needs curl and ssh-keygen",
)


@dataclass
class Guest:
    root: Path
    hostname: str
    mac: str
    log: Path
    journal: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def make_guest(tmp_path: Path, type_: str, hostname: str, mac: str, url: str, **conf: str) -> Guest:
    root = tmp_path / f"root-{hostname}"
    shutil.copytree(FIXTURES / "common", root)
    shutil.copytree(FIXTURES / type_, root, dirs_exist_ok=True)
    # What PVE does for a clone: the hostname from the clone call, a fresh MAC on eth0.
    (root / "etc" / "hostname").write_text(hostname + "\n")
    (root / "sys" / "class" / "net" / "eth0").mkdir(parents=True)
    (root / "sys" / "class" / "net" / "eth0" / "address").write_text(mac.lower() + "\n")
    # What the build wrapper writes into the template.
    (root / "etc" / "ctrlable").mkdir(parents=True, exist_ok=True)
    lines = [f"COMPANION_URL={url}", f"FIRSTBOOT_SECRET='{FIRSTBOOT_SECRET}'"]
    lines += [f"{k}={v}" for k, v in conf.items()]
    (root / "etc" / "ctrlable" / "firstboot.conf").write_text("\n".join(lines) + "\n")
    return Guest(
        root, hostname, mac, tmp_path / f"{hostname}.calls", tmp_path / f"{hostname}.journal"
    )


async def run_script(guest: Guest, timeout: float = 60.0, **env: str) -> Run:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "CTRLABLE_ROOT": str(guest.root),
        "CTRLABLE_SYSTEMCTL": str(FAKES / "systemctl"),
        "CTRLABLE_HOSTNAMECTL": str(FAKES / "hostnamectl"),
        "CTRLABLE_DOCKER": str(FAKES / "docker"),
        "CTRLABLE_MYSQL": str(FAKES / "mysql"),
        "CTRLABLE_LOGGER": str(FAKES / "logger"),
        "CTRLABLE_PYTHON": PYTHON,
        "CTRLABLE_FAKE_LOG": str(guest.log),
        "CTRLABLE_FAKE_JOURNAL": str(guest.journal),
        "CTRLABLE_RETRY_MAX_SECONDS": "10",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(SCRIPT),
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def assert_new_identity(guest: Guest) -> None:
    machine_id = guest.read("etc/machine-id").strip()
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)
    assert machine_id != TEMPLATE_MACHINE_ID
    assert guest.read("var/lib/dbus/machine-id").strip() == machine_id
    ssh = guest.root / "etc" / "ssh"
    assert "TEMPLATE" not in (ssh / "ssh_host_ed25519_key").read_text()
    for kind in ("ed25519", "ecdsa", "rsa"):
        assert (ssh / f"ssh_host_{kind}_key").stat().st_size > 0
        assert (ssh / f"ssh_host_{kind}_key.pub").read_text().startswith(("ssh-", "ecdsa-"))


def assert_finished(guest: Guest, unit: str | None) -> None:
    calls = guest.calls()
    assert "systemctl disable ctrlable-firstboot.service" in calls
    if unit is not None:
        assert f"systemctl restart --no-block {unit}" in calls
    assert (guest.root / "var" / "lib" / "ctrlable" / "firstboot.done").exists()
    assert not list((guest.root / "run").glob("ctrlable-firstboot.*"))  # work dir removed


class FakePortainer:
    """Portainer's first-admin API on loopback: status, admin check, admin init."""

    def __init__(self, fail_init: int = 0) -> None:
        self.admins: list[dict[str, Any]] = []
        self.fail_init = fail_init
        app = web.Application()
        app.router.add_get("/api/system/status", self.status)
        app.router.add_get("/api/users/admin/check", self.check)
        app.router.add_post("/api/users/admin/init", self.init)
        self.server = TestServer(app, host="127.0.0.1")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"Version": "2.27.9"})

    async def check(self, request: web.Request) -> web.Response:
        return web.Response(status=204 if self.admins else 404)

    async def init(self, request: web.Request) -> web.Response:
        if self.fail_init:
            self.fail_init -= 1
            return web.json_response({"message": "boom"}, status=500)
        if self.admins:
            return web.json_response({"message": "admin exists"}, status=409)
        self.admins.append(await request.json())
        return web.json_response({"Id": 1, "Username": self.admins[0]["Username"]})
