"""`GET /api/v1/overview` against the simulator: one answer with host, guests, releases and
problems; templates tagged by the build wrapper are adopted, so the release becomes active."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from companion.sim import SimConfig, run_simulator, templates_from_release

from .conftest import REPO, make_settings


async def test_overview_adopts_host_templates_and_reports_inventory(
    tmp_path: Path, companion_factory: Callable[..., Any]
) -> None:
    templates = templates_from_release(REPO / "releases" / "2026.06.yaml")
    async with run_simulator(SimConfig(task_seconds=0.05), templates=templates) as sim:
        settings = make_settings(
            tmp_path,
            pve_url=sim.base_url,
            pve_token_id=sim.token_id,
            pve_token_secret=sim.token_secret,
            pve_ca_file=sim.ca_file,
        )
        companion = await companion_factory(settings)
        status, body = await companion.request("GET", "/api/v1/overview")
        assert status == 200, body
        assert body["releases"]["active"] == "2026.06"
        recorded = {
            t["name"]: t["template_vmid"] for t in body["releases"]["releases"][0]["templates"]
        }
        assert recorded == {t.name: t.vmid for t in templates}
        assert [n["node"] for n in body["nodes"]] == ["pve"]
        assert {g["vmid"] for g in body["guests"]} == {t.vmid for t in templates}
        assert all(g["template"] and g["instance_id"] is None for g in body["guests"])
        assert body["instances"] == []
        assert body["problems"] == []
        assert body["companion"]["site_id"] == settings.site_id
        assert set(body["platform"]) >= {"last_success", "outbox_depth", "unreachable_since"}
        assert body["last_event_id"] >= 1  # release.active was published


async def test_overview_reports_an_unreachable_pve_instead_of_failing(
    tmp_path: Path, companion_factory: Callable[..., Any]
) -> None:
    settings = make_settings(
        tmp_path, pve_url="https://127.0.0.1:9", pve_token_secret="x", pve_timeout=1.0
    )
    companion = await companion_factory(settings)
    status, body = await companion.request("GET", "/api/v1/overview")
    assert status == 200
    assert body["nodes"] == []
    assert body["guests"] == []
    assert [p["code"] for p in body["problems"]] == ["pve_unreachable"]
    assert body["releases"]["latest"] == "2026.06"


async def test_a_fresh_clone_is_shown_with_its_instance_hostname(
    tmp_path: Path, companion_factory: Callable[..., Any]
) -> None:
    """PVE lists a fresh clone as CT<vmid>, status unknown, for a while (§3); HA names a
    guest's device after the first name it sees, so the overview gives the hostname."""
    templates = templates_from_release(REPO / "releases" / "2026.06.yaml")
    config = SimConfig(task_seconds=0.05, resources_lag=30.0)
    async with run_simulator(config, templates=templates) as sim:
        settings = make_settings(
            tmp_path,
            pve_url=sim.base_url,
            pve_token_id=sim.token_id,
            pve_token_secret=sim.token_secret,
            pve_ca_file=sim.ca_file,
            firstboot_timeout=30.0,
        )
        companion = await companion_factory(settings)
        status, body = await companion.request(
            "POST",
            "/api/v1/instances",
            json={"project": "smith", "type": "zwavejs", "hostname": "zw-kitchen"},
        )
        assert status == 202, body
        for _ in range(200):
            status, overview = await companion.request("GET", "/api/v1/overview")
            fresh = [g for g in overview["guests"] if not g["template"]]
            if fresh and fresh[0]["instance_id"] is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no clone in the overview: {overview['guests']}")
        (guest,) = fresh
        assert guest["status"] == "unknown"  # PVE has not reported on it yet
        assert guest["name"] == "zw-kitchen"
        assert guest["instance_id"] == body["id"]
        # PVE's own answer still has the placeholder (the companion fills the name in)
        resources = [g for g in await companion.services.pve.guests() if not g.template]
        assert resources[0].name == f"CT{guest['vmid']}"
