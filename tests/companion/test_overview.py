"""`GET /api/v1/overview` against the simulator: one answer with host, guests, releases and
problems; templates tagged by the build wrapper are adopted, so the release becomes active."""

from __future__ import annotations

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
