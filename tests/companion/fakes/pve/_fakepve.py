"""Fake Proxmox VE command-line tools for the install.sh tests.

One module implements `pveversion`, `pveum`, `pct`, `pveam`, `pvesh`, `pvesm`, `pvenode`, `qm`, plus
`ip`, `uname` and `id` (only the forms install.sh uses; everything else goes to the real tool). The
small executables next to this file call :func:`main`.

* Every call is recorded as one JSON line in ``$FAKE_PVE_STATE/calls.jsonl``: ``{"tool", "argv"}``.
* State (roles, users, tokens, ACLs, containers, templates) lives in ``$FAKE_PVE_STATE/state.json``,
  so a second run sees what the first made. A container's filesystem is the directory
  ``$FAKE_PVE_STATE/ct/<vmid>/rootfs``; ``pct push``/``pull`` copy into and out of it and
  ``pct exec`` emulates the few commands install.sh runs inside (paths rewritten into the rootfs;
  anything else fails with 127, so an unexpected command cannot pass unnoticed).
* Behaviour follows PVE 8 where the tests depend on it: pveum refuses unknown privileges and
  duplicate objects, a token's effective privileges are the intersection of the user's and the
  token's ACLs, ``pct create`` refuses a taken id, ``pct push`` needs the target directory and a
  running container, ``systemctl restart`` refuses a unit changed on disk since the last
  daemon-reload, and ``python3 -m venv`` needs the ``python3-venv`` package.

Knobs (environment):
  FAKE_PVE_VERSION        pve-manager version printed by pveversion (default 8.3.2)
  FAKE_PVE_NO_STORAGE=1   no storage can hold containers
  FAKE_PVE_ROOTDIR_AVAIL_KIB  free KiB on local-lvm (default 800 GiB)
  FAKE_FAIL_ON            "tool arg arg" prefix: every matching call fails (exit 255)
  FAKE_UNAME_M            machine printed by `uname -m`
  FAKE_ID_U               uid printed by `id -u`
  FAKE_CT_DHCP_IP         address a DHCP container gets (default 192.0.2.50)
  FAKE_PVENODE_FINGERPRINT  fingerprint `pvenode cert info` reports for pve-ssl.pem
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# Start-up cost matters (the fakes run dozens of times per install): hashlib and shutil are
# imported where used, typing only for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

NODE = "pve"

PRIVILEGES = frozenset(
    """VM.Allocate VM.Audit VM.Backup VM.Clone VM.Config.CDROM VM.Config.CPU VM.Config.Cloudinit
    VM.Config.Disk VM.Config.HWType VM.Config.Memory VM.Config.Network VM.Config.Options VM.Console
    VM.Migrate VM.Monitor VM.PowerMgmt VM.Snapshot VM.Snapshot.Rollback Sys.Audit Sys.Console
    Sys.Incoming Sys.Modify Sys.PowerMgmt Sys.Syslog Sys.AccessNetwork Datastore.Allocate
    Datastore.AllocateSpace Datastore.AllocateTemplate Datastore.Audit SDN.Allocate SDN.Audit
    SDN.Use Pool.Allocate Pool.Audit Mapping.Audit Mapping.Modify Mapping.Use User.Modify
    Group.Allocate Realm.Allocate Realm.AllocateUser Permissions.Modify""".split()
)

BUILTIN_ROLES = {
    "Administrator": sorted(PRIVILEGES),
    "PVEAuditor": [
        "Datastore.Audit",
        "Mapping.Audit",
        "Pool.Audit",
        "SDN.Audit",
        "Sys.Audit",
        "VM.Audit",
    ],
    "NoAccess": [],
}

CATALOG = [
    ("system", "debian-11-standard_11.7-1_amd64.tar.zst"),
    ("system", "debian-12-standard_12.2-1_amd64.tar.zst"),
    ("system", "debian-12-standard_12.7-1_amd64.tar.zst"),
    ("system", "debian-12-standard_12.7-1_arm64.tar.zst"),
    ("system", "ubuntu-24.04-standard_24.04-2_amd64.tar.zst"),
    ("turnkeylinux", "debian-12-turnkey-core_18.0-1_amd64.tar.gz"),
]

GIB_KIB = 1024 * 1024


class Fail(Exception):
    def __init__(self, message: str, code: int = 255) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def state_dir() -> Path:
    path = os.environ.get("FAKE_PVE_STATE")
    if not path:
        raise Fail("FAKE_PVE_STATE is not set", 99)
    return Path(path)


def default_state() -> dict[str, Any]:
    return {
        "roles": {name: {"privs": privs, "special": 1} for name, privs in BUILTIN_ROLES.items()},
        "users": {"root@pam": {"enable": 1, "comment": ""}},
        "tokens": {},
        "acls": [],
        "cts": {},
        "vms": {},
        "templates": {"local": []},
    }


def load_state() -> dict[str, Any]:
    path = state_dir() / "state.json"
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return default_state()


def save_state(state: dict[str, Any]) -> None:
    path = state_dir() / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def record(tool: str, argv: list[str]) -> None:
    with (state_dir() / "calls.jsonl").open("a") as fh:
        fh.write(json.dumps({"tool": tool, "argv": argv}) + "\n")


def out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def parse_opts(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split PVE-style arguments into positionals and --option value pairs."""
    pos: list[str] = []
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if i + 1 >= len(args):
                raise Fail(f"400 missing value for option '{arg}'")
            opts[arg[2:]] = args[i + 1]
            i += 2
        else:
            pos.append(arg)
            i += 1
    return pos, opts


