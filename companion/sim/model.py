"""The simulated cluster: nodes, storages, guests (qemu/lxc), pools, config flocks and helpers for
PVE's config strings (network devices, disks, digests, MACs)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["qemu", "lxc"]
KINDS: tuple[Kind, ...] = ("qemu", "lxc")
MAC_PREFIX = "BC:24:11"
GIB = 1024**3
MIB = 1024**2


def now_mono() -> float:
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# Config strings


def random_mac(rng: random.Random) -> str:
    """``BC:24:11:XX:XX:XX`` upper-case, as PVE >= 8.1 generates with the default ``mac_prefix``."""
    return MAC_PREFIX + "".join(f":{rng.randrange(256):02X}" for _ in range(3))


QEMU_NET_MODELS = (
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
)


def parse_kv(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        out[key] = val if sep else ""
    return out


def parse_qemu_net(value: str) -> dict[str, str]:
    """``virtio=MAC,bridge=vmbr0`` / ``model=virtio,macaddr=MAC`` / ``virtio,bridge=...``."""
    out: dict[str, str] = {}
    for part in value.split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if key in QEMU_NET_MODELS:
            out["model"] = key
            if sep:
                out["macaddr"] = val
        elif not sep:
            out["model"] = key
        else:
            out[key] = val
    return out


def print_qemu_net(net: dict[str, str]) -> str:
    """Stored form: ``<model>=<MAC>`` first, then the other keys sorted."""
    head = f"{net['model']}={net['macaddr']}" if net.get("macaddr") else net.get("model", "virtio")
    rest = [f"{k}={v}" for k, v in sorted(net.items()) if k not in ("model", "macaddr")]
    return ",".join([head, *rest])


def print_lxc_net(net: dict[str, str]) -> str:
    """Stored form: ``name=`` first, then the other keys sorted."""
    parts = [f"name={net['name']}"] if "name" in net else []
    parts += [f"{k}={v}" for k, v in sorted(net.items()) if k != "name"]
    return ",".join(parts)


def net_mac(kind: Kind, value: str) -> str | None:
    net = parse_qemu_net(value) if kind == "qemu" else parse_kv(value)
    return net.get("macaddr" if kind == "qemu" else "hwaddr")


def with_mac(kind: Kind, value: str, mac: str) -> str:
    """Return the ``netX`` value with its MAC replaced (or filled in)."""
    if kind == "qemu":
        net = parse_qemu_net(value)
        net["macaddr"] = mac
        return print_qemu_net(net)
    lnet = parse_kv(value)
    lnet["hwaddr"] = mac
    return print_lxc_net(lnet)


def normalize_net(kind: Kind, value: str, rng: random.Random) -> str:
    """What PVE stores for a ``netX`` it was sent: a missing MAC is generated, order canonical."""
    mac = net_mac(kind, value)
    return with_mac(kind, value, mac.upper() if mac else random_mac(rng))


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$")


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        return 0
    scale = {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[m.group(2)]
    return int(float(m.group(1)) * scale)


QEMU_DISK_RE = re.compile(r"^(scsi|virtio|sata|ide|efidisk|tpmstate)\d+$")
LXC_DISK_RE = re.compile(r"^(rootfs|mp\d+)$")
NET_RE = re.compile(r"^net\d+$")


def disk_keys(kind: Kind, config: dict[str, str]) -> list[str]:
    """Config keys holding a volume (cdroms and ``none`` excluded), sorted."""
    regex = QEMU_DISK_RE if kind == "qemu" else LXC_DISK_RE
    keys = []
    for key, value in config.items():
        if not regex.match(key):
            continue
        opts = parse_kv("volume=" + value) if kind == "lxc" else parse_kv("file=" + value)
        volume = opts.get("volume" if kind == "lxc" else "file", "")
        if "media=cdrom" in value or volume in ("", "none") or ":" not in volume:
            continue
        keys.append(key)
    return sorted(keys)


def disk_volume(value: str) -> str:
    first = value.split(",", 1)[0]
    return first.partition("=")[2] if first.startswith(("file=", "volume=")) else first


def replace_volume(value: str, volume: str) -> str:
    rest = value.split(",", 1)
    return volume + ("," + rest[1] if len(rest) > 1 else "")


def volume_storage(volume: str) -> str:
    return volume.split(":", 1)[0]


def config_digest(config: dict[str, str]) -> str:
    """sha1 over the rendered config file (PVE hashes the raw file)."""
    text = "".join(f"{k}: {v}\n" for k, v in sorted(config.items()))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


# ---------------------------------------------------------------------------------------------
# Cluster objects


@dataclass
class Node:
    name: str
    online: bool = True
    maxcpu: int = 8
    maxmem: int = 32 * GIB
    rootfs_total: int = 100 * GIB
    ip: str = "192.168.1.10"
    boot_time: float = field(default_factory=lambda: time.time() - 86400 * 3)
    cpu_model: str = "Intel(R) Core(TM) i5-10500T CPU @ 2.30GHz"

    @property
    def uptime(self) -> int:
        return int(time.time() - self.boot_time)


@dataclass
class Storage:
    name: str
    type: str = "dir"
    content: tuple[str, ...] = ("images", "rootdir")
    shared: bool = False
    total: int = 500 * GIB
    used: int = 50 * GIB
    nodes: tuple[str, ...] | None = None  # None: every node
    enabled: bool = True

    def on(self, node: str) -> bool:
        return self.nodes is None or node in self.nodes

    def supports_linked_clone(self) -> bool:
        return self.type in ("lvmthin", "zfspool", "rbd", "dir", "nfs", "cifs")


@dataclass
class Guest:
    vmid: int
    kind: Kind
    node: str
    config: dict[str, str]
    status: str = "stopped"
    created_at: float = field(default_factory=lambda: -math.inf)
    started_at: float | None = None
    status_changed_at: float = field(default_factory=lambda: -math.inf)
    prev_status: str = "stopped"
    ha_managed: bool = False
    pool: str | None = None
    agent_ip: str | None = None
    agent_running: bool = True
    ignores_shutdown: bool = False
    pid: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "qemu":
            return self.config.get("name") or f"VM {self.vmid}"
        return self.config.get("hostname") or f"CT{self.vmid}"

    @property
    def template(self) -> bool:
        return self.config.get("template") == "1"

    @property
    def lock(self) -> str | None:
        return self.config.get("lock") or None

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def word(self) -> str:
        """``VM`` or ``CT`` as PVE's messages use it."""
        return "VM" if self.kind == "qemu" else "CT"

    def conf_path(self) -> str:
        sub = "qemu-server" if self.kind == "qemu" else "lxc"
        return f"nodes/{self.node}/{sub}/{self.vmid}.conf"

    def flock_path(self) -> str:
        if self.kind == "qemu":
            return f"/var/lock/qemu-server/lock-{self.vmid}.conf"
        return f"/run/lock/lxc/pve-config-{self.vmid}.lock"

    def set_status(self, status: str, pid: int | None = None) -> None:
        if status != self.status:
            self.prev_status = self.status
            self.status_changed_at = now_mono()
        self.status = status
        if status == "running":
            self.started_at = now_mono()
            self.pid = pid
        else:
            self.started_at = None
            self.pid = None

    @property
    def uptime(self) -> int:
        return int(now_mono() - self.started_at) if self.started_at is not None else 0

    @property
    def maxmem(self) -> int:
        return int(self.config.get("memory", "512") or 512) * MIB

    @property
    def maxswap(self) -> int:
        return int(self.config.get("swap", "512") or 512) * MIB

    @property
    def cpus(self) -> int:
        cores = int(self.config.get("cores", "1") or 1)
        sockets = int(self.config.get("sockets", "1") or 1) if self.kind == "qemu" else 1
        return cores * sockets

    @property
    def maxdisk(self) -> int:
        keys = disk_keys(self.kind, self.config)
        if not keys:
            return 0
        return parse_size(parse_kv("x=" + self.config[keys[0]]).get("size", "0"))

    def stats(self) -> dict[str, Any]:
        """The RRD-ish numbers (cpu 0..1, bytes), plausible and slowly changing."""
        up = self.uptime
        running = self.running
        phase = (self.vmid % 17) + time.time() / 30.0
        cpu = (0.02 + 0.015 * (1 + math.sin(phase))) if running else 0
        mem = int(self.maxmem * (0.35 + 0.05 * math.sin(phase / 3))) if running else 0
        return {
            "cpu": round(cpu, 6),
            "maxcpu": self.cpus,
            "mem": mem,
            "maxmem": self.maxmem,
            # QEMU reports no filesystem usage without the agent's help: always 0 there.
            "disk": int(self.maxdisk * 0.18) if running and self.kind == "lxc" else 0,
            "maxdisk": self.maxdisk,
            "uptime": up,
            "netin": up * 1200 if running else 0,
            "netout": up * 800 if running else 0,
            "diskread": up * 4096 if running else 0,
            "diskwrite": up * 2048 if running else 0,
        }


