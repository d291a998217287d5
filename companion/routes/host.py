"""Host health, guest inventory and guest power actions, straight from the Proxmox boundary.

PVE errors escape as ``ProxmoxError`` (an ``ApiError``), so the error middleware answers them as
JSON with their own status and code (docs/proxmox.md, "Error mapping").
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from ..errors import Conflict, InvalidRequest, NotFound
from ..proxmox import POWER_ACTIONS, PowerAction
from ..services import Services, services_of
from ..web import Api, int_param, json_response


class StorageOut(BaseModel):
    storage: str
    type: str
    total: int
    used: int
    avail: int


class NodeOut(BaseModel):
    node: str
    status: str
    cpu: float
    maxcpu: int
    mem: int
    maxmem: int
    uptime: int
    storages: list[StorageOut]


class HostOut(BaseModel):
    nodes: list[NodeOut]


class GuestOut(BaseModel):
    vmid: int
    node: str
    type: Literal["lxc", "qemu"]
    name: str
    status: str
    template: bool
    cpu: float
    maxcpu: int
    mem: int
    maxmem: int
    uptime: int
    instance_id: int | None


class GuestsOut(BaseModel):
    guests: list[GuestOut]


class PowerOut(BaseModel):
    vmid: int
    action: Literal["start", "stop", "shutdown", "reboot"]
    status: str


async def instance_ids(services: Services) -> dict[int, int]:
    """vmid -> id of the live instance that owns the guest."""
    rows = await services.db.fetchall(
        "SELECT id, vmid FROM instances WHERE vmid IS NOT NULL AND state != 'removed'"
    )
    return {int(row["vmid"]): int(row["id"]) for row in rows}


async def guests_payload(services: Services) -> list[dict[str, Any]]:
    guests = await services.pve.guests()
    owners = await instance_ids(services)
    return [g.as_dict(owners.get(g.vmid)) for g in guests]


def _action(request: web.Request) -> PowerAction:
    raw = request.match_info["action"]
    for action in POWER_ACTIONS:
        if raw == action:
            return action
    raise InvalidRequest.field("action", f"must be one of {', '.join(POWER_ACTIONS)}, got {raw!r}")


def register(api: Api) -> None:
    @api.route(
        "GET",
        "/api/v1/host",
        summary="Health of every PVE node (CPU, memory, uptime, storages)",
        response=HostOut,
        tag="host",
    )
    async def host(request: web.Request) -> web.Response:
        nodes = await services_of(request).pve.nodes()
        return json_response({"nodes": [n.as_dict() for n in nodes]})

    @api.route(
        "GET",
        "/api/v1/guests",
        summary="Every guest of the cluster (one /cluster/resources call)",
        response=GuestsOut,
        tag="host",
    )
    async def guests(request: web.Request) -> web.Response:
        return json_response({"guests": await guests_payload(services_of(request))})

    @api.route(
        "POST",
        "/api/v1/guests/{vmid}/{action}",
        summary="start, stop, shutdown or reboot a guest and wait for PVE's task",
        response=PowerOut,
        tag="host",
    )
    async def power(request: web.Request) -> web.Response:
        vmid = int_param(request, "vmid")
        if not 100 <= vmid <= 999_999_999:
            raise InvalidRequest.field("vmid", f"must be between 100 and 999999999, got {vmid}")
        action = _action(request)
        pve = services_of(request).pve
        guest = await pve.find_guest(vmid)
        if guest is None:
            raise NotFound(f"no guest {vmid} on this Proxmox host", code="guest_not_found")
        if guest.template:
            raise Conflict(
                f"guest {vmid} is a template; power actions do not apply",
                code="guest_is_template",
            )
        status = await pve.power(guest.type, guest.node, vmid, action)
        return json_response(PowerOut(vmid=vmid, action=action, status=status))