def dump(data: Any, opts: dict[str, str]) -> None:
    if opts.get("output-format", "text") in ("json", "json-pretty"):
        out(json.dumps(data))
    else:
        out(json.dumps(data, indent=1))


# --------------------------------------------------------------------------------------------
# pveversion, uname, id, ip, pvenode


def cmd_pveversion(args: list[str], state: dict[str, Any]) -> int:
    version = os.environ.get("FAKE_PVE_VERSION", "8.3.2")
    out(f"pve-manager/{version}/3e76eec21c4a14a7 (running kernel: 6.8.12-5-pve)")
    return 0


def real(tool: str, args: list[str]) -> int:
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != here
    )
    import shutil

    exe = shutil.which(tool, path=path)
    if exe is None:
        raise Fail(f"{tool}: not found", 127)
    import subprocess

    return subprocess.call([exe, *args])


def cmd_uname(args: list[str], state: dict[str, Any]) -> int:
    if args == ["-m"] and os.environ.get("FAKE_UNAME_M"):
        out(os.environ["FAKE_UNAME_M"])
        return 0
    return real("uname", args)


def cmd_id(args: list[str], state: dict[str, Any]) -> int:
    if args == ["-u"] and os.environ.get("FAKE_ID_U"):
        out(os.environ["FAKE_ID_U"])
        return 0
    return real("id", args)


def bridges() -> dict[str, str]:
    default = '{"vmbr0": "192.0.2.10/24", "vmbr1": "198.51.100.10/24"}'
    data: dict[str, str] = json.loads(os.environ.get("FAKE_BRIDGES", default))
    return data


def cmd_ip(args: list[str], state: dict[str, Any]) -> int:
    if args[:5] == ["-4", "-o", "addr", "show", "dev"] and len(args) == 6:
        name = args[5]
        if name not in bridges():
            sys.stderr.write(f'Device "{name}" does not exist.\n')
            return 1
        addr = bridges()[name]
        out(f"5: {name}    inet {addr} scope global {name}\\       valid_lft forever")
        return 0
    raise Fail(f"fake ip: unsupported arguments {args}", 127)


def cmd_pvenode(args: list[str], state: dict[str, Any]) -> int:
    pos, opts = parse_opts(args)
    if pos != ["cert", "info"]:
        raise Fail(f"fake pvenode: unsupported {args}", 127)
    fingerprint = os.environ.get("FAKE_PVENODE_FINGERPRINT", ":".join(["AB"] * 32))
    dump(
        [
            {"filename": "pve-root-ca.pem", "fingerprint": ":".join(["01"] * 32)},
            {"filename": "pve-ssl.pem", "fingerprint": fingerprint},
        ],
        opts,
    )
    return 0


# --------------------------------------------------------------------------------------------
# pvesm, pveam, pvesh, qm


def storages() -> list[dict[str, Any]]:
    avail = int(os.environ.get("FAKE_PVE_ROOTDIR_AVAIL_KIB", str(800 * GIB_KIB)))
    items = [
        {
            "name": "local",
            "type": "dir",
            "content": ["vztmpl", "iso", "backup"],
            "total": 98 * GIB_KIB,
            "avail": 80 * GIB_KIB,
        },
        {
            "name": "local-lvm",
            "type": "lvmthin",
            "content": ["rootdir", "images"],
            "total": 900 * GIB_KIB,
            "avail": avail,
        },
        {
            "name": "nfs-iso",
            "type": "nfs",
            "content": ["iso"],
            "total": 500 * GIB_KIB,
            "avail": 0,
            "status": "inactive",
        },
    ]
    if os.environ.get("FAKE_PVE_NO_STORAGE") == "1":
        items = [s for s in items if "rootdir" not in s["content"]]
    return items


