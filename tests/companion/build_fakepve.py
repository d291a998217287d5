#!/usr/bin/env python3
"""A fake Proxmox VE host for the build wrapper's tests: pct, qm, pvesh, pvesm, pveam, pveversion.

One program; the tool is the name it is called by (symlinks). It records every call in
``$FAKE_PVE_STATE/calls.jsonl`` and keeps guests as PVE does: configs in
``$CTRLABLE_BUILD_ROOT/etc/pve/{lxc,qemu-server}/<vmid>.conf``, a container's files in
``$FAKE_PVE_STATE/guests/<vmid>/rootfs``. ``pct exec`` runs a small set of commands against that
rootfs (``bash`` scripts get ``CTRLABLE_GUEST_ROOT`` pointing at it). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_PVE_STATE"])
ROOT = Path(os.environ.get("CTRLABLE_BUILD_ROOT", "/"))
LXC_DIR = ROOT / "etc/pve/lxc"
QEMU_DIR = ROOT / "etc/pve/qemu-server"
STORAGES = {
    # name: (type, contents)
    "local": ("dir", {"vztmpl", "iso", "backup", "snippets"}),
    "local-lvm": ("lvmthin", {"rootdir", "images"}),
}


def record(tool: str, argv: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "calls.jsonl").open("a") as out:
        out.write(json.dumps({"tool": tool, "argv": argv}) + "\n")


def fail(message: str, code: int = 255) -> None:
    sys.stderr.write(message + "\n")
    raise SystemExit(code)


def conf_path(vmid: str) -> tuple[str, Path] | None:
    for kind, directory in (("lxc", LXC_DIR), ("qemu", QEMU_DIR)):
        path = directory / f"{vmid}.conf"
        if path.exists():
            return kind, path
    return None


def read_conf(path: Path) -> list[tuple[str, str]]:
    items = []
    for line in path.read_text().splitlines():
        if line.startswith("[") or not line.strip():
            break
        key, _, value = line.partition(":")
        items.append((key.strip(), value.strip()))
    return items


def write_conf(path: Path, items: list[tuple[str, str]]) -> None:
    text = path.read_text() if path.exists() else ""
    tail = text[text.index("\n[") :] if "\n[" in text else ""
    path.write_text("".join(f"{k}: {v}\n" for k, v in items) + tail)


def set_key(items: list[tuple[str, str]], key: str, value: str) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in items if k != key]
    out.append((key, value))
    return out


def options(args: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            result[arg[2:]] = args[i + 1]
            i += 2
        else:
            result[arg[2:]] = "1"
            i += 1
    return result


def guest_dir(vmid: str) -> Path:
    return STATE / "guests" / vmid


def status(vmid: str) -> str:
    path = guest_dir(vmid) / "status"
    return path.read_text().strip() if path.exists() else "stopped"


def set_status(vmid: str, value: str) -> None:
    guest_dir(vmid).mkdir(parents=True, exist_ok=True)
    (guest_dir(vmid) / "status").write_text(value)


def need(kind: str, vmid: str) -> Path:
    found = conf_path(vmid)
    if found is None or found[0] != kind:
        where = "lxc" if kind == "lxc" else "qemu-server"
        fail(f"Configuration file 'nodes/pve/{where}/{vmid}.conf' does not exist", 2)
    assert found is not None
    return found[1]


def is_template(path: Path) -> bool:
    return ("template", "1") in read_conf(path)


# ---------------------------------------------------------------------------------------- pct


def rootfs(vmid: str) -> Path:
    return guest_dir(vmid) / "rootfs"


def inside(vmid: str, path: str) -> str:
    return str(rootfs(vmid)) + path if path.startswith("/") else path


def pct_exec(vmid: str, cmd: list[str]) -> int:
    if status(vmid) != "running":
        fail(f"CT {vmid} not running")
    fs = rootfs(vmid)
    env = {**os.environ, "CTRLABLE_GUEST_ROOT": str(fs)}
    if cmd[:2] == ["systemctl", "is-active"]:
        active = (fs / ".fake/units" / cmd[2]).exists()
        print("active" if active else "inactive")
        return 0 if active else 3
    if cmd[0] == "systemctl":
        return 0
    if cmd[0] == "bash" and len(cmd) >= 3 and cmd[1] == "-c":
        return subprocess.call(["bash", "-c", cmd[2], *cmd[3:]], env=env)
    if cmd[0] == "bash" and len(cmd) >= 2:
        return subprocess.call(["bash", inside(vmid, cmd[1]), *cmd[2:]], env=env)
    if cmd[0] == "docker":
        if not (fs / "usr/bin/docker").exists():
            fail("bash: docker: command not found", 127)
        log = fs / ".fake/docker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(" ".join(cmd[1:]) + "\n")
        return 0
    if cmd[0] in ("cat", "mkdir", "rm", "ls", "test"):
        return subprocess.call([cmd[0], *(inside(vmid, a) for a in cmd[1:])])
    fail(f"fake pct exec: {cmd!r} is not emulated", 1)
    return 1


def make_rootfs(vmid: str, hostname: str) -> None:
    fs = rootfs(vmid)
    for sub in ("etc/ssh", "root", "tmp", "usr/bin", "var/lib/dbus", ".fake/units", "opt"):
        (fs / sub).mkdir(parents=True, exist_ok=True)
    (fs / "etc/machine-id").write_text(os.urandom(16).hex() + "\n")
    (fs / "etc/hostname").write_text(hostname + "\n")
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (fs / "etc/ssh" / name).write_text("key\n")
    for tool in ("curl", "python3", "ssh-keygen"):
        (fs / "usr/bin" / tool).write_text("#!/bin/sh\n")
        (fs / "usr/bin" / tool).chmod(0o755)


def pct(args: list[str]) -> int:
    sub = args[0]
    if sub == "list":
        for path in sorted(LXC_DIR.glob("*.conf")):
            print(path.stem, status(path.stem))
        return 0
    vmid = args[1]
    if sub == "create":
        if conf_path(vmid) is not None:
            fail(f"unable to create CT {vmid} - CT {vmid} already exists", 255)
        opts = options(args[3:])
        LXC_DIR.mkdir(parents=True, exist_ok=True)
        storage, _, size = opts.get("rootfs", "local-lvm:8").partition(":")
        items = [
            ("arch", "amd64"),
            ("cores", opts.get("cores", "1")),
            ("hostname", opts.get("hostname", f"CT{vmid}")),
            ("memory", opts.get("memory", "512")),
            ("net0", opts.get("net0", "name=eth0,bridge=vmbr0,ip=dhcp")),
            ("onboot", "1"),
            ("ostype", "debian"),
            ("rootfs", f"{storage}:vm-{vmid}-disk-0,size={size}G"),
            ("swap", "512"),
            ("tags", opts.get("tags", "community-script")),
            ("unprivileged", opts.get("unprivileged", "0")),
        ]
        write_conf(LXC_DIR / f"{vmid}.conf", items)
        make_rootfs(vmid, opts.get("hostname", f"CT{vmid}"))
        set_status(vmid, "stopped")
        return 0
    path = need("lxc", vmid)
    if sub == "status":
        print(f"status: {status(vmid)}")
        return 0
    if sub == "config":
        sys.stdout.write(path.read_text())
        return 0
    if sub == "start":
        if is_template(path):
            fail("cannot start a template", 255)
        set_status(vmid, "running")
        return 0
    if sub in ("stop", "shutdown"):
        set_status(vmid, "stopped")
        return 0
    if sub == "unlock":
        return 0
    if sub == "set":
        opts = options(args[2:])
        items = read_conf(path)
        for key, value in opts.items():
            if key == "delete":
                items = [(k, v) for k, v in items if k not in value.split(",")]
            else:
                items = set_key(items, key, value)
        write_conf(path, items)
        return 0
    if sub == "exec":
        if "--" not in args:
            fail("pct exec needs --")
        return pct_exec(vmid, args[args.index("--") + 1 :])
    if sub == "push":
        if status(vmid) != "running":
            fail(f"CT {vmid} not running")
        src, dst = args[2], args[3]
        target = Path(inside(vmid, dst))
        if not target.parent.is_dir():
            fail(f"failed to open {dst}: No such file or directory")
        shutil.copyfile(src, target)
        opts = options(args[4:])
        if "perms" in opts:
            target.chmod(int(opts["perms"], 8))
        return 0
    if sub == "destroy":
        opts = options(args[2:])
        if status(vmid) == "running" and opts.get("force") != "1":
            fail(f"CT {vmid} is running - destroy failed")
        path.unlink()
        shutil.rmtree(guest_dir(vmid), ignore_errors=True)
        return 0
    if sub == "template":
        if status(vmid) == "running":
            fail("CT is running")
        write_conf(path, set_key(read_conf(path), "template", "1"))
        return 0
    fail(f"fake pct: {sub} is not emulated")
    return 1


# ----------------------------------------------------------------------------------------- qm


def qm(args: list[str]) -> int:
    if args[:2] == ["disk", "import"]:
        vmid, image, storage = args[2], args[3], args[4]
        path = need("qemu", vmid)
        if not Path(image).is_file():
            fail(f"cannot import {image}: no such file")
        items = read_conf(path)
        disk = f"{storage}:vm-{vmid}-disk-0"
        write_conf(path, [*items, ("unused0", disk)])
        print(f"Successfully imported disk as 'unused0:{disk}'")
        return 0
    sub, vmid = args[0], args[1]
    if sub == "create":
        if conf_path(vmid) is not None:
            fail(f"unable to create VM {vmid} - VM {vmid} already exists")
        QEMU_DIR.mkdir(parents=True, exist_ok=True)
        write_conf(QEMU_DIR / f"{vmid}.conf", list(options(args[2:]).items()))
        set_status(vmid, "stopped")
        return 0
    path = need("qemu", vmid)
    if sub == "config":
        sys.stdout.write(path.read_text())
        return 0
    if sub == "status":
        print(f"status: {status(vmid)}")
        return 0
    if sub == "set":
        items = read_conf(path)
        for key, value in options(args[2:]).items():
            if key == "delete":
                items = [(k, v) for k, v in items if k not in value.split(",")]
                continue
            if key.startswith("scsi") and any(v == value.split(",")[0] for _, v in items):
                items = [(k, v) for k, v in items if not k.startswith("unused")]
            items = set_key(items, key, value)
        write_conf(path, items)
        return 0
    if sub == "resize":
        items = read_conf(path)
        items = [
            (k, (re.sub(r",size=[^,]*", "", v) + f",size={args[3]}") if k == args[2] else v)
            for k, v in items
        ]
        write_conf(path, items)
        return 0
    if sub == "start":
        set_status(vmid, "running")
        return 0
    if sub in ("stop", "shutdown"):
        set_status(vmid, "stopped")
        return 0
    if sub == "unlock":
        return 0
    if sub == "template":
        if status(vmid) == "running":
            fail("VM is running")
        write_conf(path, set_key(read_conf(path), "template", "1"))
        return 0
    if sub == "destroy":
        path.unlink()
        shutil.rmtree(guest_dir(vmid), ignore_errors=True)
        return 0
    fail(f"fake qm: {sub} is not emulated")
    return 1


# ------------------------------------------------------------------------------ pvesh and co


def pvesh(args: list[str]) -> int:
    if args[:2] == ["get", "/cluster/resources"]:
        out = []
        for kind, directory in (("lxc", LXC_DIR), ("qemu", QEMU_DIR)):
            for path in sorted(directory.glob("*.conf")) if directory.is_dir() else []:
                conf = dict(read_conf(path))
                out.append(
                    {
                        "vmid": int(path.stem),
                        "type": kind,
                        "node": "pve",
                        "name": conf.get("hostname") or conf.get("name"),
                        "status": status(path.stem),
                        "template": int(conf.get("template", "0")),
                        "tags": conf.get("tags", ""),
                    }
                )
        print(json.dumps(out))
        return 0
    if args[:2] == ["get", "/cluster/nextid"]:
        used = {int(p.stem) for d in (LXC_DIR, QEMU_DIR) if d.is_dir() for p in d.glob("*.conf")}
        print(next(i for i in range(100, 1_000_000) if i not in used))
        return 0
    fail(f"fake pvesh: {args!r} is not emulated")
    return 1


def pvesm(args: list[str]) -> int:
    if args[0] != "status":
        fail(f"fake pvesm: {args!r} is not emulated")
    content = options(args[1:]).get("content")
    print(
        "Name             Type     Status           Total            Used       Available        %"
    )
    for name, (kind, contents) in STORAGES.items():
        if content is None or content in contents:
            print(f"{name:<16} {kind:<8} active     100000000   20000000   80000000   20.00%")
    return 0


def pveam(args: list[str]) -> int:
    if args and args[0] == "available":
        print("system          debian-12-standard_12.7-1_amd64.tar.zst")
    return 0


def main() -> int:
    tool = Path(sys.argv[0]).name
    args = sys.argv[1:]
    record(tool, args)
    if tool == "pveversion":
        print("pve-manager/8.3.2/3e76eec21c4a14a7 (running kernel: 6.8.12-4-pve)")
        return 0
    handler = {"pct": pct, "qm": qm, "pvesh": pvesh, "pvesm": pvesm, "pveam": pveam}[tool]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