class Flocks:
    """Per-vmid config flocks (shared/exclusive) with timeouts, like ``flock(2)`` on lock files."""

    def __init__(self) -> None:
        self._shared: Counter[int] = Counter()
        self._exclusive: set[int] = set()
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _free(self, vmid: int, exclusive: bool) -> bool:
        if vmid in self._exclusive:
            return False
        return not (exclusive and self._shared[vmid] > 0)

    def held(self, vmid: int) -> bool:
        return vmid in self._exclusive or self._shared[vmid] > 0

    async def acquire(self, vmid: int, *, exclusive: bool, timeout: float) -> bool:
        cond = self._condition()
        async with cond:
            if not self._free(vmid, exclusive):
                try:
                    await asyncio.wait_for(
                        cond.wait_for(lambda: self._free(vmid, exclusive)), timeout
                    )
                except TimeoutError:
                    return False
            if exclusive:
                self._exclusive.add(vmid)
            else:
                self._shared[vmid] += 1
            return True

    async def release(self, vmid: int, *, exclusive: bool) -> None:
        cond = self._condition()
        async with cond:
            if exclusive:
                self._exclusive.discard(vmid)
            elif self._shared[vmid] > 0:
                self._shared[vmid] -= 1
                if self._shared[vmid] == 0:
                    del self._shared[vmid]
            cond.notify_all()