def cmd_pvesm(args: list[str], state: dict[str, Any]) -> int:
    pos, opts = parse_opts(args)
    if pos != ["status"]:
        raise Fail(f"fake pvesm: unsupported {args}", 127)
    content = opts.get("content")
    row = "{:<16} {:>8} {:>10} {:>14} {:>14} {:>14} {:>8}"
    lines = [row.format("Name", "Type", "Status", "Total", "Used", "Available", "%")]
    for s in storages():
        if content and content not in s["content"]:
            continue
        status = s.get("status", "active")
        used = s["total"] - s["avail"]
        pct = f"{100 * used / s['total']:.2f}%"
        lines.append(row.format(s["name"], s["type"], status, s["total"], used, s["avail"], pct))
    out("\n".join(lines))
    return 0


def cmd_pveam(args: list[str], state: dict[str, Any]) -> int:
    pos, opts = parse_opts(args)
    if pos[:1] == ["list"] and len(pos) == 2:
        storage = pos[1]
        if not any(s["name"] == storage and "vztmpl" in s["content"] for s in storages()):
            raise Fail(f"storage '{storage}' does not support content-type 'vztmpl'")
        lines = [f"{'NAME':<60} SIZE"]
        lines += [f"{storage}:vztmpl/{n:<50} 120.29MB" for n in state["templates"].get(storage, [])]
        out("\n".join(lines))
        return 0
    if pos == ["update"]:
        state["catalog_updated"] = True
        out("update successful")
        return 0
    if pos == ["available"]:
        section = opts.get("section")
        out("\n".join(f"{sec:<15} {name}" for sec, name in CATALOG if section in (None, sec)))
        return 0
    if pos[:1] == ["download"] and len(pos) == 3:
        storage, name = pos[1], pos[2]
        if name not in [n for _s, n in CATALOG]:
            raise Fail(f"400 Parameter verification failed.\ntemplate: no such template '{name}'")
        state["templates"].setdefault(storage, [])
        if name not in state["templates"][storage]:
            state["templates"][storage].append(name)
        out(f"downloading ... {name}\nTASK OK")
        return 0
    raise Fail(f"fake pveam: unsupported {args}", 127)


def all_ids(state: dict[str, Any]) -> set[int]:
    return {int(i) for i in state["cts"]} | {int(i) for i in state["vms"]}


def cmd_pvesh(args: list[str], state: dict[str, Any]) -> int:
    pos, opts = parse_opts(args)
    if pos == ["get", "/cluster/nextid"]:
        used = all_ids(state)
        if "vmid" in opts:
            vmid = int(opts["vmid"])
            if vmid in used:
                raise Fail(
                    f"400 Parameter verification failed.\nvmid: VM {vmid} already exists", 255
                )
            dump(str(vmid), opts)
            return 0
        vmid = 100
        while vmid in used:
            vmid += 1
        dump(str(vmid), opts)
        return 0
    if pos == ["get", "/cluster/resources"]:
        items = []
        for vmid, ct in state["cts"].items():
            items.append(
                {
                    "vmid": int(vmid),
                    "type": "lxc",
                    "node": NODE,
                    "status": ct["status"],
                    "name": ct["config"].get("hostname", ""),
                    "tags": ct["config"].get("tags", ""),
                }
            )
        for vmid, vm in state["vms"].items():
            items.append(
                {
                    "vmid": int(vmid),
                    "type": "qemu",
                    "node": NODE,
                    "status": vm.get("status", "stopped"),
                    "name": vm.get("name", ""),
                    "tags": vm.get("tags", ""),
                }
            )
        dump(items, opts)
        return 0
    raise Fail(f"fake pvesh: unsupported {args}", 127)


def cmd_qm(args: list[str], state: dict[str, Any]) -> int:
    if args == ["list"]:
        lines = ["      VMID NAME                 STATUS     MEM(MB)    BOOTDISK(GB) PID"]
        lines += [
            f"{vmid:>10} {vm.get('name', ''):<20} {vm.get('status', 'stopped'):<10}"
            for vmid, vm in state["vms"].items()
        ]
        out("\n".join(lines))
        return 0
    raise Fail(f"fake qm: unsupported {args}", 127)


# --------------------------------------------------------------------------------------------
# pveum


def known_privileges() -> frozenset[str]:
    """PVE 9 replaced VM.Monitor with finer guest-agent privileges."""
    major = int(os.environ.get("FAKE_PVE_VERSION", "8.3.2").split(".")[0])
    if major >= 9:
        return (PRIVILEGES - {"VM.Monitor"}) | {"VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"}
    return PRIVILEGES


def check_privs(text: str) -> list[str]:
    privs = sorted({p for p in re.split(r"[ ,;]+", text) if p})
    known = known_privileges()
    for priv in privs:
        if priv not in known:
            raise Fail(f"invalid privilege '{priv}'")
    return privs


