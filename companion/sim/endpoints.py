"""The PVE API operations the simulator implements: the single list both the schema subset and the
handler registry are built from (a test checks they agree)."""

from __future__ import annotations

from typing import Final

_GUEST_OPS: Final = (
    ("GET", ""),
    ("GET", "/{vmid}"),
    ("DELETE", "/{vmid}"),
    ("GET", "/{vmid}/config"),
    ("PUT", "/{vmid}/config"),
    ("POST", "/{vmid}/clone"),
    ("GET", "/{vmid}/status/current"),
    ("POST", "/{vmid}/status/start"),
    ("POST", "/{vmid}/status/stop"),
    ("POST", "/{vmid}/status/shutdown"),
    ("POST", "/{vmid}/status/reboot"),
    ("POST", "/{vmid}/template"),
)

IMPLEMENTED: Final[tuple[tuple[str, str], ...]] = (
    ("GET", "/version"),
    ("GET", "/nodes"),
    ("GET", "/nodes/{node}/status"),
    ("GET", "/nodes/{node}/storage"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    ("GET", "/nodes/{node}/tasks/{upid}/log"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    ("GET", "/access/permissions"),
    *((m, f"/nodes/{{node}}/qemu{p}") for m, p in _GUEST_OPS),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces"),
    *((m, f"/nodes/{{node}}/lxc{p}") for m, p in _GUEST_OPS),
    ("GET", "/nodes/{node}/lxc/{vmid}/interfaces"),
)
