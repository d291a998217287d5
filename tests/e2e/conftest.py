"""End-to-end fixtures: a REAL Home Assistant process (``.venv/bin/hass``), the PVE simulator and
the companion, all on 127.0.0.1.

Run with the Python 3.13 venv and without pytest-homeassistant-custom-component's plugin (it
blocks sockets and replaces the event loop policy):

    .venv/bin/pytest -p no:homeassistant tests/e2e
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[2]
HASS = Path(sys.executable).parent / "hass"
RESTART_EXIT_CODE = 100  # homeassistant.const.RESTART_EXIT_CODE
HASS_START_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs a real hass process (Python 3.13 venv)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ha_configuration(port: int) -> str:
    """A minimal configuration.yaml: HTTP on loopback and what onboarding + backup need."""
    return (
        "http:\n"
        "  server_host: 127.0.0.1\n"
        f"  server_port: {port}\n"
        "api:\n"
        "config:\n"
        "onboarding:\n"
        "backup:\n"
        "logger:\n"
        "  default: warning\n"
    )


class HassProcess:
    """``hass -c <dir>`` supervised like HAOS's Supervisor does it: an exit with code 100 (a
    restart, e.g. to restore a backup) starts it again."""

    def __init__(self, config_dir: Path, port: int, log: Path) -> None:
        self.config_dir = config_dir
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0
        self.exit_codes: list[int] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _spawn(self) -> asyncio.subprocess.Process:
        handle = self.log.open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                str(HASS),
                "-c",
                str(self.config_dir),
                "--skip-pip",
                "--ignore-os-check",
                "--log-file",
                str(self.log.with_suffix(".hass.log")),
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            handle.close()

    async def _supervise(self) -> None:
        while not self._stopping:
            self._proc = await self._spawn()
            self.starts += 1
            code = await self._proc.wait()
            self.exit_codes.append(code)
            if code != RESTART_EXIT_CODE:
                return

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise())
        await self.wait_up()

    def tail(self, lines: int = 60) -> str:
        texts = []
        for path in (self.log, self.log.with_suffix(".hass.log")):
            if path.exists():
                texts.append(
                    f"--- {path.name}\n"
                    + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(texts)

    async def wait_up(self, timeout: float = HASS_START_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self._task is not None and self._task.done():
                    pytest.fail(f"hass exited ({self.exit_codes}):\n{self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        self.url + "/api/onboarding", timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.25)
        pytest.fail(f"hass did not answer within {timeout:g} s:\n{self.tail()}")

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


@pytest.fixture
async def hass(tmp_path: Path) -> AsyncIterator[HassProcess]:
    """A fresh, never-onboarded Home Assistant standing in for the cloned VM's HA."""
    if not HASS.exists():
        pytest.fail(f"{HASS} is missing: run `make venv` (the 3.13 venv has homeassistant)")
    port = free_port()
    config_dir = tmp_path / "ha-config"
    config_dir.mkdir()
    (config_dir / "configuration.yaml").write_text(ha_configuration(port))
    process = HassProcess(config_dir, port, tmp_path / "hass.out")
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