def user_key(userid: str) -> str:
    if not re.fullmatch(r"[^\s:/@!]+@(pve|pam)", userid):
        raise Fail(f"400 Parameter verification failed.\nuserid: invalid format - '{userid}'")
    return userid


def effective(state: dict[str, Any], kind: str, ugid: str, path: str) -> set[str]:
    privs: set[str] = set()
    for acl in state["acls"]:
        if acl["type"] != kind or acl["ugid"] != ugid:
            continue
        if acl["path"] == path or (
            acl["propagate"] and (acl["path"] == "/" or path.startswith(acl["path"] + "/"))
        ):
            privs |= set(state["roles"][acl["roleid"]]["privs"])
    return privs


def pveum_acl(pos: list[str], opts: dict[str, str], state: dict[str, Any], add: bool) -> None:
    if len(pos) != 3 or "roles" not in opts:
        raise Fail(
            "400 Parameter verification failed.\nroles: property is missing and it is not optional"
        )
    path = pos[2]
    roles = [r for r in re.split(r"[ ,;]+", opts["roles"]) if r]
    subjects: list[tuple[str, str]] = []
    for kind, key in (("user", "users"), ("token", "tokens"), ("group", "groups")):
        subjects += [(kind, s) for s in re.split(r"[ ,;]+", opts.get(key, "")) if s]
    if not subjects:
        raise Fail("either 'users', 'groups' or 'tokens' is required")
    for role in roles:
        if role not in state["roles"]:
            raise Fail(f"role '{role}' does not exist")
    for kind, ugid in subjects:
        if kind == "user" and ugid not in state["users"]:
            raise Fail(f"user '{ugid}' does not exist")
        if kind == "token":
            user, _, tok = ugid.partition("!")
            if tok not in state["tokens"].get(user, {}):
                raise Fail(f"no such token '{tok}' for user '{user}'")
    propagate = int(opts.get("propagate", "1"))
    for role in roles:
        for kind, ugid in subjects:
            state["acls"] = [
                a
                for a in state["acls"]
                if not (
                    a["path"] == path
                    and a["type"] == kind
                    and a["ugid"] == ugid
                    and a["roleid"] == role
                )
            ]
            if add:
                state["acls"].append(
                    {
                        "path": path,
                        "type": kind,
                        "ugid": ugid,
                        "roleid": role,
                        "propagate": propagate,
                    }
                )


def cmd_pveum(args: list[str], state: dict[str, Any]) -> int:
    pos, opts = parse_opts(args)
    roles, users, tokens = state["roles"], state["users"], state["tokens"]
    head = pos[:2]
    if head == ["role", "list"]:
        dump(
            [
                {"roleid": r, "privs": ",".join(v["privs"]), "special": v["special"]}
                for r, v in roles.items()
            ],
            opts,
        )
    elif head == ["role", "add"]:
        role = pos[2]
        if role in roles:
            raise Fail(f"create role failed: role '{role}' already exists")
        roles[role] = {"privs": check_privs(opts.get("privs", "")), "special": 0}
    elif head == ["role", "modify"]:
        role = pos[2]
        if role not in roles:
            raise Fail(f"update role failed: role '{role}' does not exist")
        if roles[role]["special"]:
            raise Fail(f"cannot modify built-in role '{role}'")
        privs = check_privs(opts.get("privs", ""))
        if opts.get("append") == "1":
            privs = sorted(set(privs) | set(roles[role]["privs"]))
        roles[role]["privs"] = privs
    elif head == ["role", "delete"]:
        role = pos[2]
        if role not in roles:
            raise Fail(f"delete role failed: role '{role}' does not exist")
        del roles[role]
        state["acls"] = [a for a in state["acls"] if a["roleid"] != role]
    elif head == ["user", "list"]:
        dump(
            [
                {"userid": u, "enable": v["enable"], "comment": v["comment"], "expire": 0}
                for u, v in users.items()
            ],
            opts,
        )
    elif head == ["user", "add"]:
        user = user_key(pos[2])
        if user in users:
            raise Fail(f"create user failed: user '{user}' already exists")
        users[user] = {"enable": 1, "comment": opts.get("comment", "")}
    elif head == ["user", "modify"]:
        user = pos[2]
        if user not in users:
            raise Fail(f"update user failed: no such user ('{user}')")
        if "enable" in opts:
            users[user]["enable"] = int(opts["enable"])
    elif head == ["user", "delete"]:
        user = pos[2]
        if user not in users:
            raise Fail(f"delete user failed: no such user ('{user}')")
        del users[user]
        tokens.pop(user, None)
        state["acls"] = [
            a for a in state["acls"] if a["ugid"] != user and not a["ugid"].startswith(user + "!")
        ]
    elif head == ["user", "token"]:
        return pveum_token(pos[2:], opts, state)
    elif head == ["acl", "list"]:
        dump(state["acls"], opts)
    elif head == ["acl", "modify"]:
        pveum_acl(pos, opts, state, add=True)
    elif head == ["acl", "delete"]:
        pveum_acl(pos, opts, state, add=False)
    else:
        raise Fail(f"fake pveum: unsupported {args}", 127)
    return 0


