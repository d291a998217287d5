"""Start the whole product on one machine: PVE simulator, companion and (optionally) Home Assistant.

Used by ``ctrlable-companion demo`` and by the end-to-end tests, so both run the same processes
the same way. Everything binds 127.0.0.1 on free ports; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StackError(RuntimeError):
    """A process of the stack did not come up; the message carries its log tail."""


@dataclass
class Proc:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    popen = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        start_new_session=True,
    )
    return Proc(name, popen, log_path, log)


async def wait_http(
    proc: Proc, url: str, timeout: float, *, ok: tuple[int, ...] = (200,), ssl: bool = True
) -> None:
    """Poll ``url`` until it answers one of ``ok`` or the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    connector = aiohttp.TCPConnector(ssl=ssl)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < deadline:
            if not proc.alive():
                msg = f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}"
                raise StackError(msg)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status in ok:
                        return
            await asyncio.sleep(0.2)
    msg = f"{proc.name} did not answer {url} within {timeout:.0f}s:\n{proc.log_tail()}"
    raise StackError(msg)


# --- PVE simulator and companion ------------------------------------------------------------


@dataclass(frozen=True)
class SimInfo:
    url: str
    ca_file: str
    fingerprint: str
    token_id: str
    token_secret: str


async def start_sim(
    workdir: Path, task_seconds: float = 1.0, timeout: float = 30.0
) -> tuple[Proc, SimInfo]:
    """The simulator as a process, seeded with the newest release's (tagged) templates."""
    port = free_port()
    log = workdir / "sim.log"
    proc = spawn(
        "simulator",
        [sys.executable, "-m", "companion", "sim", "--port", str(port),
         "--cert-dir", str(workdir / "sim-certs"), "--task-seconds", str(task_seconds)],
        log,
        env={"CTRLABLE_SIM_TOKEN_SECRET": secrets.token_hex(16)},
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"token_secret"' in line:
                data = json.loads(line)
                base = f"https://{data['host']}:{data['port']}"
                return proc, SimInfo(
                    base, data["ca_file"], data["fingerprint"], data["token_id"],
                    data["token_secret"],
                )  # fmt: skip
        if not proc.alive():
            break
        await asyncio.sleep(0.1)
    proc.stop()
    msg = f"the simulator did not start:\n{proc.log_tail()}"
    raise StackError(msg)


def companion_env(
    workdir: Path, sim: SimInfo, api_token: str, port: int, **extra: str
) -> dict[str, str]:
    env = {
        "CTRLABLE_API_TOKEN": api_token,
        "CTRLABLE_LISTEN_HOST": "127.0.0.1",
        "CTRLABLE_LISTEN_PORT": str(port),
        "CTRLABLE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CTRLABLE_DATA_DIR": str(workdir / "companion"),
        "CTRLABLE_PVE_URL": sim.url,
        "CTRLABLE_PVE_TOKEN_ID": sim.token_id,
        "CTRLABLE_PVE_TOKEN_SECRET": sim.token_secret,
        "CTRLABLE_PVE_CA_FILE": sim.ca_file,
        "CTRLABLE_FIRSTBOOT_SECRET": secrets.token_urlsafe(24),
        "CTRLABLE_SITE_ID": "demo-site",
        "CTRLABLE_SITE_NAME": "Ctrlable demo site",
    }
    env.update(extra)
    return env


async def start_companion(
    workdir: Path, sim: SimInfo, api_token: str, timeout: float = 30.0, **extra: str
) -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(
        "companion",
        [sys.executable, "-m", "companion", "serve"],
        workdir / "companion.log",
        env=companion_env(workdir, sim, api_token, port, **extra),
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(proc, f"{url}/api/health", timeout)
    return proc, url


# --- Home Assistant -------------------------------------------------------------------------


def hass_binary() -> Path:
    candidate = Path(sys.executable).with_name("hass")
    if candidate.exists():
        return candidate
    found = shutil.which("hass")
    if found is None:
        msg = "no `hass` next to this Python or on PATH (run `make venv`)"
        raise StackError(msg)
    return Path(found)


def write_hass_config(config_dir: Path, port: int, *, link_integration: bool = True) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        "homeassistant:\n"
        "  name: Ctrlable demo\n"
        "  time_zone: UTC\n"
        "  country: DE\n"
        "http:\n"
        "  server_host: 127.0.0.1\n"
        f"  server_port: {port}\n"
        "api:\n"
        "onboarding:\n"
        "config:\n"
        "frontend:\n"
        "backup:\n"
        "logger:\n"
        "  default: warning\n"
        "  logs:\n"
        "    custom_components.ctrlable: debug\n"
    )
    if link_integration:
        custom = config_dir / "custom_components"
        custom.mkdir(exist_ok=True)
        link = custom / "ctrlable"
        if not link.exists():
            link.symlink_to(REPO / "custom_components" / "ctrlable", target_is_directory=True)


async def start_hass(
    config_dir: Path, port: int | None = None, timeout: float = 90.0
) -> tuple[Proc, str]:
    port = port or free_port()
    write_hass_config(config_dir, port)
    proc = spawn(
        "hass",
        [str(hass_binary()), "-c", str(config_dir), "--skip-pip"],
        config_dir / "hass.log",
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(proc, f"{url}/api/onboarding", timeout)
    return proc, url


@dataclass
class HaSession:
    """A logged-in HA admin: REST calls with the access token."""

    url: str
    access_token: str
    refresh_token: str
    http: aiohttp.ClientSession = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url + path, headers=self.headers, **kwargs
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text


async def onboard(http: aiohttp.ClientSession, url: str, username: str, password: str) -> HaSession:
    """Complete HA's onboarding through its REST API and return an admin session."""
    client_id = f"{url}/"
    async with http.post(
        f"{url}/api/onboarding/users",
        json={
            "client_id": client_id,
            "name": "Ctrlable Dealer",
            "username": username,
            "password": password,
            "language": "en",
        },
    ) as resp:
        if resp.status != 200:
            msg = f"onboarding/users answered {resp.status}: {await resp.text()}"
            raise StackError(msg)
        auth_code = (await resp.json())["auth_code"]
    tokens = await _token(http, url, auth_code, client_id)
    session = HaSession(url, tokens["access_token"], tokens["refresh_token"], http)
    for step, body in (
        ("core_config", None),
        ("analytics", None),
        ("integration", {"client_id": client_id, "redirect_uri": f"{url}/?auth_callback=1"}),
    ):
        status, answer = await session.call("POST", f"/api/onboarding/{step}", json=body)
        if status != 200:
            msg = f"onboarding/{step} answered {status}: {answer}"
            raise StackError(msg)
    return session


async def _token(
    http: aiohttp.ClientSession, url: str, code: str, client_id: str
) -> dict[str, Any]:
    async with http.post(
        f"{url}/auth/token",
        data={"grant_type": "authorization_code", "code": code, "client_id": client_id},
    ) as resp:
        if resp.status != 200:
            msg = f"auth/token answered {resp.status}: {await resp.text()}"
            raise StackError(msg)
        result: dict[str, Any] = await resp.json()
        return result


async def add_ctrlable_entry(ha: HaSession, companion_url: str, api_token: str) -> dict[str, Any]:
    """Run the integration's config flow through HA's REST API, as the UI does."""
    status, flow = await ha.call(
        "POST", "/api/config/config_entries/flow", json={"handler": "ctrlable"}
    )
    if status != 200:
        msg = f"starting the ctrlable config flow answered {status}: {flow}"
        raise StackError(msg)
    status, result = await ha.call(
        "POST",
        f"/api/config/config_entries/flow/{flow['flow_id']}",
        json={"url": companion_url, "api_token": api_token},
    )
    if status != 200 or result.get("type") != "create_entry":
        msg = f"the ctrlable config flow did not create an entry ({status}): {result}"
        raise StackError(msg)
    return dict(result)


def new_password() -> str:
    return secrets.token_urlsafe(12)
