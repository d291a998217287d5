"""``GET /api/v1/overview``: everything Home Assistant polls, in one answer."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import __version__
from ..proxmox import ProxmoxError, placeholder_name
from ..services import Services, services_of
from ..web import Api, json_response

RECENT_BUILDS = 5


async def _inventory(
    services: Services,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Nodes and guests from PVE; on failure empty lists and the reason."""
    try:
        nodes, guests = await asyncio.gather(services.pve.nodes(), services.pve.guests())
    except ProxmoxError as err:
        return [], [], str(err)
    await services.releases.adopt([g.resource() for g in guests])
    return [n.as_dict() for n in nodes], [g.as_dict() for g in guests], None


async def overview(services: Services) -> dict[str, Any]:
    last_event_id = await services.events.last_id()
    nodes, guests, pve_error = await _inventory(services)
    instances, projects, releases, builds = await asyncio.gather(
        services.deploy.list_instances(),
        services.deploy.list_projects(),
        services.releases.describe(),
        services.build.recent(RECENT_BUILDS),
    )
    live = {i["vmid"]: i for i in instances if i["vmid"] is not None and i["state"] != "removed"}
    for guest in guests:
        instance = live.get(guest["vmid"])
        guest["instance_id"] = None if instance is None else instance["id"]
        if instance is not None and guest["name"] == placeholder_name(guest["type"], guest["vmid"]):
            # A fresh clone PVE has not named yet (proxmox-api.md §3): it is called what the
            # clone asked for, so HA does not name its device CT<vmid> for good.
            guest["name"] = instance["hostname"]
    problems: list[dict[str, Any]] = list(services.pve.problems())
    if pve_error is not None:
        problems.append({"code": "pve_unreachable", "message": pve_error})
    settings = services.settings
    return {
        "companion": {
            "version": __version__,
            "site_id": settings.site_id,
            "name": settings.site_name,
        },
        "nodes": nodes,
        "guests": guests,
        "projects": projects,
        "instances": instances,
        "releases": releases,
        "builds": builds,
        "platform": await services.platform.status(),
        "problems": problems,
        "last_event_id": last_event_id,
    }


def register(api: Api) -> None:
    @api.route(
        "GET", "/api/v1/overview", summary="Host, guests, instances, releases, builds, platform"
    )
    async def get_overview(request: web.Request) -> web.Response:
        return json_response(await overview(services_of(request)))
