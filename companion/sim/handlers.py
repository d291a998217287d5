"""PVE API behaviour, one handler per implemented operation (see :mod:`companion.sim.endpoints`).

Each handler gets the typed, validated parameters (path placeholders included) after the
operation-level permission check; it raises :class:`~companion.sim.core.PveError` for PVE's
synchronous errors and starts :mod:`~companion.sim.tasks` workers for UPID calls. The error texts
and the sync-vs-task split follow proxmox-api.md §1-§7.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from companion.sim.core import PveError, SimCore, die, param_error
from companion.sim.model import (
    NET_RE,
    Guest,
    Kind,
    disk_keys,
    disk_volume,
    net_mac,
    normalize_net,
    now_mono,
    parse_kv,
    parse_qemu_net,
    random_mac,
    replace_volume,
    volume_storage,
    with_mac,
)
from companion.sim.model import (
    config_digest as digest_of,
)
from companion.sim.perms import PermissionDenied, Token
from companion.sim.schema import property_schema
from companion.sim.tasks import UPID_RE, TaskContext, TaskError


@dataclass
class Call:
    """One authenticated, validated API call."""

    core: SimCore
    token: Token
    params: dict[str, Any]
    template: str

    @property
    def user(self) -> str:
        return self.token.full_id

    def p(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)


@dataclass(frozen=True)
class WithTotal:
    """A result that PVE wraps as ``{"data": ..., "total": n}``."""

    data: Any
    total: int


Handler = Callable[[Call], Awaitable[Any]]
HANDLERS: dict[tuple[str, str], Handler] = {}


def route(method: str, *templates: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for template in templates:
            HANDLERS[(method, template)] = fn
        return fn

    return register


def both(suffix: str) -> tuple[str, str]:
    return (f"/nodes/{{node}}/qemu{suffix}", f"/nodes/{{node}}/lxc{suffix}")


def kind_of(call: Call) -> Kind:
    return "qemu" if "/qemu" in call.template else "lxc"


def load_guest(call: Call) -> Guest:
    """PVE's ``load_config``: a missing guest is a 500, never a 404."""
    kind = kind_of(call)
    node, vmid = call.p("node"), int(call.p("vmid"))
    guest = call.core.state.guest_on(node, kind, vmid)
    if guest is None:
        sub = "qemu-server" if kind == "qemu" else "lxc"
        msg = f"Configuration file 'nodes/{node}/{sub}/{vmid}.conf' does not exist"
        raise die(msg)
    return guest


def check_lock(guest: Guest) -> None:
    if guest.lock:
        raise die(f"{guest.word} is locked ({guest.lock})")


def flock_timeout_msg(guest: Guest) -> str:
    return f"can't lock file '{guest.flock_path()}' - got timeout"


@contextlib.asynccontextmanager
async def flocked(
    core: SimCore, guest: Guest, *, exclusive: bool = True, timeout: float | None = None
) -> AsyncIterator[None]:
    """Hold the guest's config flock; a timeout raises PVE's ``can't lock file`` 500."""
    wait = core.config.flock_timeout if timeout is None else timeout
    if not await core.state.flocks.acquire(guest.vmid, exclusive=exclusive, timeout=wait):
        raise die(flock_timeout_msg(guest))
    try:
        yield
    finally:
        await core.state.flocks.release(guest.vmid, exclusive=exclusive)


@contextlib.asynccontextmanager
async def task_flock(
    core: SimCore, guest: Guest, *, exclusive: bool = True, timeout: float | None = None
) -> AsyncIterator[None]:
    """As :func:`flocked`, inside a worker: a timeout fails the task."""
    try:
        async with flocked(core, guest, exclusive=exclusive, timeout=timeout):
            yield
    except PveError as exc:
        raise TaskError(exc.message) from None


def reload_guest(core: SimCore, guest: Guest) -> Guest:
    """A worker's ``load_config``: the guest may have gone meanwhile."""
    current = core.state.guests.get(guest.vmid)
    if current is None or current is not guest:
        msg = f"Configuration file '{guest.conf_path()}' does not exist"
        raise TaskError(msg)
    return current


def root_only(call: Call, *names: str) -> None:
    for name in names:
        if call.p(name) is not None:
            raise param_error({name: "Only root may use this option."})


def typed_config(call: Call, guest: Guest) -> dict[str, Any]:
    """Config values typed as PVE's parser leaves them (ints for integer/boolean keys)."""
    kind = guest.kind
    op = call.core.schema.operations.get((f"/nodes/{{node}}/{kind}/{{vmid}}/config", "PUT"))
    props = op.properties if op else {}
    out: dict[str, Any] = {}
    for key, value in guest.config.items():
        prop = property_schema(props, key)
        typ = prop.get("type") if prop else None
        if typ in ("integer", "boolean") and re.fullmatch(r"-?\d+", value):
            out[key] = int(value)
        elif typ == "number" and re.fullmatch(r"-?\d+(\.\d+)?", value):
            out[key] = float(value) if "." in value else int(value)
        else:
            out[key] = value
    return out


def agent_ip(core: SimCore, guest: Guest) -> str:
    if guest.agent_ip:
        return guest.agent_ip
    if core.config.agent_ip:
        return core.config.agent_ip
    v = guest.vmid
    return f"10.{(v >> 16) & 0xFF}.{(v >> 8) & 0xFF}.{v & 0xFF}"


# ---------------------------------------------------------------------------------------------
# Cluster, nodes, storage


@route("GET", "/version")
async def version(call: Call) -> Any:
    ver = call.core.config.version
    return {
        "version": ver,
        "release": ".".join(ver.split(".")[:2]),
        "repoid": call.core.config.repoid,
    }