def pveum_token(pos: list[str], opts: dict[str, str], state: dict[str, Any]) -> int:
    users, tokens = state["users"], state["tokens"]
    action, user = pos[0], pos[1]
    if user not in users:
        raise Fail(f"no such user ('{user}')")
    mine = tokens.setdefault(user, {})
    if action == "list":
        dump(
            [
                {"tokenid": t, "privsep": v["privsep"], "expire": 0, "comment": v["comment"]}
                for t, v in mine.items()
            ],
            opts,
        )
        return 0
    name = pos[2]
    if action == "add":
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9.\-_]+", name):
            raise Fail(f"400 Parameter verification failed.\ntokenid: invalid format - '{name}'")
        if name in mine:
            raise Fail("Token already exists.")
        secret = "-".join(os.urandom(n).hex() for n in (4, 2, 2, 2, 6))
        mine[name] = {
            "privsep": int(opts.get("privsep", "1")),
            "comment": opts.get("comment", ""),
            "secret": secret,
        }
        info = {"privsep": mine[name]["privsep"], "expire": 0}
        if opts.get("output-format") in ("json", "json-pretty"):
            dump({"full-tokenid": f"{user}!{name}", "info": info, "value": secret}, opts)
        else:
            out(f"full-tokenid  {user}!{name}\nvalue         {secret}")
        return 0
    if name not in mine:
        raise Fail(f"no such token '{name}' for user '{user}'")
    if action == "remove":
        del mine[name]
        state["acls"] = [a for a in state["acls"] if a["ugid"] != f"{user}!{name}"]
    elif action == "modify":
        if "privsep" in opts:
            mine[name]["privsep"] = int(opts["privsep"])
    elif action == "permissions":
        path = opts.get("path", "/")
        user_privs = effective(state, "user", user, path)
        privs = (
            user_privs & effective(state, "token", f"{user}!{name}", path)
            if mine[name]["privsep"]
            else user_privs
        )
        dump({path: {p: 1 for p in sorted(privs)}}, opts)
    else:
        raise Fail(f"fake pveum: unsupported token action {action}", 127)
    return 0


# --------------------------------------------------------------------------------------------
# pct


def ct_dir(vmid: str) -> Path:
    return state_dir() / "ct" / vmid


def rootfs(vmid: str) -> Path:
    return ct_dir(vmid) / "rootfs"


def inside(vmid: str, path: str) -> Path:
    if not path.startswith("/"):
        raise Fail(f"fake pct: path '{path}' is not absolute", 2)
    root = rootfs(vmid)
    target = Path(os.path.normpath(str(root) + path))
    if target != root and root not in target.parents:
        raise Fail(f"fake pct: path '{path}' escapes the container", 2)
    return target


def get_ct(state: dict[str, Any], vmid: str) -> dict[str, Any]:
    if vmid not in state["cts"]:
        raise Fail(f"Configuration file 'nodes/{NODE}/lxc/{vmid}.conf' does not exist", 2)
    ct: dict[str, Any] = state["cts"][vmid]
    return ct


def need_running(ct: dict[str, Any], vmid: str) -> None:
    if ct["status"] != "running":
        raise Fail(f"CT {vmid} not running")


def storage_kib(spec: str) -> tuple[str, int]:
    storage, _, size = spec.partition(":")
    if not any(s["name"] == storage and "rootdir" in s["content"] for s in storages()):
        raise Fail(f"storage '{storage}' does not support container directories")
    return storage, int(size.split(",")[0])


def mac(vmid: str) -> str:
    import hashlib

    digest = hashlib.sha256(vmid.encode()).hexdigest()
    return "BC:24:11:" + ":".join(digest[i : i + 2].upper() for i in (0, 2, 4))


def parse_net(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if part)


def check_net(text: str, vmid: str) -> str:
    net = parse_net(text)
    if net.get("bridge") not in bridges():
        raise Fail(f"bridge '{net.get('bridge')}' does not exist")
    net.setdefault("hwaddr", mac(vmid))
    net.setdefault("type", "veth")
    return ",".join(f"{k}={v}" for k, v in net.items())


