"""``ctrlable-companion demo``: the product on its embedded defaults, on 127.0.0.1.

Starts the PVE simulator (seeded with the shipped release's templates), the companion against
it, and — when Home Assistant is installed in this Python (the project's ``.venv``) — a fresh
``hass`` with the ctrlable integration, onboarded and configured. Prints the URLs, the API token
and the HA login, then runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import secrets
import shutil
import signal
from pathlib import Path

import aiohttp

from .devstack import (
    REPO,
    Proc,
    StackError,
    add_ctrlable_entry,
    new_password,
    onboard,
    start_companion,
    start_hass,
    start_sim,
)


async def run(workdir: Path, with_ha: bool) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    procs: list[Proc] = []
    try:
        sim_proc, sim = await start_sim(workdir)
        procs.append(sim_proc)
        api_token = secrets.token_urlsafe(24)
        # Simulated guests run no first-boot unit, so deployed instances wait in
        # awaiting_firstboot; a day-long timeout keeps them there instead of rolling back.
        companion_proc, companion_url = await start_companion(
            workdir, sim, api_token, CTRLABLE_FIRSTBOOT_TIMEOUT="86400"
        )
        procs.append(companion_proc)
        lines = [
            "Ctrlable demo is running (Ctrl-C stops it).",
            f"  PVE simulator : {sim.url}/api2/json  (token {sim.token_id})",
            f"  companion     : {companion_url}  (API token: {api_token})",
            f"  try           : curl -H 'Authorization: Bearer {api_token}' "
            f"{companion_url}/api/v1/overview",
        ]
        if with_ha:
            hass_proc, ha_url = await start_hass(workdir / "ha")
            procs.append(hass_proc)
            password = new_password()
            async with aiohttp.ClientSession() as http:
                ha = await onboard(http, ha_url, "dealer", password)
                await add_ctrlable_entry(ha, companion_url, api_token)
            lines += [
                f"  Home Assistant: {ha_url}  (login: dealer / {password})",
                "  deploy from HA: Settings > Devices & services > Ctrlable > Add instance,",
                "                  or the action ctrlable.deploy_instance",
            ]
        lines.append("  note          : simulated guests have no first boot; instances stay in")
        lines.append("                  awaiting_firstboot (tests run the real first-boot script)")
        lines.append(f"  logs          : {workdir}")
        print("\n".join(lines), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            dead = [p for p in procs if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited:\n{dead[0].log_tail()}", flush=True)
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return 0
    except StackError as err:
        print(f"demo: {err}", flush=True)
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ctrlable-companion demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo", help="state and logs")
    parser.add_argument("--no-ha", action="store_true", help="do not start Home Assistant")
    args = parser.parse_args(argv)
    with_ha = not args.no_ha and importlib.util.find_spec("homeassistant") is not None
    return asyncio.run(run(args.workdir, with_ha))