@dataclass
class ClusterState:
    """Everything a request can see or change. Mutate through handlers or the helpers below."""

    rng: random.Random = field(default_factory=random.Random)
    nodes: dict[str, Node] = field(default_factory=dict)
    storages: dict[str, Storage] = field(default_factory=dict)
    guests: dict[int, Guest] = field(default_factory=dict)
    pools: dict[str, set[int]] = field(default_factory=dict)
    reserved: set[int] = field(default_factory=set)
    cluster_name: str = "ctrlable-sim"
    flocks: Flocks = field(default_factory=Flocks)
    next_pid: int = 0x1000

    # -- builders ------------------------------------------------------------------------------

    def add_node(self, name: str, **kwargs: Any) -> Node:
        if name in self.nodes:
            msg = f"node {name!r} already exists"
            raise ValueError(msg)
        node = Node(name, ip=kwargs.pop("ip", f"192.168.1.{10 + len(self.nodes)}"), **kwargs)
        self.nodes[name] = node
        return node

    def add_storage(self, name: str, **kwargs: Any) -> Storage:
        storage = Storage(name, **kwargs)
        self.storages[name] = storage
        return storage

    def add_guest(
        self,
        kind: Kind,
        vmid: int,
        node: str,
        name: str | None = None,
        *,
        template: bool = False,
        running: bool = False,
        storage: str = "local-lvm",
        config: dict[str, str] | None = None,
        fresh: bool = False,
        **kwargs: Any,
    ) -> Guest:
        """Create a guest directly (no task, no lag unless ``fresh``)."""
        if kind not in KINDS:
            msg = f"kind must be 'qemu' or 'lxc', got {kind!r}"
            raise ValueError(msg)
        if vmid in self.guests:
            msg = f"vmid {vmid} already exists"
            raise ValueError(msg)
        if node not in self.nodes:
            msg = f"unknown node {node!r}"
            raise ValueError(msg)
        conf = default_config(kind, vmid, name, template, storage, self.rng)
        conf.update(config or {})
        guest = Guest(vmid, kind, node, conf, **kwargs)
        if fresh:
            guest.created_at = now_mono()
        if running:
            guest.set_status("running", self.alloc_pid())
        self.guests[vmid] = guest
        return guest

    def alloc_pid(self) -> int:
        self.next_pid += self.rng.randrange(1, 40)
        return self.next_pid

    # -- queries -------------------------------------------------------------------------------

    def guest_on(self, node: str, kind: Kind, vmid: int) -> Guest | None:
        guest = self.guests.get(vmid)
        if guest is None or guest.node != node or guest.kind != kind:
            return None
        return guest

    def vmid_taken(self, vmid: int) -> bool:
        return vmid in self.guests or vmid in self.reserved

    def next_free_vmid(self, start: int = 100) -> int:
        vmid = start
        while self.vmid_taken(vmid):
            vmid += 1
        return vmid

    def guests_on(self, node: str, kind: Kind | None = None) -> Iterator[Guest]:
        for vmid in sorted(self.guests):
            guest = self.guests[vmid]
            if guest.node == node and (kind is None or guest.kind == kind):
                yield guest

    def node_stats(self, node: Node) -> dict[str, Any]:
        """Plausible, changing numbers for a node (cpu 0..1, bytes)."""
        running = [g for g in self.guests.values() if g.node == node.name and g.running]
        t = time.time()
        cpu = 0.03 + 0.02 * (1 + math.sin(t / 20.0)) + 0.01 * len(running)
        cpu += self.rng.random() * 0.01
        used = int(node.maxmem * 0.12) + sum(g.stats()["mem"] for g in running)
        used = min(used, node.maxmem - MIB)
        rootfs_used = int(node.rootfs_total * 0.21)
        return {
            "cpu": round(min(cpu, 1.0), 6),
            "maxcpu": node.maxcpu,
            "mem": used,
            "maxmem": node.maxmem,
            "disk": rootfs_used,
            "maxdisk": node.rootfs_total,
            "uptime": node.uptime,
            "loadavg": [f"{max(cpu * node.maxcpu * f, 0):.2f}" for f in (1.0, 0.9, 0.8)],
        }

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_name": self.cluster_name,
            "nodes": [
                {
                    "name": n.name,
                    "online": n.online,
                    "maxcpu": n.maxcpu,
                    "maxmem": n.maxmem,
                    "ip": n.ip,
                }
                for n in self.nodes.values()
            ],
            "storages": [
                {
                    "name": s.name,
                    "type": s.type,
                    "content": list(s.content),
                    "shared": s.shared,
                    "total": s.total,
                    "used": s.used,
                    "nodes": list(s.nodes) if s.nodes is not None else None,
                }
                for s in self.storages.values()
            ],
            "guests": [
                {
                    "vmid": g.vmid,
                    "kind": g.kind,
                    "node": g.node,
                    "config": g.config,
                    "status": g.status,
                    "ha_managed": g.ha_managed,
                    "pool": g.pool,
                    "agent_ip": g.agent_ip,
                }
                for g in self.guests.values()
            ],
            "pools": {k: sorted(v) for k, v in self.pools.items()},
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace nodes, storages, guests and pools with a :meth:`to_dict` snapshot."""
        self.cluster_name = str(data.get("cluster_name", self.cluster_name))
        self.nodes = {}
        for n in data.get("nodes", []):
            self.add_node(
                str(n["name"]),
                online=bool(n.get("online", True)),
                maxcpu=int(n.get("maxcpu", 8)),
                maxmem=int(n.get("maxmem", 32 * GIB)),
                ip=str(n.get("ip", "192.168.1.10")),
            )
        self.storages = {}
        for s in data.get("storages", []):
            nodes = s.get("nodes")
            self.add_storage(
                str(s["name"]),
                type=str(s.get("type", "dir")),
                content=tuple(s.get("content", ["images", "rootdir"])),
                shared=bool(s.get("shared", False)),
                total=int(s.get("total", 500 * GIB)),
                used=int(s.get("used", 50 * GIB)),
                nodes=tuple(nodes) if nodes is not None else None,
            )
        self.guests = {}
        for g in data.get("guests", []):
            kind: Kind = "qemu" if g["kind"] == "qemu" else "lxc"
            guest = Guest(int(g["vmid"]), kind, str(g["node"]), dict(g["config"]))
            guest.ha_managed = bool(g.get("ha_managed", False))
            guest.pool = g.get("pool")
            guest.agent_ip = g.get("agent_ip")
            if g.get("status") == "running":
                guest.set_status("running", self.alloc_pid())
            self.guests[guest.vmid] = guest
        self.pools = {k: set(v) for k, v in data.get("pools", {}).items()}


def default_config(
    kind: Kind, vmid: int, name: str | None, template: bool, storage: str, rng: random.Random
) -> dict[str, str]:
    """A realistic config for a seeded guest (templates have ``base-`` volumes)."""
    prefix = "base" if template else "vm"
    volume = f"{storage}:{prefix}-{vmid}-disk-0"
    mac = random_mac(rng)
    if kind == "qemu":
        conf = {
            "agent": "1",
            "boot": "order=scsi0;net0",
            "cores": "2",
            "cpu": "host",
            "memory": "4096",
            "meta": "creation-qemu=9.0.2,ctime=1748736000",
            "net0": f"virtio={mac},bridge=vmbr0,firewall=1",
            "numa": "0",
            "ostype": "l26",
            "scsi0": f"{volume},discard=on,iothread=1,size=32G",
            "scsihw": "virtio-scsi-single",
            "smbios1": f"uuid={uuid.UUID(int=rng.getrandbits(128), version=4)}",
            "sockets": "1",
            "vmgenid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        }
        if name:
            conf["name"] = name
    else:
        conf = {
            "arch": "amd64",
            "cores": "2",
            "features": "nesting=1",
            "memory": "2048",
            "net0": f"name=eth0,bridge=vmbr0,firewall=1,hwaddr={mac},ip=dhcp,type=veth",
            "onboot": "0",
            "ostype": "debian",
            "rootfs": f"{volume},size=8G",
            "swap": "512",
            "unprivileged": "1",
        }
        if name:
            conf["hostname"] = name
    if template:
        conf["template"] = "1"
    return conf