def cmd_pct(args: list[str], state: dict[str, Any]) -> int:
    import shutil

    if args[:1] == ["exec"]:
        return pct_exec(args[1:], state)
    pos, opts = parse_opts(args)
    action = pos[0] if pos else ""
    cts = state["cts"]
    if action == "list":
        lines = ["VMID       Status     Lock         Name"]
        lines += [
            f"{vmid:<10} {ct['status']:<10} {'':<12} {ct['config'].get('hostname', '')}"
            for vmid, ct in sorted(cts.items())
        ]
        out("\n".join(lines))
        return 0
    vmid = pos[1] if len(pos) > 1 else ""
    if action == "create":
        if int(vmid) in all_ids(state):
            raise Fail(f"CT {vmid} already exists on node '{NODE}'")
        template = pos[2]
        tstorage, _, tname = template.partition(":vztmpl/")
        if tname not in state["templates"].get(tstorage, []):
            raise Fail(f"volume '{template}' does not exist")
        storage, size = storage_kib(opts.pop("rootfs"))
        config = {k: v for k, v in opts.items() if k != "start"}
        config["rootfs"] = f"{storage}:vm-{vmid}-disk-0,size={size}G"
        config["net0"] = check_net(config["net0"], vmid)
        config["arch"] = "amd64"
        cts[vmid] = {
            "config": config,
            "status": "stopped",
            "users": ["root"],
            "packages": [],
            "units": {},
            "owners": {},
            "apt_updated": False,
        }
        root = rootfs(vmid)
        (root / "etc").mkdir(parents=True)
        for sub in ("root", "opt", "var/lib", "etc/systemd/system", "usr/bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
        if opts.get("start") == "1":
            cts[vmid]["status"] = "running"
        return 0
    ct = get_ct(state, vmid)
    if action == "status":
        out(f"status: {ct['status']}")
    elif action == "config":
        out("\n".join(f"{k}: {v}" for k, v in sorted(ct["config"].items())))
    elif action == "set":
        for key, value in opts.items():
            ct["config"][key] = check_net(value, vmid) if key == "net0" else value
    elif action == "resize":
        size = pos[3].rstrip("G")
        ct["config"]["rootfs"] = re.sub(r"size=\d+G", f"size={size}G", ct["config"]["rootfs"])
    elif action == "start":
        if ct["status"] == "running":
            raise Fail(f"CT {vmid} already running")
        ct["status"] = "running"
    elif action in ("stop", "shutdown"):
        if ct["status"] != "running":
            raise Fail(f"CT {vmid} not running")
        ct["status"] = "stopped"
        for unit in ct["units"].values():
            unit["active"] = False
    elif action == "destroy":
        if ct["status"] == "running":
            raise Fail(f"CT {vmid} is running - destroy failed")
        del cts[vmid]
        shutil.rmtree(ct_dir(vmid))
    elif action == "push":
        need_running(ct, vmid)
        src, dst = Path(pos[2]), inside(vmid, pos[3])
        if not dst.parent.is_dir():
            raise Fail(f"failed to open {pos[3]} for writing: No such file or directory")
        for key in ("user", "group"):
            name = opts.get(key, "root")
            if not name.isdigit() and name not in ct["users"]:
                raise Fail(f"no such {key} '{name}' in the container")
        shutil.copyfile(src, dst)
        dst.chmod(int(opts.get("perms", "0644"), 8))
        ct["owners"][pos[3]] = f"{opts.get('user', 'root')}:{opts.get('group', 'root')}"
    elif action == "pull":
        need_running(ct, vmid)
        src = inside(vmid, pos[2])
        if not src.is_file():
            raise Fail(f"failed to open {pos[2]}: No such file or directory")
        shutil.copyfile(src, pos[3])
    else:
        raise Fail(f"fake pct: unsupported {args}", 127)
    return 0


# -- pct exec: the commands install.sh runs inside the container


def unit_file(vmid: str, unit: str) -> Path:
    return inside(vmid, f"/etc/systemd/system/{unit}")


def unit_hash(vmid: str, unit: str) -> str:
    path = unit_file(vmid, unit)
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def unit_start(vmid: str, ct: dict[str, Any], unit: str) -> None:
    path = unit_file(vmid, unit)
    if not path.exists():
        raise Fail(f"Failed to start {unit}: Unit {unit} not found.", 5)
    info = ct["units"].setdefault(
        unit, {"enabled": False, "active": False, "loaded": "", "starts": 0}
    )
    if info["loaded"] != unit_hash(vmid, unit):
        raise Fail(f"fake systemd: {unit} changed on disk; run 'systemctl daemon-reload' first", 1)
    keys = dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    env = keys.get("EnvironmentFile", "").lstrip("-")
    if env and not inside(vmid, env).is_file():
        raise Fail(f"{unit}: Failed to load environment files: {env}", 1)
    exe = keys.get("ExecStart", "").split()[0]
    if not os.access(inside(vmid, exe), os.X_OK):
        raise Fail(f"{unit}: Failed to locate executable {exe}: status=203/EXEC", 1)
    if keys.get("User") and keys["User"] not in ct["users"]:
        raise Fail(f"{unit}: Failed to determine user credentials: status=217/USER", 1)
    info["active"] = True
    info["starts"] += 1


def exec_systemctl(vmid: str, ct: dict[str, Any], args: list[str]) -> int:
    quiet = "--quiet" in args
    args = [a for a in args if a not in ("--quiet", "--wait")]
    verb = args[0]
    units = ct["units"]
    if verb == "is-system-running":
        out("running")
        return 0
    if verb == "daemon-reload":
        for name in {
            *units,
            *(p.name for p in inside(vmid, "/etc/systemd/system").glob("*.service")),
        }:
            units.setdefault(name, {"enabled": False, "active": False, "loaded": "", "starts": 0})
            units[name]["loaded"] = unit_hash(vmid, name)
        return 0
    unit = args[-1]
    info = units.get(unit, {"enabled": False, "active": False, "loaded": "", "starts": 0})
    if verb in ("is-active", "is-enabled"):
        flag = info["active"] if verb == "is-active" else info["enabled"]
        if not quiet:
            out(
                ("active" if flag else "inactive")
                if verb == "is-active"
                else ("enabled" if flag else "disabled")
            )
        return 0 if flag else (3 if verb == "is-active" else 1)
    if verb == "enable":
        if not unit_file(vmid, unit).exists():
            raise Fail(f"Failed to enable unit: Unit file {unit} does not exist.", 1)
        units[unit] = info
        info["enabled"] = True
        info["loaded"] = unit_hash(vmid, unit)  # enable reloads the manager
        if "--now" in args and not info["active"]:
            unit_start(vmid, ct, unit)
        return 0
    if verb in ("start", "restart"):
        units[unit] = info
        if verb == "start" and info["active"]:
            return 0
        unit_start(vmid, ct, unit)
        return 0
    if verb == "stop":
        info["active"] = False
        return 0
    raise Fail(f"fake systemctl: unsupported {args}", 127)


def exec_pip(vmid: str, ct: dict[str, Any], venv: str, args: list[str]) -> int:
    if not inside(vmid, f"{venv}/bin/python").exists():
        raise Fail(f"{venv}/bin/pip: not a venv", 127)
    if args[0] != "install":
        raise Fail(f"fake pip: unsupported {args}", 127)
    source = [a for a in args[1:] if not a.startswith("-")]
    if len(source) != 1:
        raise Fail(f"fake pip: expected one source directory, got {source}", 127)
    project = inside(vmid, source[0]) / "pyproject.toml"
    if not project.is_file():
        raise Fail(f"ERROR: Directory '{source[0]}' is not installable (no pyproject.toml).", 1)
    import tomllib

    meta = tomllib.loads(project.read_text())["project"]
    for name, entry in meta.get("scripts", {}).items():
        script = inside(vmid, f"{venv}/bin/{name}")
        module, _, func = entry.partition(":")
        script.write_text(
            f"#!{venv}/bin/python\n"
            f"# console script written by the fake pip ({meta['name']} {meta['version']})\n"
            f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        script.chmod(0o755)
    ct.setdefault("pip_installs", []).append(args[1:])
    return 0


def exec_tar(vmid: str, args: list[str]) -> int:
    rewritten: list[str] = []
    take_path = False
    for arg in args:
        if take_path or arg.startswith("/"):
            rewritten.append(str(inside(vmid, arg)))
        elif (arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) <= set("xczf")) or (
            arg in ("--no-same-owner", "-C", ".")
        ):
            rewritten.append(arg)
        else:
            raise Fail(f"fake tar: unsupported argument {arg}", 127)
        take_path = arg == "-C"
    import subprocess

    return subprocess.call(["tar", *rewritten])


def pct_exec(args: list[str], state: dict[str, Any]) -> int:
    import shutil

    vmid = args[0]
    if args[1:2] != ["--"]:
        raise Fail("fake pct exec: use 'pct exec ID -- CMD...'", 2)
    ct = get_ct(state, vmid)
    need_running(ct, vmid)
    cmd = args[2:]
    while cmd and cmd[0] == "env":
        cmd = cmd[1:]
        while cmd and "=" in cmd[0] and not cmd[0].startswith("/"):
            cmd = cmd[1:]
    prog = cmd[0]
    rest = cmd[1:]

    def p(path: str) -> Path:
        return inside(vmid, path)

    if prog == "systemctl":
        return exec_systemctl(vmid, ct, rest)
    if prog == "apt-get":
        if rest[0] == "update":
            ct["apt_updated"] = True
            return 0
        if rest[0] == "install":
            if not ct["apt_updated"]:
                raise Fail("E: Unable to locate package python3-venv", 100)
            ct["packages"] += [a for a in rest[1:] if not a.startswith("-")]
            return 0
    if prog == "id" and rest[:1] == ["-u"]:
        if rest[1] in ct["users"]:
            out(str(100 + ct["users"].index(rest[1])) if rest[1] != "root" else "0")
            return 0
        sys.stderr.write(f"id: '{rest[1]}': no such user\n")
        return 1
    if prog == "useradd":
        name = rest[-1]
        if name in ct["users"]:
            sys.stderr.write(f"useradd: user '{name}' already exists\n")
            return 9
        ct["users"].append(name)
        return 0
    if prog == "hostname" and rest == ["-I"]:
        net = parse_net(ct["config"]["net0"])
        ip = (
            net["ip"].split("/")[0]
            if net["ip"] != "dhcp"
            else os.environ.get("FAKE_CT_DHCP_IP", "192.0.2.50")
        )
        out(ip + " ")
        return 0
    if prog == "test" and len(rest) == 2:
        flag, target = rest[0], p(rest[1])
        checks = {
            "-e": target.exists(),
            "-f": target.is_file(),
            "-d": target.is_dir(),
            "-x": target.exists() and os.access(target, os.X_OK),
        }
        return 0 if checks[flag] else 1
    if prog == "mkdir":
        for path in (a for a in rest if not a.startswith("-")):
            p(path).mkdir(parents="-p" in rest, exist_ok="-p" in rest)
        return 0
    if prog == "rm":
        for path in (a for a in rest if not a.startswith("-")):
            target = p(path)
            if target.is_dir() and not target.is_symlink():
                if "-rf" not in rest:
                    raise Fail(f"rm: cannot remove '{path}': Is a directory", 1)
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return 0
    if prog == "mv" and len(rest) == 2:
        p(rest[0]).rename(p(rest[1]))
        return 0
    if prog == "chmod" and len(rest) == 2:
        p(rest[1]).chmod(int(rest[0], 8))
        return 0
    if prog == "chown":
        owner, paths = rest[-2], rest[-1:]
        for name in owner.split(":"):
            if name not in ct["users"]:
                raise Fail(f"chown: invalid user: '{owner}'", 1)
        for path in paths:
            if not p(path).exists():
                raise Fail(f"chown: cannot access '{path}': No such file or directory", 1)
            ct["owners"][path] = owner + (" -R" if "-R" in rest else "")
        return 0
    if prog == "tar":
        return exec_tar(vmid, rest)
    if prog == "python3" and rest[:2] == ["-m", "venv"]:
        if "python3-venv" not in ct["packages"]:
            out("The virtual environment was not created successfully: ensurepip is not available.")
            return 1
        venv = p(rest[2])
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
        for name in ("python", "python3", "pip"):
            (venv / "bin" / name).write_text("#!/bin/sh\n# fake venv\n")
            (venv / "bin" / name).chmod(0o755)
        return 0
    if prog.endswith("/bin/pip"):
        return exec_pip(vmid, ct, prog[: -len("/bin/pip")], rest)
    if prog.endswith("/bin/python") and rest[:1] == ["-c"] and "urlopen" in rest[1]:
        unit = ct["units"].get("ctrlable-companion.service", {})
        if unit.get("active"):
            return 0
        sys.stderr.write("urllib.error.URLError: <urlopen error [Errno 111] Connection refused>\n")
        return 1
    raise Fail(f"fake pct exec: unsupported command {cmd}", 127)


# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[list[str], dict[str, Any]], int]] = {
    "pveversion": cmd_pveversion,
    "pveum": cmd_pveum,
    "pct": cmd_pct,
    "pveam": cmd_pveam,
    "pvesh": cmd_pvesh,
    "pvesm": cmd_pvesm,
    "pvenode": cmd_pvenode,
    "qm": cmd_qm,
    "ip": cmd_ip,
    "uname": cmd_uname,
    "id": cmd_id,
}


def main(tool: str, args: list[str]) -> int:
    try:
        if tool not in ("uname", "id"):
            record(tool, args)
            fail_on = os.environ.get("FAKE_FAIL_ON", "")
            if fail_on and " ".join([tool, *args]).startswith(fail_on):
                raise Fail(f"{tool}: injected failure (FAKE_FAIL_ON={fail_on!r})")
        state = load_state() if tool not in ("uname", "id", "ip") else {}
        before = json.dumps(state, sort_keys=True)
        code = COMMANDS[tool](args, state)
        if state and json.dumps(state, sort_keys=True) != before:
            save_state(state)
        return code
    except Fail as err:
        sys.stderr.write(err.message + "\n")
        return err.code