def _node_entry(call: Call, name: str) -> dict[str, Any]:
    node = call.core.state.nodes[name]
    entry: dict[str, Any] = {
        "node": name,
        "id": f"node/{name}",
        "type": "node",
        "status": "online" if node.online else "offline",
        "level": "",
    }
    if node.online and call.token.has(f"/nodes/{name}", "Sys.Audit"):
        stats = call.core.state.node_stats(node)
        stats.pop("loadavg")
        entry.update(stats)
    return entry


@route("GET", "/nodes")
async def nodes(call: Call) -> Any:
    out = []
    for name in sorted(call.core.state.nodes):
        entry = _node_entry(call, name)
        entry["ssl_fingerprint"] = call.core.fingerprint
        out.append(entry)
    return out


@route("GET", "/nodes/{node}/status")
async def node_status(call: Call) -> Any:
    core = call.core
    node = core.state.nodes[call.p("node")]
    stats = core.state.node_stats(node)
    kernel = "6.8.12-4-pve"
    kversion = "#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-4 (2024-11-06T15:04Z)"
    swap_total = 8 * 1024**3
    swap_used = 0 if stats["mem"] < node.maxmem * 0.8 else 512 * 1024**2
    return {
        "uptime": stats["uptime"],
        "idle": 0,
        "kversion": f"Linux {kernel} {kversion}",
        "loadavg": stats["loadavg"],
        "current-kernel": {
            "sysname": "Linux",
            "release": kernel,
            "version": kversion,
            "machine": "x86_64",
        },
        "boot-info": {"mode": "efi", "secureboot": 0},
        "cpuinfo": {
            "model": node.cpu_model,
            "sockets": 1,
            "cores": max(node.maxcpu // 2, 1),
            "cpus": node.maxcpu,
            "mhz": "2304.000",
            "hvm": "1",
            "flags": "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr vmx sse4_2 avx2 aes",
            "user_hz": 100,
        },
        "cpu": stats["cpu"],
        "wait": round(stats["cpu"] / 20, 6),
        "memory": {
            "total": node.maxmem,
            "used": stats["mem"],
            "free": node.maxmem - stats["mem"],
        },
        "swap": {"total": swap_total, "used": swap_used, "free": swap_total - swap_used},
        "ksm": {"shared": 0},
        "rootfs": {
            "total": stats["maxdisk"],
            "used": stats["disk"],
            "avail": stats["maxdisk"] - stats["disk"],
            "free": stats["maxdisk"] - stats["disk"],
        },
        "pveversion": f"pve-manager/{core.config.version}/{core.config.repoid}",
    }


@route("GET", "/nodes/{node}/storage")
async def node_storage(call: Call) -> Any:
    node = call.p("node")
    content = call.p("content")
    wanted = set(re.split(r"[,;\s]+", content)) if content else set()
    out = []
    for name in sorted(call.core.state.storages):
        st = call.core.state.storages[name]
        if not st.on(node):
            continue
        if call.p("storage") and call.p("storage") != name:
            continue
        if call.p("enabled") and not st.enabled:
            continue
        if wanted and not wanted & set(st.content):
            continue
        path = f"/storage/{name}"
        if not (
            call.token.has(path, "Datastore.Audit")
            or call.token.has(path, "Datastore.AllocateSpace")
        ):
            continue
        out.append(
            {
                "storage": name,
                "type": st.type,
                "content": ",".join(sorted(st.content)),
                "active": 1,
                "enabled": int(st.enabled),
                "shared": int(st.shared),
                "total": st.total,
                "used": st.used,
                "avail": st.total - st.used,
                "used_fraction": round(st.used / st.total, 6) if st.total else 0,
            }
        )
    return out


def _vm_resource(call: Call, guest: Guest) -> dict[str, Any]:
    core = call.core
    entry: dict[str, Any] = {
        "id": f"{guest.kind}/{guest.vmid}",
        "vmid": guest.vmid,
        "node": guest.node,
        "type": guest.kind,
    }
    age = now_mono() - guest.created_at
    if age < core.config.resources_lag:
        # pvestatd has not written an RRD entry yet: no status, no name, no template.
        entry["status"] = "unknown"
    else:
        status = guest.status
        if now_mono() - guest.status_changed_at < core.config.resources_status_lag:
            status = guest.prev_status
        entry.update({"status": status, "name": guest.name, "template": int(guest.template)})
        entry.update(guest.stats())
        if guest.pool:
            entry["pool"] = guest.pool
        if guest.config.get("tags"):
            entry["tags"] = guest.config["tags"]
        if guest.ha_managed:
            entry["hastate"] = "started" if guest.running else "stopped"
    if guest.lock:
        entry["lock"] = guest.lock
    return entry


@route("GET", "/cluster/resources")
async def cluster_resources(call: Call) -> Any:
    core = call.core
    want = call.p("type")
    out: list[dict[str, Any]] = []
    if want in (None, "vm"):
        for vmid in sorted(core.state.guests):
            if call.token.has(f"/vms/{vmid}", "VM.Audit"):
                out.append(_vm_resource(call, core.state.guests[vmid]))
    if want in (None, "node"):
        for name in sorted(core.state.nodes):
            entry = _node_entry(call, name)
            entry["cgroup-mode"] = 2
            out.append(entry)
    if want in (None, "storage"):
        for name in sorted(core.state.storages):
            st = core.state.storages[name]
            if not call.token.has(f"/storage/{name}", "Datastore.Audit"):
                continue
            for node in sorted(core.state.nodes):
                if not st.on(node):
                    continue
                out.append(
                    {
                        "id": f"storage/{node}/{name}",
                        "storage": name,
                        "node": node,
                        "type": "storage",
                        "status": "available",
                        "plugintype": st.type,
                        "content": ",".join(sorted(st.content)),
                        "shared": int(st.shared),
                        "disk": st.used,
                        "maxdisk": st.total,
                    }
                )
    if want in (None, "sdn"):
        for node in sorted(core.state.nodes):
            out.append(
                {
                    "id": f"sdn/{node}/localnetwork",
                    "sdn": "localnetwork",
                    "node": node,
                    "type": "sdn",
                    "status": "ok",
                }
            )
    return out


@route("GET", "/cluster/nextid")
async def nextid(call: Call) -> Any:
    state = call.core.state
    vmid = call.p("vmid")
    if vmid is not None:
        if state.vmid_taken(vmid):
            raise param_error({"vmid": f"VM {vmid} already exists"})
        return str(vmid)
    # PVE returns the number as a JSON string (the schema says integer).
    return str(state.next_free_vmid())


@route("GET", "/access/permissions")
async def access_permissions(call: Call) -> Any:
    token = call.token
    userid = call.p("userid")
    if userid not in (None, token.full_id, token.userid) and not token.has("/access", "Sys.Audit"):
        raise PveError(403, PermissionDenied("/access, Sys.Audit").message)
    target = call.core.tokens.get(userid, token) if userid else token
    paths = [call.p("path")] if call.p("path") else sorted({a.path for a in target.acls})
    return {path: dict.fromkeys(sorted(target.privileges(path)), 1) for path in paths}


# ---------------------------------------------------------------------------------------------
# Tasks


def _find_task(call: Call) -> Any:
    upid = call.p("upid")
    m = UPID_RE.match(upid)
    if not m:
        raise param_error({"upid": "unable to parse worker upid"})
    task = call.core.tasks.tasks.get(upid)
    if task is None or task.node != call.p("node"):
        raise param_error({"upid": "no such task"})
    if task.user != call.user:
        call.token.check(f"/nodes/{task.node}", ["Sys.Audit"])
    return task


@route("GET", "/nodes/{node}/tasks/{upid}/status")
async def task_status(call: Call) -> Any:
    return _find_task(call).status_dict()


@route("GET", "/nodes/{node}/tasks/{upid}/log")
async def task_log(call: Call) -> Any:
    task = _find_task(call)
    lines = task.log or ["no content"]
    start = int(call.p("start", 0))
    limit = int(call.p("limit", 50))
    chosen = lines[start : start + limit] if limit else lines[start:]
    data = [{"n": start + i + 1, "t": text} for i, text in enumerate(chosen)]
    return WithTotal(data, len(lines))


# ---------------------------------------------------------------------------------------------
# Guest lists and status


def _list_item(core: SimCore, guest: Guest) -> dict[str, Any]:
    stats = guest.stats()
    item: dict[str, Any] = {
        "vmid": guest.vmid,
        "status": guest.status,
        "name": guest.name,
        "cpus": guest.cpus,
        "maxmem": stats["maxmem"],
        "maxdisk": stats["maxdisk"],
        "mem": stats["mem"],
        "cpu": stats["cpu"],
        "uptime": stats["uptime"],
        "netin": stats["netin"],
        "netout": stats["netout"],
        "diskread": stats["diskread"],
        "diskwrite": stats["diskwrite"],
        "disk": stats["disk"],
    }
    if guest.kind == "lxc":
        item["type"] = "lxc"
        item["maxswap"] = guest.maxswap
        item["swap"] = 0
    elif guest.running:
        item["qmpstatus"] = "running"
    if guest.pid is not None:
        item["pid"] = guest.pid
    if guest.template:
        item["template"] = 1
    if guest.lock:
        item["lock"] = guest.lock
    if guest.config.get("tags"):
        item["tags"] = guest.config["tags"]
    return item


@route("GET", *both(""))
async def guest_list(call: Call) -> Any:
    kind = kind_of(call)
    return [
        _list_item(call.core, g)
        for g in call.core.state.guests_on(call.p("node"), kind)
        if call.token.has(f"/vms/{g.vmid}", "VM.Audit")
    ]


@route("GET", *both("/{vmid}"))
async def guest_index(call: Call) -> Any:
    load_guest(call)
    if kind_of(call) == "qemu":
        subdirs = ["config", "pending", "status", "unlink", "vncproxy", "termproxy", "migrate",
                   "resize", "move", "rrd", "rrddata", "monitor", "agent", "snapshot", "spiceproxy",
                   "sendkey", "firewall"]  # fmt: skip
    else:
        subdirs = ["config", "pending", "status", "vncproxy", "termproxy", "vncwebsocket",
                   "spiceproxy", "migrate", "clone", "rrd", "rrddata", "firewall", "snapshot",
                   "resize", "interfaces"]  # fmt: skip
    return [{"subdir": s} for s in subdirs]


@route("GET", *both("/{vmid}/status/current"))
async def status_current(call: Call) -> Any:
    guest = load_guest(call)  # takes no lock: works mid-clone and shows the lock
    item = _list_item(call.core, guest)
    item["ha"] = {"managed": int(guest.ha_managed)}
    if guest.ha_managed:
        item["ha"]["state"] = "started" if guest.running else "stopped"
    if guest.kind == "qemu":
        item["qmpstatus"] = "running" if guest.running else "stopped"
        item["agent"] = 1 if _agent_enabled(guest) else 0
        if guest.running:
            item["running-qemu"] = "9.0.2"
            item["running-machine"] = "pc-i440fx-9.0+pve0"
    return item


# ---------------------------------------------------------------------------------------------
# Config

_CONFIG_META = frozenset(
    {"node", "vmid", "digest", "delete", "revert", "background_delay", "skiplock", "force"}
)

_QEMU_KEY_PRIVS: dict[str, str] = {
    "cores": "VM.Config.CPU",
    "sockets": "VM.Config.CPU",
    "cpu": "VM.Config.CPU",
    "cpulimit": "VM.Config.CPU",
    "cpuunits": "VM.Config.CPU",
    "vcpus": "VM.Config.CPU",
    "affinity": "VM.Config.CPU",
    "numa": "VM.Config.CPU",
    "memory": "VM.Config.Memory",
    "balloon": "VM.Config.Memory",
    "shares": "VM.Config.Memory",
    "hugepages": "VM.Config.Memory",
    "ciuser": "VM.Config.Cloudinit",
    "cipassword": "VM.Config.Cloudinit",
    "sshkeys": "VM.Config.Cloudinit",
    "nameserver": "VM.Config.Cloudinit",
    "searchdomain": "VM.Config.Cloudinit",
    "citype": "VM.Config.Cloudinit",
    "cicustom": "VM.Config.Cloudinit",
    "ciupgrade": "VM.Config.Cloudinit",
    "bios": "VM.Config.HWType",
    "machine": "VM.Config.HWType",
    "scsihw": "VM.Config.HWType",
    "vga": "VM.Config.HWType",
    "ostype": "VM.Config.HWType",
    "kvm": "VM.Config.HWType",
    "acpi": "VM.Config.HWType",
    "tablet": "VM.Config.HWType",
}
_LXC_KEY_PRIVS: dict[str, str] = {
    "cores": "VM.Config.CPU",
    "cpulimit": "VM.Config.CPU",
    "cpuunits": "VM.Config.CPU",
    "memory": "VM.Config.Memory",
    "swap": "VM.Config.Memory",
    "hostname": "VM.Config.Network",
    "nameserver": "VM.Config.Network",
    "searchdomain": "VM.Config.Network",
    "rootfs": "VM.Config.Disk",
}


def key_privilege(kind: Kind, key: str) -> str:
    """The privilege PVE checks for changing one config key (proxmox-api.md §5)."""
    if NET_RE.match(key):
        return "VM.Config.Network"
    if kind == "qemu":
        if re.match(r"^(scsi|virtio|sata|ide|efidisk|tpmstate|unused)\d+$", key):
            return "VM.Config.Disk"
        if re.match(r"^ipconfig\d+$", key):
            return "VM.Config.Cloudinit"
        if re.match(r"^(hostpci|usb|serial|parallel|audio|rng)\d*$", key):
            return "VM.Config.HWType"
        return _QEMU_KEY_PRIVS.get(key, "VM.Config.Options")
    if re.match(r"^(mp|unused)\d+$", key):
        return "VM.Config.Disk"
    return _LXC_KEY_PRIVS.get(key, "VM.Config.Options")


def _bridge_checks(call: Call, value: str, kind: Kind) -> None:
    net = parse_qemu_net(value) if kind == "qemu" else parse_kv(value)
    bridge = net.get("bridge")
    if bridge:
        call.token.check(f"/sdn/zones/localnetwork/{bridge}", ["SDN.Use"])
        if net.get("tag"):
            call.token.check(f"/sdn/zones/localnetwork/{bridge}/{net['tag']}", ["SDN.Use"])


@route("GET", *both("/{vmid}/config"))
async def config_get(call: Call) -> Any:
    guest = load_guest(call)
    if call.p("snapshot"):
        raise die(f"snapshot '{call.p('snapshot')}' does not exist")
    out = typed_config(call, guest)
    out["digest"] = digest_of(guest.config)
    return out


async def _update_config(call: Call) -> Guest:
    """The synchronous part of PUT/POST config: permissions, flock, lock, digest, apply."""
    core = call.core
    kind = kind_of(call)
    guest = load_guest(call)
    root_only(call, "skiplock")
    changes = {k: v for k, v in call.params.items() if k not in _CONFIG_META}
    delete = [k for k in re.split(r"[,;\s]+", call.p("delete") or "") if k]
    revert = [k for k in re.split(r"[,;\s]+", call.p("revert") or "") if k]
    if not changes and not delete and not revert:
        raise die("no options specified")
    for key in [*changes, *delete, *revert]:
        call.token.check(f"/vms/{guest.vmid}", [key_privilege(kind, key)])
    for key, value in changes.items():
        if NET_RE.match(key):
            _bridge_checks(call, str(value), kind)
    for key in delete:
        if key in changes:
            raise param_error(
                {"delete": f"cannot set and delete property '{key}' at the same time"}
            )
    async with flocked(core, guest):
        guest = load_guest(call)
        check_lock(guest)
        digest = call.p("digest")
        if digest and digest != digest_of(guest.config):
            raise die("detected modified configuration - file changed by other user? Try again.")
        for key in delete:
            guest.config.pop(key, None)
        for key, value in changes.items():
            text = str(value)
            if NET_RE.match(key):
                text = normalize_net(kind, text, core.rng)
            guest.config[key] = text
    return guest


@route("PUT", *both("/{vmid}/config"))
async def config_put(call: Call) -> Any:
    await _update_config(call)
    return None


@route("POST", "/nodes/{node}/qemu/{vmid}/config")
async def config_post(call: Call) -> Any:
    guest = await _update_config(call)

    async def body(ctx: TaskContext) -> None:
        ctx.log(f"update VM {guest.vmid}: applying pending changes")
        await ctx.work()
        ctx.raise_injected()

    task = call.core.tasks.start(guest.node, "qmconfig", str(guest.vmid), call.user, body)
    delay = call.p("background_delay")
    if delay:
        try:
            await asyncio.wait_for(asyncio.shield(task.done.wait()), delay)
        except TimeoutError:
            return task.upid
        if task.exitstatus == "OK" or (task.exitstatus or "").startswith("WARNINGS"):
            return None
        raise die(task.exitstatus or "unexpected status")
    return task.upid


# ---------------------------------------------------------------------------------------------
# Clone


def _clone_target_node(call: Call) -> str | None:
    target = call.p("target")
    if target in (None, call.p("node"), "localhost"):
        return None
    if target not in call.core.state.nodes:
        raise die(f"no such cluster node '{target}'")
    return str(target)


def _check_clone_storage(call: Call, target: str | None) -> None:
    storage = call.p("storage")
    if storage is None:
        return
    st = call.core.state.storages.get(storage)
    if st is None or not st.on(call.p("node")):
        raise die(f"storage '{storage}' does not exist")
    if not st.enabled:
        raise die(f"storage '{storage}' is disabled")
    if target is not None:
        if not st.on(target):
            raise die(f"storage '{storage}' is not available on node '{target}'")
        if not st.shared:
            raise die(f"can't clone to non-shared storage '{storage}'")


def _clone_volumes(call: Call, guest: Guest, full: bool, running: bool) -> tuple[list[str], bool]:
    """Check each volume like PVE (storage rights, content, clone feature).

    Returns (disk keys, all volumes on shared storage)."""
    storages = call.core.state.storages
    override = call.p("storage")
    keys = disk_keys(guest.kind, guest.config)
    shared = True
    for key in keys:
        volume = disk_volume(guest.config[key])
        sid = override or volume_storage(volume)
        st = storages.get(sid)
        if st is None:
            raise die(f"storage '{sid}' does not exist")
        if not st.shared:
            shared = False
        call.token.check(f"/storage/{sid}", ["Datastore.AllocateSpace"])
        if guest.kind == "qemu":
            if "images" not in st.content:
                raise param_error({"storage": f"storage '{sid}' does not support vm images"})
            if not full and not (":base-" in volume and st.supports_linked_clone()):
                raise die(f"Linked clone feature is not supported for '{volume}' ({key})")
        else:
            if "rootdir" not in st.content:
                raise param_error(
                    {"storage": f"storage '{sid}' does not support container directories"}
                )
            if full and running:
                raise die("Cannot do full clones on a running container without snapshots")
            if not full and not (":base-" in volume and st.supports_linked_clone()):
                raise die(f"Linked clone feature for '{volume}' is not available")
    return keys, shared


def _clone_volume_name(volume: str, newid: int, index: int, full: bool, storage: str | None) -> str:
    sid, _, name = volume.partition(":")
    if full:
        return f"{storage or sid}:vm-{newid}-disk-{index}"
    base = name.split("/")[0]
    return f"{sid}:{base}/vm-{newid}-disk-{index}"


def _new_net_config(guest: Guest, call: Call) -> dict[str, str]:
    """Copy the source config, every ``netX`` with a fresh prefixed MAC (§4)."""
    conf: dict[str, str] = {}
    for key, value in guest.config.items():
        if key in ("template", "lock") or key.startswith("unused"):
            continue
        if NET_RE.match(key):
            conf[key] = with_mac(guest.kind, value, random_mac(call.core.rng))
        else:
            conf[key] = value
    return conf


@route("POST", "/nodes/{node}/qemu/{vmid}/clone")
async def qemu_clone(call: Call) -> Any:
    core = call.core
    source = load_guest(call)
    newid = int(call.p("newid"))
    pool = call.p("pool")
    if pool is not None and pool not in core.state.pools:
        raise PveError(403, PermissionDenied(f"pool '{pool}' does not exist").message)
    target = _clone_target_node(call)
    _check_clone_storage(call, target)
    check_lock(source)
    if call.p("snapname"):
        raise die(f"snapshot '{call.p('snapname')}' does not exist")
    full = bool(call.p("full")) if call.p("full") is not None else not source.template
    if call.p("storage") is not None and not full:
        raise die("parameter 'storage' not allowed for linked clones")
    if call.p("format") is not None and not full:
        raise die("parameter 'format' not allowed for linked clones")
    running = source.running
    keys, shared = _clone_volumes(call, source, full, running)
    if target is not None and not shared:
        raise die(f"can't clone VM to node '{target}' (VM uses local storage)")
    if core.state.vmid_taken(newid):
        raise die(f"unable to create VM {newid}: config file already exists")
    for key, value in source.config.items():
        if NET_RE.match(key):
            _bridge_checks(call, value, "qemu")
    core.state.reserved.add(newid)
    name = call.p("name") or f"Copy-of-VM-{source.config.get('name') or source.vmid}"
    description = call.p("description")
    storage = call.p("storage")

    async def body(ctx: TaskContext) -> None:
        state = core.state
        try:
            async with task_flock(
                core, source, exclusive=running, timeout=core.config.clone_flock_timeout
            ):
                target_stub = Guest(newid, "qemu", source.node, {})
                async with task_flock(
                    core, target_stub, exclusive=True, timeout=core.config.clone_flock_timeout
                ):
                    await _qemu_clone_work(ctx, target_stub)
        finally:
            state.reserved.discard(newid)

    async def _qemu_clone_work(ctx: TaskContext, stub: Guest) -> None:
        state = core.state
        src = reload_guest(core, source)
        conf = _new_net_config(src, call)
        for key in keys:
            conf.pop(key, None)
        conf["name"] = name
        if description:
            conf["description"] = description
        smbios = parse_kv(conf.get("smbios1", ""))
        smbios["uuid"] = _uuid(core)
        conf["smbios1"] = ",".join(f"{k}={v}" for k, v in smbios.items())
        if "vmgenid" in conf:
            conf["vmgenid"] = _uuid(core)
        conf["lock"] = "clone"
        state.reserved.discard(newid)
        new = Guest(newid, "qemu", src.node, conf, created_at=now_mono())
        state.guests[newid] = new
        try:
            for index, key in enumerate(keys):
                volume = disk_volume(src.config[key])
                verb = "full" if full else "linked"
                ctx.log(f"create {verb} clone of drive {key} ({volume})")
                new_volume = _clone_volume_name(volume, newid, index, full, storage)
                if full:
                    ctx.log(f"  Logical volume \"{new_volume.split(':')[1]}\" created.")
                    await ctx.work(0.5)
                    ctx.log("transferred 32.0 GiB of 32.0 GiB (100.00%)")
                    await ctx.work(0.5 / max(len(keys), 1))
                else:
                    ctx.log(f"  Logical volume \"{new_volume.split('/')[-1]}\" created.")
                    await ctx.work(1.0 / max(len(keys), 1))
                new.config[key] = replace_volume(src.config[key], new_volume)
            if not keys:
                await ctx.work()
            ctx.raise_injected()
        except BaseException as exc:
            if ctx.vanished:
                raise
            state.guests.pop(newid, None)
            reason = ctx.reason(exc, "interrupted by signal")
            raise TaskError(f"clone failed: {reason}") from None
        new.config.pop("lock", None)
        if target is not None:
            new.node = target
        if pool is not None:
            state.pools.setdefault(pool, set()).add(newid)
            new.pool = pool

    task = core.tasks.start(source.node, "qmclone", str(source.vmid), call.user, body)
    return task.upid


def _uuid(core: SimCore) -> str:
    return str(uuid.UUID(int=core.rng.getrandbits(128), version=4))


@route("POST", "/nodes/{node}/lxc/{vmid}/clone")
async def lxc_clone(call: Call) -> Any:
    core = call.core
    state = core.state
    source = load_guest(call)
    newid = int(call.p("newid"))
    pool = call.p("pool")
    if pool is not None and pool not in state.pools:
        raise PveError(403, PermissionDenied(f"pool '{pool}' does not exist").message)
    target = _clone_target_node(call)
    _check_clone_storage(call, target)
    async with flocked(core, source):
        source = load_guest(call)
        check_lock(source)
        source.config["lock"] = "disk"  # set_lock on the source: concurrent clones now fail
        try:
            running = source.running
            full = bool(call.p("full")) if call.p("full") is not None else not source.template
            if call.p("storage") is not None and not full:
                raise die("parameter 'storage' not allowed for linked clones")
            if call.p("snapname"):
                raise die(f"snapshot '{call.p('snapname')}' does not exist")
            holder = state.guests.get(newid)
            if holder is not None:
                raise die(f"{holder.word} {newid} already exists on node '{holder.node}'")
            if newid in state.reserved:  # a qmclone worker is about to create it
                raise die(f"VM {newid} already exists on node '{source.node}'")
            keys, shared = _clone_volumes(call, source, full, running)
            for key, value in source.config.items():
                if NET_RE.match(key):
                    _bridge_checks(call, value, "lxc")
            if target is not None and not shared:
                raise die(f"can't clone CT to node '{target}' (CT uses local storage)")
            conf = _new_net_config(source, call)
            for key in keys:
                conf.pop(key, None)
            conf["lock"] = "create"
            if call.p("hostname"):
                conf["hostname"] = call.p("hostname")
            if call.p("description"):
                conf["description"] = call.p("description")
            new = Guest(newid, "lxc", source.node, conf, created_at=now_mono())
            state.guests[newid] = new
        except BaseException:
            source.config.pop("lock", None)
            raise
    storage = call.p("storage")

    async def body(ctx: TaskContext) -> None:
        try:
            for index, key in enumerate(keys):
                volume = disk_volume(source.config[key])
                if full:
                    ctx.log(f"create full clone of mountpoint {key} ({volume})")
                else:
                    ctx.log(f"create linked clone of mount point {key} ({volume})")
                await ctx.work(1.0 / max(len(keys), 1))
                new_volume = _clone_volume_name(volume, newid, index, full, storage)
                new.config[key] = replace_volume(source.config[key], new_volume)
            if not keys:
                await ctx.work()
            ctx.raise_injected()
        except BaseException as exc:
            if ctx.vanished:
                raise  # a vanished worker leaves both locks behind, as a killed PVE worker does
            source.config.pop("lock", None)  # "unlock the source config in any case"
            if state.guests.get(newid) is new:
                del state.guests[newid]
            raise TaskError(f"clone failed: {ctx.reason(exc, 'interrupted by signal')}") from None
        if pool is not None:
            state.pools.setdefault(pool, set()).add(newid)
            new.pool = pool
        new.config.pop("lock", None)
        if target is not None:
            new.node = target
        source.config.pop("lock", None)

    task = core.tasks.start(source.node, "vzclone", str(source.vmid), call.user, body)
    return task.upid


# ---------------------------------------------------------------------------------------------
# Lifecycle (§6)


def _start_task(
    call: Call, guest: Guest, task_type: str, body: Callable[[TaskContext], Awaitable[None]]
) -> str:
    return call.core.tasks.start(guest.node, task_type, str(guest.vmid), call.user, body).upid


@route("POST", "/nodes/{node}/qemu/{vmid}/status/start")
async def qemu_start(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    root_only(call, "skiplock", "stateuri", "migratedfrom")
    task_type = "hastart" if guest.ha_managed else "qmstart"

    async def body(ctx: TaskContext) -> None:
        async with task_flock(core, guest):
            g = reload_guest(core, guest)
            if g.template:
                raise TaskError("you can't start a vm if it's a template")
            if g.lock:
                raise TaskError(f"VM is locked ({g.lock})")
            if g.running:
                raise TaskError(f"VM {g.vmid} already running")
            await ctx.work()
            ctx.raise_injected()
            g.set_status("running", core.state.alloc_pid())

    return _start_task(call, guest, task_type, body)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
async def qemu_stop(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    root_only(call, "skiplock", "migratedfrom")
    task_type = "hastop" if guest.ha_managed else "qmstop"

    async def body(ctx: TaskContext) -> None:
        async with task_flock(core, guest):
            g = reload_guest(core, guest)
            if g.lock:
                raise TaskError(f"VM is locked ({g.lock})")
            if not g.running:
                return  # stopping a stopped VM is a successful no-op
            await ctx.work()
            ctx.raise_injected()
            g.set_status("stopped")

    return _start_task(call, guest, task_type, body)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown")
async def qemu_shutdown(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    root_only(call, "skiplock")
    force = bool(call.p("forceStop", 0))

    async def body(ctx: TaskContext) -> None:
        async with task_flock(core, guest):
            g = reload_guest(core, guest)
            if g.lock:
                raise TaskError(f"VM is locked ({g.lock})")
            if not g.running:
                return
            await ctx.work()
            ctx.raise_injected()
            if g.ignores_shutdown:
                if not force:
                    raise TaskError("VM quit/powerdown failed - got timeout")
                ctx.log("VM still running - terminating now with SIGTERM")
            g.set_status("stopped")

    return _start_task(call, guest, "qmshutdown", body)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/reboot")
async def qemu_reboot(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    if not guest.running:
        raise die(f"VM {guest.vmid} not running")

    async def body(ctx: TaskContext) -> None:
        async with task_flock(core, guest):
            g = reload_guest(core, guest)
            if g.lock:
                raise TaskError(f"VM is locked ({g.lock})")
            await ctx.work()
            ctx.raise_injected()
            if g.ignores_shutdown:
                raise TaskError("VM quit/powerdown failed - got timeout")
            g.set_status("stopped")
            g.set_status("running", core.state.alloc_pid())

    return _start_task(call, guest, "qmreboot", body)


@route("POST", "/nodes/{node}/lxc/{vmid}/status/start")
async def lxc_start(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    root_only(call, "skiplock")
    if guest.running:
        raise die(f"CT {guest.vmid} already running")
    task_type = "hastart" if guest.ha_managed else "vzstart"
    async with flocked(core, guest):
        pass  # the API forks the worker while holding the config flock

    async def body(ctx: TaskContext) -> None:
        g = reload_guest(core, guest)
        if g.template:
            raise TaskError("you can't start a CT if it's a template")
        if g.lock:
            raise TaskError(f"CT is locked ({g.lock})")
        await ctx.work()
        ctx.raise_injected()
        if g.running:
            raise TaskError(f"CT {g.vmid} already running")
        g.set_status("running", core.state.alloc_pid())

    return _start_task(call, guest, task_type, body)


@route("POST", "/nodes/{node}/lxc/{vmid}/status/stop")
async def lxc_stop(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    root_only(call, "skiplock")
    if not guest.running:
        raise die(f"CT {guest.vmid} not running")
    task_type = "hastop" if guest.ha_managed else "vzstop"

    async def body(ctx: TaskContext) -> None:
        g = reload_guest(core, guest)
        if g.lock:
            raise TaskError(f"CT is locked ({g.lock})")
        await ctx.work()
        ctx.raise_injected()
        g.set_status("stopped")

    return _start_task(call, guest, task_type, body)


@route("POST", "/nodes/{node}/lxc/{vmid}/status/shutdown")
async def lxc_shutdown(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    if not guest.running:
        raise die(f"CT {guest.vmid} not running")
    force = bool(call.p("forceStop", 0))

    async def body(ctx: TaskContext) -> None:
        g = reload_guest(core, guest)
        if g.lock:
            raise TaskError(f"CT is locked ({g.lock})")
        await ctx.work()
        ctx.raise_injected()
        if g.ignores_shutdown and not force:
            raise TaskError("container did not stop")
        g.set_status("stopped")

    return _start_task(call, guest, "vzshutdown", body)


@route("POST", "/nodes/{node}/lxc/{vmid}/status/reboot")
async def lxc_reboot(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    if not guest.running:
        raise die(f"VM {guest.vmid} not running")  # sic: PVE says "VM" here for CTs too

    async def body(ctx: TaskContext) -> None:
        g = reload_guest(core, guest)
        await ctx.work()
        ctx.raise_injected()
        if g.ignores_shutdown:
            raise TaskError("container did not stop")
        g.set_status("stopped")
        g.set_status("running", core.state.alloc_pid())

    return _start_task(call, guest, "vzreboot", body)


# ---------------------------------------------------------------------------------------------
# Template conversion and destroy


def _to_base_volumes(guest: Guest) -> None:
    for key in disk_keys(guest.kind, guest.config):
        value = guest.config[key]
        volume = disk_volume(value)
        if ":vm-" in volume:
            guest.config[key] = replace_volume(value, volume.replace(":vm-", ":base-", 1))


@route("POST", *both("/{vmid}/template"))
async def template(call: Call) -> Any:
    core = call.core
    guest = load_guest(call)
    async with flocked(core, guest):
        guest = load_guest(call)
        check_lock(guest)
        if guest.template:
            raise die("you can't convert a template to a template")
        if guest.running:
            if guest.kind == "qemu":
                raise die("you can't convert a VM to template if VM is running")
            raise die("you can't convert a CT to template if the CT is running")
        if guest.kind == "qemu":
            guest.config["template"] = "1"

    async def body(ctx: TaskContext) -> None:
        g = reload_guest(core, guest)
        for key in disk_keys(g.kind, g.config):
            ctx.log(f"  Renamed \"{disk_volume(g.config[key]).split(':')[1]}\" to base volume")
        await ctx.work()
        ctx.raise_injected()
        _to_base_volumes(g)
        g.config["template"] = "1"

    task_type = "qmtemplate" if guest.kind == "qemu" else "vztemplate"
    upid = _start_task(call, guest, task_type, body)
    return upid if guest.kind == "qemu" else None


@route("DELETE", *both("/{vmid}"))
async def destroy(call: Call) -> Any:
    core = call.core
    state = core.state
    guest = load_guest(call)
    purge = bool(call.p("purge", 0))
    root_only(call, "skiplock")
    vmid = guest.vmid
    if guest.kind == "qemu":
        if guest.config.get("protection") == "1":
            raise die(f"can't remove VM {vmid} - protection mode enabled")
        if guest.ha_managed and not purge:
            raise die(
                f"unable to remove VM {vmid} - used in HA resources and purge parameter not set."
            )
        if guest.running:
            raise die(f"VM {vmid} is running - destroy failed")
    else:
        check_lock(guest)
        if guest.ha_managed and not purge:
            raise die(
                f"unable to remove CT {vmid} - used in HA resources and purge parameter not set."
            )
        if guest.config.get("protection") == "1":
            raise die(f"can't remove CT {vmid} - protection mode enabled")
        if guest.running and not call.p("force"):
            raise die(f"unable to destroy CT {vmid} - container is running")
    force = bool(call.p("force", 0))

    async def body(ctx: TaskContext) -> None:
        async with task_flock(core, guest):
            g = reload_guest(core, guest)
            if g.lock:
                raise TaskError(f"{g.word} is locked ({g.lock})")
            if g.kind == "lxc" and g.running and force:
                ctx.log("stopping container before destroy")
                g.set_status("stopped")
            if g.kind == "qemu" and g.running:
                raise TaskError(f"VM {vmid} is running - destroy failed")
            for key in disk_keys(g.kind, g.config):
                volname = disk_volume(g.config[key]).split(":")[1]
                ctx.log(f'  Logical volume "{volname}" successfully removed.')
            await ctx.work()
            ctx.raise_injected()
            if purge:
                ctx.log(f"purging {g.word} {vmid} from related configurations..")
                for members in state.pools.values():
                    members.discard(vmid)
                g.ha_managed = False
            state.guests.pop(vmid, None)

    task_type = "qmdestroy" if guest.kind == "qemu" else "vzdestroy"
    return _start_task(call, guest, task_type, body)


# ---------------------------------------------------------------------------------------------
# Guest addresses: QEMU guest agent and LXC interfaces


def _agent_enabled(guest: Guest) -> bool:
    value = guest.config.get("agent", "0")
    first = value.split(",")[0]
    opts = parse_kv(value)
    return first in ("1", "enabled=1") or opts.get("enabled") == "1"


@route("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces")
async def agent_interfaces(call: Call) -> Any:
    guest = load_guest(call)
    if not _agent_enabled(guest):
        raise die("No QEMU guest agent configured")
    if not guest.running:
        raise die(f"VM {guest.vmid} is not running")
    if not guest.agent_running:
        raise die("QEMU guest agent is not running")
    mac = (net_mac("qemu", guest.config.get("net0", "")) or "BC:24:11:00:00:00").lower()
    ip = agent_ip(call.core, guest)
    return {
        "result": [
            {
                "name": "lo",
                "hardware-address": "00:00:00:00:00:00",
                "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                    {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128},
                ],
                "statistics": _if_stats(0),
            },
            {
                "name": "enp6s18",
                "hardware-address": mac,
                "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": ip, "prefix": 24},
                    {"ip-address-type": "ipv6", "ip-address": _link_local(mac), "prefix": 64},
                ],
                "statistics": _if_stats(guest.uptime),
            },
        ]
    }


def _if_stats(uptime: int) -> dict[str, int]:
    return {
        "rx-bytes": uptime * 1200,
        "rx-packets": uptime * 9,
        "rx-errs": 0,
        "rx-dropped": 0,
        "tx-bytes": uptime * 800,
        "tx-packets": uptime * 7,
        "tx-errs": 0,
        "tx-dropped": 0,
    }


def _link_local(mac: str) -> str:
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 0x02
    eui = [*b[:3], 0xFF, 0xFE, *b[3:]]
    groups = [f"{(eui[i] << 8) | eui[i + 1]:x}" for i in range(0, 8, 2)]
    return "fe80::" + ":".join(groups)


@route("GET", "/nodes/{node}/lxc/{vmid}/interfaces")
async def lxc_interfaces(call: Call) -> Any:
    guest = load_guest(call)
    if not guest.running:
        raise die(f"CT {guest.vmid} is not running")
    mac = (net_mac("lxc", guest.config.get("net0", "")) or "BC:24:11:00:00:00").lower()
    return [
        {"name": "lo", "hwaddr": "00:00:00:00:00:00", "inet": "127.0.0.1/8", "inet6": "::1/128"},
        {
            "name": parse_kv(guest.config.get("net0", "")).get("name", "eth0"),
            "hwaddr": mac,
            "inet": f"{agent_ip(call.core, guest)}/24",
            "inet6": f"{_link_local(mac)}/64",
        },
    ]
