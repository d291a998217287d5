"""Restart safety: stop the companion in the middle of a deploy, start a new one on the same DB,
and see every instance finish or roll back, with no orphan guest and no lost record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from companion.sim import Simulator, run_simulator
from companion.state import utcnow

from .conftest import Companion
from .deploy_support import (
    companion_settings,
    first_boot,
    release_templates,
    sim_config,
    sim_guests,
    state_is,
    wait_for,
)
from .firstboot_harness import needs_tools

Factory = Callable[..., Any]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(sim_config(), templates=release_templates()) as s:
        yield s


class Restarts:
    """Companions on one data dir, one at a time."""

    def __init__(self, factory: Factory, tmp_path: Path, sim: Simulator, **settings: Any):
        self.settings = companion_settings(tmp_path, sim, **settings)
        self.factory = factory
        self.current: Companion | None = None

    async def start(self, **changes: Any) -> Companion:
        settings = self.settings.model_copy(update=changes) if changes else self.settings
        self.current = await self.factory(settings)
        return self.current

    async def stop(self) -> None:
        assert self.current is not None
        await self.current.server.close()  # stops the planes: in-flight work stays recorded
        self.current = None


async def deploy(companion: Companion, hostname: str, type_: str = "freepbx") -> int:
    status, body = await companion.request(
        "POST", "/api/v1/instances", json={"project": "p1", "type": type_, "hostname": hostname}
    )
    assert status == 202, body
    return int(body["id"])


def guests_named(sim: Simulator, hostname: str) -> list[int]:
    return [vmid for vmid, g in sim_guests(sim).items() if g.name == hostname]


async def insert_instance(
    companion: Companion, *, state: str, step: str, vmid: int | None, hostname: str = "made"
) -> int:
    """An instance row as a previous run could have left it (for the resume table's rows
    that are hard to hit by timing)."""
    db = companion.services.db
    now = utcnow()
    await db.execute("INSERT OR IGNORE INTO projects (name, created_at) VALUES ('p1', ?)", (now,))
    return await db.execute(
        "INSERT INTO instances (project_id, type, hostname, release, node, template_vmid, vmid,"
        " state, step, overrides, created_at, updated_at, step_at)"
        " VALUES ((SELECT id FROM projects WHERE name = 'p1'), 'freepbx', ?, '2026.06', 'pve',"
        " 9050, ?, ?, ?, '{}', ?, ?, ?)",
        (hostname, vmid, state, step, now, now, now),
    )


# --------------------------------------------------------------------------------------------
# Stopped by timing in the middle of a real deploy
# --------------------------------------------------------------------------------------------


@needs_tools
async def test_resume_a_clone_in_progress(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    sim.core.set_task_duration("vzclone", 0.8)
    iid = await deploy(first, "pbx")
    await wait_for(first, iid, lambda b: b["step"] == "clone")
    await asyncio.sleep(0.2)  # the clone task runs on PVE
    await runs.stop()

    second = await runs.start()
    waiting = await wait_for(second, iid, state_is("awaiting_firstboot", "failed"))
    assert waiting["state"] == "awaiting_firstboot", waiting
    assert guests_named(sim, "pbx") == [waiting["vmid"]]
    _, run = await first_boot(second, tmp_path, waiting)
    assert run.code == 0, run.stderr
    assert (await wait_for(second, iid, state_is("active", "failed")))["state"] == "active"
    assert list(sim_guests(sim)) == [waiting["vmid"]]


@needs_tools
async def test_resume_waiting_for_first_boot(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    iid = await deploy(first, "pbx")
    waiting = await wait_for(first, iid, state_is("awaiting_firstboot", "failed"))
    await runs.stop()

    second = await runs.start()
    _, run = await first_boot(second, tmp_path, waiting)
    assert run.code == 0, run.stderr
    active = await wait_for(second, iid, state_is("active", "failed"))
    assert active["state"] == "active"
    assert active["vmid"] == waiting["vmid"]


async def test_resumed_wait_keeps_only_the_remaining_time(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim, firstboot_timeout=600)
    first = await runs.start()
    iid = await deploy(first, "pbx")
    await wait_for(first, iid, state_is("awaiting_firstboot", "failed"))
    # The wait began 599.5 s ago (as if the companion had been down that long).
    began = (datetime.now(UTC) - timedelta(seconds=599.5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await first.services.db.execute("UPDATE instances SET step_at = ? WHERE id = ?", (began, iid))
    await runs.stop()

    second = await runs.start()
    failed = await wait_for(second, iid, state_is("failed", "active"), timeout=15)
    assert failed["state"] == "failed"
    assert failed["error"] == "firstboot: no first-boot callback within 600 s"
    assert sim_guests(sim) == {}


async def test_completion_recorded_while_going_down_becomes_active(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    iid = await deploy(first, "pbx")
    await wait_for(first, iid, state_is("awaiting_firstboot", "failed"))
    # The provision plane consumed the assignment, then the companion went down before the
    # instance was marked active.
    await first.services.db.execute(
        "UPDATE assignments SET state = 'consumed', consumed_at = ? WHERE instance_id = ?",
        (utcnow(), iid),
    )
    await runs.stop()
    second = await runs.start()
    assert (await wait_for(second, iid, state_is("active", "failed")))["state"] == "active"


async def test_learned_task_durations_survive_a_restart(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    """The first deploy after a restart polls its clone once or twice, not on the growth
    schedule (which polls a 0.6 s task about a dozen times)."""
    sim.core.set_task_duration("vzclone", 0.6)
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    iid = await deploy(first, "pbx-1")
    await wait_for(first, iid, state_is("awaiting_firstboot", "failed"))
    learned = first.services.pve.learned_durations()
    assert 0.5 < learned["vzclone:9050"] < 1.0
    assert not any(key.startswith("vzstart:") for key in learned)  # a guest's own id: not kept
    await runs.stop()

    second = await runs.start()
    assert second.services.pve.learned_durations()["vzclone:9050"] == learned["vzclone:9050"]
    sim.request_log.clear()
    iid = await deploy(second, "pbx-2")
    await wait_for(second, iid, state_is("awaiting_firstboot", "failed"))
    clone_polls = [
        r
        for r in sim.request_log.records()
        if r.method == "GET" and ":vzclone:" in r.path and r.path.endswith("/status")
    ]
    assert 1 <= len(clone_polls) <= 2


async def test_resume_a_rollback_in_progress(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    sim.faults.fail_task("vzstart", "startup for container failed")
    sim.core.set_task_duration("vzdestroy", 1.0)
    iid = await deploy(first, "pbx")
    rolling = await wait_for(first, iid, state_is("rolling_back", "failed"))
    assert rolling["state"] == "rolling_back"
    await runs.stop()
    assert guests_named(sim, "pbx")  # not destroyed yet

    second = await runs.start()
    failed = await wait_for(second, iid, state_is("failed"))
    assert failed["error"].startswith("start: ")
    await asyncio.sleep(1.2)  # a destroy task from the first run may still be ending
    assert sim_guests(sim) == {}


# --------------------------------------------------------------------------------------------
# States a previous run left (written directly)
# --------------------------------------------------------------------------------------------


async def test_resume_finds_someone_elses_guest_at_its_vmid(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    # The clone was recorded but never sent; meanwhile another user took the id.
    iid = await insert_instance(first, state="cloning", step="clone", vmid=300)
    sim.state.add_guest("lxc", 300, "pve", "someone-elses")
    await runs.stop()

    second = await runs.start()
    waiting = await wait_for(second, iid, state_is("awaiting_firstboot", "failed"))
    assert waiting["state"] == "awaiting_firstboot", waiting
    assert waiting["vmid"] != 300
    assert sim.state.guests[300].name == "someone-elses"
    assert sim.state.guests[300].config.get("description") is None


async def test_resume_a_recorded_clone_that_was_never_sent(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    iid = await insert_instance(first, state="cloning", step="clone", vmid=310)
    pending = await insert_instance(
        first, state="pending", step="allocate_vmid", vmid=None, hostname="later"
    )
    await runs.stop()

    second = await runs.start()
    waiting = await wait_for(second, iid, state_is("awaiting_firstboot", "failed"))
    assert waiting["vmid"] == 310
    assert guests_named(sim, "made") == [310]
    other = await wait_for(second, pending, state_is("awaiting_firstboot", "failed"))
    assert other["state"] == "awaiting_firstboot"
    assert other["vmid"] not in (310, None)


async def test_resumed_rollback_never_destroys_a_foreign_guest(
    sim: Simulator, companion_factory: Factory, tmp_path: Path
) -> None:
    runs = Restarts(companion_factory, tmp_path, sim)
    first = await runs.start()
    iid = await insert_instance(first, state="rolling_back", step="rollback", vmid=320)
    removing = await insert_instance(
        first, state="rolling_back", step="remove", vmid=321, hostname="gone"
    )
    sim.state.add_guest("lxc", 320, "pve", "made")  # same hostname, but not marked as ours
    sim.state.guests[320].config["description"] = "ctrlable-instance: 9999\n"
    await runs.stop()

    second = await runs.start()
    assert (await wait_for(second, iid, state_is("failed")))["state"] == "failed"
    assert (await wait_for(second, removing, state_is("removed")))["state"] == "removed"
    assert 320 in sim.state.guests
