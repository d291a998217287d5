"""install.sh against fake PVE tools (tests/companion/fakes/pve), with every host path redirected.

The fakes record each call (argv as JSON lines) and keep PVE's state (role, users, tokens, ACLs,
containers, templates) in a temp dir, so a second run sees the first run's objects. The
orchestrator container's filesystem is a directory; `pct exec` emulates the commands install.sh runs
inside it. Facts checked against: shared/reference/proxmox-api.md section 8 (role privileges, pveum
commands, privilege-separated token, ACLs for the user and the token).
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from companion.cli import _parser
from companion.settings import Settings, read_env_file

REPO = Path(__file__).resolve().parents[2]
FAKES = Path(__file__).resolve().parent / "fakes" / "pve"

# proxmox-api.md section 8: exactly these privileges, on a role, for the user and the token,
# plus the guest-agent read of the HAOS flow (VM.Monitor on the fakes' PVE 8.3).
PRIVS = (
    "VM.Audit VM.Clone VM.Allocate VM.Config.Network VM.Config.Options VM.PowerMgmt "
    "Datastore.AllocateSpace Datastore.Audit Sys.Audit SDN.Use VM.Monitor"
)
ROLE = "CtrlableProvisioner"
USER = "ctrlable@pve"
TOKEN = "ctrlable@pve!provisioner"
AUTH_PREFIX = (
    'command="/usr/local/sbin/ctrlable-build",no-pty,no-port-forwarding,no-agent-forwarding,'
    "no-X11-forwarding ssh-ed25519 "
)
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIadminadminadminadminadminadminadmin admin@laptop"
SOURCE_ITEMS = (
    "install.sh",
    "pyproject.toml",
    "README.md",
    "companion",
    "releases",
    "deploy",
    "host",
    "firstboot",
)

# Read-only forms of the fake tools' calls; everything else counts as a change.
READ_ONLY_EXEC = (
    ["systemctl", "is-system-running"],
    ["systemctl", "is-active"],
    ["systemctl", "is-enabled"],
    ["hostname", "-I"],
    ["test"],
    ["id", "-u"],
    ["/opt/ctrlable/venv/bin/python", "-c"],
)


def is_mutating(call: dict[str, Any]) -> bool:
    tool, argv = call["tool"], call["argv"]
    if tool in ("pveversion", "pvesm", "pvenode", "ip"):
        return False
    if tool == "pvesh":
        return argv[0] != "get"
    if tool == "pveam":
        return argv[0] not in ("list", "available")
    if tool == "qm":
        return argv[0] != "list"
    if tool == "pveum":
        return not (
            argv[1:2] == ["list"]
            or argv[:3] in (["user", "token", "list"], ["user", "token", "permissions"])
        )
    if tool == "pct":
        if argv[0] in ("list", "status", "config", "pull"):
            return False
        if argv[0] == "exec":
            cmd = argv[3:]
            return not any(cmd[: len(ro)] == list(ro) for ro in READ_ONLY_EXEC)
        return True
    raise AssertionError(f"unclassified call {call}")


@dataclass
class Host:
    """A sandboxed 'PVE host': redirected root, fake PVE state, a copy of the source tree."""

    base: Path
    src: Path
    fingerprint: str
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state_dir(self) -> Path:
        return self.base / "pve"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "CTRLABLE_"))}
        env.update(
            PATH=f"{self.base / 'bin'}:{FAKES}:{env.get('PATH', '/usr/bin:/bin')}",
            CTRLABLE_ROOT=str(self.root),
            FAKE_PVE_STATE=str(self.state_dir),
            CTRLABLE_INSTALL_ALLOW_NONROOT="1",
            CTRLABLE_INSTALL_POLL_SECONDS="0",
            CTRLABLE_INSTALL_POLL_TRIES="3",
            TMPDIR=str(self.base / "tmp"),
            PYTHONDONTWRITEBYTECODE="",
            PYTHONPYCACHEPREFIX=str(self.base.parent / "pycache"),
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.src / "install.sh"), *args],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, **extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def calls(self, since: int = 0) -> list[dict[str, Any]]:
        path = self.state_dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()][since:]

    def changes(self, since: int = 0) -> list[dict[str, Any]]:
        return [c for c in self.calls(since) if is_mutating(c)]

    def pve(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def set_pve(self, data: dict[str, Any]) -> None:
        (self.state_dir / "state.json").write_text(json.dumps(data))

    def ct(self, vmid: str = "100") -> Path:
        return self.state_dir / "ct" / vmid / "rootfs"

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        """Every file under the root and the fake PVE state (minus the call log)."""
        files: dict[str, tuple[int, bytes]] = {}
        for top in (self.root, self.state_dir):
            for path in sorted(top.rglob("*")):
                if path.is_file() and path.name != "calls.jsonl":
                    files[str(path)] = (path.stat().st_mode, path.read_bytes())
        return files


def _write_python_shim(bin_dir: Path) -> None:
    """`python3` for the fakes' shebang: this interpreter, without site (fast start)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python3"
    shim.unlink(missing_ok=True)  # never write through an existing symlink
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    shim.chmod(0o755)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frozen copy of the checkout (the real tree changes under parallel work)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in SOURCE_ITEMS:
        path = REPO / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=ignore)
        else:
            shutil.copy2(path, src / item)
    return src


@pytest.fixture(scope="module")
def host_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The PVE host's SSH host key and API certificate (made once)."""
    base = tmp_path_factory.mktemp("hostkeys")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "hostkey")], check=True
    )
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=pve.example", "-keyout", str(base / "key.pem"), "-out", str(base / "pve-ssl.pem")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        ["openssl", "x509", "-in", str(base / "pve-ssl.pem"), "-noout", "-fingerprint", "-sha256"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return base / "hostkey.pub", base / "pve-ssl.pem", out.strip().split("=", 1)[1].upper()


def make_host(base: Path, src: Path, material: tuple[Path, Path, str]) -> Host:
    host_key, cert, fingerprint = material
    host = Host(base=base, src=src, fingerprint=fingerprint)
    for sub in ("etc/ssh", "etc/pve/local", "root/.ssh"):
        (host.root / sub).mkdir(parents=True, exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    host.state_dir.mkdir(exist_ok=True)
    shutil.copy(host_key, host.root / "etc/ssh/ssh_host_ed25519_key.pub")
    shutil.copy(cert, host.root / "etc/pve/local/pve-ssl.pem")
    (host.root / "root/.ssh/authorized_keys").write_text(ADMIN_KEY + "\n")
    _write_python_shim(base / "bin")
    return host


@pytest.fixture
def host(tmp_path: Path, source_tree: Path, host_material: tuple[Path, Path, str]) -> Host:
    return make_host(tmp_path / "host", source_tree, host_material)


@pytest.fixture(scope="module")
def installed_once(
    tmp_path_factory: pytest.TempPathFactory,
    source_tree: Path,
    host_material: tuple[Path, Path, str],
) -> tuple[Host, subprocess.CompletedProcess[str]]:
    """One fresh install (default options, --pve-host detected from vmbr0), shared read-only."""
    host = make_host(tmp_path_factory.mktemp("installed") / "host", source_tree, host_material)
    return host, host.ok()


@pytest.fixture
def installed(tmp_path: Path, installed_once: tuple[Host, Any]) -> Host:
    """A private copy of the installed host, for tests that change it."""
    template, _ = installed_once
    base = tmp_path / "host"
    shutil.copytree(template.base, base, symlinks=True)
    host = Host(base=base, src=template.src, fingerprint=template.fingerprint)
    # The build wrapper's conf names its token file by absolute path: relocate it.
    conf = host.root / "etc/ctrlable/ctrlable-build.conf"
    conf.write_text(conf.read_text().replace(str(template.base), str(base)))
    _write_python_shim(base / "bin")
    return host


def env_of(host: Host, vmid: str = "100") -> dict[str, str]:
    return read_env_file(host.ct(vmid) / "etc/ctrlable/.env")


def unit_of(host: Host, vmid: str = "100") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(
        (host.ct(vmid) / "etc/systemd/system/ctrlable-companion.service").read_text()
    )
    return parser


# ------------------------------------------------------------------------------------------------
# A fresh install


def test_fresh_install_pveum_calls_and_privileges(installed_once: tuple[Host, Any]) -> None:
    host, _ = installed_once
    pveum = [c["argv"] for c in host.changes() if c["tool"] == "pveum"]
    assert pveum == [
        ["role", "add", ROLE, "--privs", PRIVS],
        ["user", "add", USER, "--comment", "Ctrlable provisioner (install.sh)"],
        ["user", "token", "add", USER, "provisioner", "--privsep", "1",
         "--comment", "Ctrlable companion (install.sh)", "--output-format", "json"],
        ["acl", "modify", "/", "--users", USER, "--roles", ROLE],
        ["acl", "modify", "/", "--tokens", TOKEN, "--roles", ROLE],
    ]  # fmt: skip
    pve = host.pve()
    assert sorted(pve["roles"][ROLE]["privs"]) == sorted(PRIVS.split())
    assert pve["tokens"][USER]["provisioner"]["privsep"] == 1
    assert {(a["type"], a["ugid"], a["path"], a["roleid"]) for a in pve["acls"]} == {
        ("user", USER, "/", ROLE),
        ("token", TOKEN, "/", ROLE),
    }
    # The secret comes from the token-add response, and only the orchestrator's config holds it.
    secret = pve["tokens"][USER]["provisioner"]["secret"]
    assert env_of(host)["CTRLABLE_PVE_TOKEN_SECRET"] == secret
    # The installer verified the effective (user AND token) privileges.
    assert ["user", "token", "permissions", USER, "provisioner", "--path", "/",
            "--output-format", "json"] in [c["argv"] for c in host.calls()]  # fmt: skip


def test_fresh_install_container(installed_once: tuple[Host, Any]) -> None:
    host, result = installed_once
    pct = [c["argv"] for c in host.changes() if c["tool"] in ("pct", "pveam")]
    assert pct[0] == ["update"]
    assert pct[1] == ["download", "local", "debian-12-standard_12.7-1_amd64.tar.zst"]
    create = pct[2]
    assert create[:3] == ["create", "100", "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"]
    opts = dict(zip(create[3::2], create[4::2], strict=True))
    assert opts["--unprivileged"] == "1"
    assert opts["--features"] == "nesting=1"
    assert opts["--tags"] == "ctrlable-orchestrator"
    assert opts["--rootfs"] == "local-lvm:8"
    assert opts["--net0"] == "name=eth0,bridge=vmbr0,firewall=1,ip=dhcp"
    assert (opts["--cores"], opts["--memory"], opts["--swap"], opts["--onboot"]) == (
        "2",
        "1024",
        "512",
        "1",
    )
    assert pct[3] == ["start", "100"]
    ct = host.pve()["cts"]["100"]
    assert ct["status"] == "running"
    assert ct["units"]["ctrlable-companion.service"]["enabled"] is True
    assert ct["units"]["ctrlable-companion.service"]["active"] is True
    assert "python3-venv" in ct["packages"]
    assert "ctrlable" in ct["users"]
    # .env root-only; the build key readable by the service user only.
    assert ct["owners"]["/etc/ctrlable/.env"] == "root:root"
    assert (host.ct() / "etc/ctrlable/.env").stat().st_mode & 0o777 == 0o600
    assert ct["owners"]["/etc/ctrlable/build_ed25519"] == "ctrlable:ctrlable"
    assert (host.ct() / "etc/ctrlable/build_ed25519").stat().st_mode & 0o777 == 0o600
    # The source went in as a tarball and the venv was made from it.
    assert (host.ct() / "opt/ctrlable/src/pyproject.toml").is_file()
    assert not (host.ct() / "opt/ctrlable/source.tar.gz").exists()
    # What the dealer sees last: URL, pairing token, zeroconf.
    token = env_of(host)["CTRLABLE_API_TOKEN"]
    assert len(token) == 64
    assert "Companion URL:  http://192.0.2.50:8580" in result.stdout
    assert f"Pairing token:  {token}" in result.stdout
    assert "zeroconf" in result.stdout
    assert env_of(host)["CTRLABLE_PVE_TOKEN_SECRET"] not in result.stdout + result.stderr


def test_fresh_install_host_files(installed_once: tuple[Host, Any]) -> None:
    host, _ = installed_once
    etc = host.root / "etc/ctrlable"
    pub = (etc / "orchestrator_ed25519.pub").read_text().split()
    lines = (host.root / "root/.ssh/authorized_keys").read_text().splitlines()
    assert lines == [ADMIN_KEY, f"{AUTH_PREFIX}{pub[1]} ctrlable-orchestrator"]
    # The companion holds the same private key and pins the host key (no trust on first use).
    assert (host.ct() / "etc/ctrlable/build_ed25519").read_bytes() == (
        etc / "orchestrator_ed25519"
    ).read_bytes()
    host_key = (host.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    known = (host.ct() / "etc/ctrlable/known_hosts").read_text()
    assert known == f"192.0.2.10 ssh-ed25519 {host_key[1]}\n"
    # The build wrapper, its first-boot files and its conf.
    wrapper = host.root / "usr/local/sbin/ctrlable-build"
    assert wrapper.read_bytes() == (host.src / "host/ctrlable-build").read_bytes()
    assert wrapper.stat().st_mode & 0o777 == 0o755
    share = host.root / "usr/local/share/ctrlable-build/firstboot"
    assert (share / "ctrlable-firstboot.sh").read_bytes() == (
        host.src / "firstboot/ctrlable-firstboot.sh"
    ).read_bytes()
    conf = read_env_file(etc / "ctrlable-build.conf")
    assert conf == {
        "COMPANION_URL": "http://192.0.2.50:8580",
        "COMPANION_TOKEN_FILE": str(etc / "companion-token"),
        "CONTAINER_STORAGE": "local-lvm",
        "TEMPLATE_STORAGE": "local",
        "BRIDGE": "vmbr0",
        "SERVE_ADDRESS": "192.0.2.10",
    }
    assert (etc / "companion-token").read_text().strip() == env_of(host)["CTRLABLE_API_TOKEN"]
    for secret_file in (
        "install.env",
        "orchestrator_ed25519",
        "companion-token",
        "ctrlable-build.conf",
    ):
        assert (etc / secret_file).stat().st_mode & 0o777 == 0o600, secret_file
    assert etc.stat().st_mode & 0o777 == 0o700


def test_env_matches_companion_settings(installed_once: tuple[Host, Any]) -> None:
    host, _ = installed_once
    env = env_of(host)
    known = set(Settings.field_env_names().values())
    assert set(env) <= known, f"keys serve does not know: {set(env) - known}"
    settings = Settings.load(environ={}, env_file=host.ct() / "etc/ctrlable/.env")
    assert settings.api_token.get_secret_value() == env["CTRLABLE_API_TOKEN"]
    assert settings.firstboot_secret.get_secret_value()
    assert settings.firstboot_secret.get_secret_value() != env["CTRLABLE_API_TOKEN"]
    assert settings.pve_token_secret.get_secret_value()
    assert settings.pve_url == "https://192.0.2.10:8006"
    assert settings.pve_token_id == TOKEN
    assert settings.pve_fingerprint == host.fingerprint
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 8580)
    assert settings.public_url == "http://192.0.2.50:8580"
    assert settings.mdns is True
    assert settings.build_ssh_host == "192.0.2.10"
    assert settings.build_ssh_key_file == Path("/etc/ctrlable/build_ed25519")
    assert settings.build_ssh_known_hosts == Path("/etc/ctrlable/known_hosts")
    # Every path the companion is told about exists in the container as installed.
    for path in (
        settings.releases_dir,
        settings.build_ssh_key_file,
        settings.build_ssh_known_hosts,
    ):
        assert path is not None
        assert (host.ct() / str(path).lstrip("/")).exists(), path
    assert list((host.ct() / str(settings.releases_dir).lstrip("/")).glob("*.yaml"))


def test_unit_matches_what_serve_reads(installed_once: tuple[Host, Any]) -> None:
    host, _ = installed_once
    text = (host.ct() / "etc/systemd/system/ctrlable-companion.service").read_bytes()
    assert text == (REPO / "deploy/ctrlable-companion.service").read_bytes()
    svc = unit_of(host)["Service"]
    exe, *args = svc["ExecStart"].split()
    assert args == ["serve"]
    assert _parser().parse_args(args).command == "serve"
    # The executable is the console script pip made in the venv install.sh created...
    script = host.ct() / exe.lstrip("/")
    assert exe == "/opt/ctrlable/venv/bin/ctrlable-companion"
    assert os.access(script, os.X_OK)
    assert (host.ct() / "opt/ctrlable/venv/pyvenv.cfg").is_file()
    # ...from the entry point the installed source declares, which is the CLI that has `serve`.
    project = tomllib.loads((host.ct() / "opt/ctrlable/src/pyproject.toml").read_text())
    module, _, func = project["project"]["scripts"]["ctrlable-companion"].partition(":")
    assert f"from {module} import {func}" in script.read_text()
    assert module == "companion.cli"
    assert callable(getattr(importlib.import_module(module), func))
    assert svc["EnvironmentFile"] == "/etc/ctrlable/.env"
    assert svc["User"] == "ctrlable"
    assert svc["User"] in host.pve()["cts"]["100"]["users"]
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert "/var/lib/" + svc["StateDirectory"] == env_of(host)["CTRLABLE_DATA_DIR"]
    assert svc["CapabilityBoundingSet"] == ""
    assert unit_of(host)["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = (REPO / "deploy/ctrlable-companion.service").read_text()
    exe = "/opt/ctrlable/venv/bin/ctrlable-companion"
    assert exe in text
    unit = tmp_path / "ctrlable-companion.service"
    unit.write_text(text.replace(exe, shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr, result.stderr
    assert "ignoring" not in result.stderr, result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_starts_from_the_written_env(
    installed_once: tuple[Host, Any], tmp_path: Path
) -> None:
    """`ctrlable-companion serve` with the installed .env as its environment answers /api/health.

    Only what cannot exist outside the container is overridden: the bind address (loopback here),
    the data and releases directories, and mDNS.
    """
    host, _ = installed_once
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRLABLE_")}
    env.update(env_of(host))
    env.update(
        CTRLABLE_LISTEN_HOST="127.0.0.1",
        CTRLABLE_LISTEN_PORT=str(port),
        CTRLABLE_DATA_DIR=str(tmp_path / "data"),
        CTRLABLE_RELEASES_DIR=str(REPO / "releases"),
        CTRLABLE_MDNS="false",
    )
    exe = Path(sys.executable).parent / "ctrlable-companion"
    proc = subprocess.Popen(
        [str(exe), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(0.2)
        assert status == 200, proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------------------------------
# Re-runs


def test_second_run_changes_nothing(installed: Host) -> None:
    before = installed.snapshot()
    mark = len(installed.calls())
    result = installed.ok()
    assert installed.changes(mark) == []
    assert installed.snapshot() == before
    assert "Pairing token:  " + env_of(installed)["CTRLABLE_API_TOKEN"] in result.stdout


def test_second_run_upgrades_changed_source(installed: Host, tmp_path: Path) -> None:
    src = tmp_path / "src2"
    shutil.copytree(installed.src, src)
    (src / "companion" / "_upgrade_marker.py").write_text("MARKER = 1\n")
    installed.src = src
    token = env_of(installed)["CTRLABLE_API_TOKEN"]
    mark = len(installed.calls())
    installed.ok()
    changed = installed.changes(mark)
    assert not [c for c in changed if c["tool"] == "pveum"]
    assert not [c for c in changed if c["argv"][0] in ("create", "set", "destroy")]
    execs = [c["argv"][3:] for c in changed if c["argv"][0] == "exec"]
    assert ["/opt/ctrlable/venv/bin/pip", "install", "--no-cache-dir", "-q", "--force-reinstall",
            "--no-deps", "/opt/ctrlable/src"] in execs  # fmt: skip
    assert ["systemctl", "restart", "ctrlable-companion.service"] in execs
    assert (installed.ct() / "opt/ctrlable/src/companion/_upgrade_marker.py").is_file()
    assert env_of(installed)["CTRLABLE_API_TOKEN"] == token
    assert installed.pve()["cts"]["100"]["units"]["ctrlable-companion.service"]["starts"] == 2


def test_rerun_with_new_options_updates_only_those(installed: Host) -> None:
    mark = len(installed.calls())
    installed.ok("--memory", "2048", "--disk", "12")
    changed = [c["argv"] for c in installed.changes(mark)]
    assert changed == [
        ["set", "100", "--memory", "2048"],
        ["resize", "100", "rootfs", "12G"],
    ]
    # The options are remembered: a plain re-run keeps them and changes nothing.
    mark = len(installed.calls())
    installed.ok()
    assert installed.changes(mark) == []
    assert installed.pve()["cts"]["100"]["config"]["memory"] == "2048"


def test_role_with_other_privileges_is_corrected(installed: Host) -> None:
    subprocess.run(
        ["pveum", "role", "modify", ROLE, "--privs", "VM.Audit,Sys.Modify"],
        env=installed.env(),
        check=True,
    )
    mark = len(installed.calls())
    installed.ok()
    assert [c["argv"] for c in installed.changes(mark)] == [
        ["role", "modify", ROLE, "--privs", PRIVS]
    ]
    assert sorted(installed.pve()["roles"][ROLE]["privs"]) == sorted(PRIVS.split())


def test_secrets_recovered_from_the_container(installed: Host) -> None:
    """The host's state file is lost: the CT is found by its tag, its .env gives the secrets."""
    env = env_of(installed)
    (installed.root / "etc/ctrlable/install.env").unlink()
    mark = len(installed.calls())
    installed.ok()
    assert installed.changes(mark) == []
    assert env_of(installed) == env
    saved = read_env_file(installed.root / "etc/ctrlable/install.env")
    assert saved["API_TOKEN"] == env["CTRLABLE_API_TOKEN"]
    assert saved["PVE_TOKEN_SECRET"] == env["CTRLABLE_PVE_TOKEN_SECRET"]


def test_a_second_orchestrator_is_refused(installed: Host) -> None:
    mark = len(installed.calls())
    result = installed.run("--ctid", "200")
    assert result.returncode == 9
    assert "the orchestrator already exists as CT 100" in result.stderr
    assert installed.changes(mark) == []


def test_secrets_recovered_from_a_stopped_container(installed: Host) -> None:
    token = env_of(installed)["CTRLABLE_API_TOKEN"]
    subprocess.run(["pct", "stop", "100"], env=installed.env(), check=True)
    (installed.root / "etc/ctrlable/install.env").unlink()
    installed.ok()
    assert env_of(installed)["CTRLABLE_API_TOKEN"] == token
    assert installed.pve()["cts"]["100"]["status"] == "running"


def test_unrestricted_entry_for_the_key_is_replaced(installed: Host) -> None:
    auth = installed.root / "root/.ssh/authorized_keys"
    pub = (installed.root / "etc/ctrlable/orchestrator_ed25519.pub").read_text().split()
    auth.write_text(f"{ADMIN_KEY}\nssh-ed25519 {pub[1]} someone-pasted-it\n")
    installed.ok()
    assert auth.read_text().splitlines() == [
        ADMIN_KEY,
        f"{AUTH_PREFIX}{pub[1]} ctrlable-orchestrator",
    ]


# ------------------------------------------------------------------------------------------------
# Faults: a clear message, a distinct exit code, and a re-run that completes


@pytest.mark.parametrize("version", ["7.4-3", "8.1.4"])
def test_old_pve_is_refused_then_a_rerun_completes(host: Host, version: str) -> None:
    before = host.snapshot()
    result = host.run(FAKE_PVE_VERSION=version)
    assert result.returncode == 4, result.stderr
    assert f"Proxmox VE {version.replace('-', '.')[:3]}" in result.stderr
    assert "8.2 or newer is required" in result.stderr
    assert host.changes() == []
    assert host.snapshot() == before
    if version.startswith("7"):
        host.ok(FAKE_PVE_VERSION="8.2.2")  # the oldest supported release


def test_no_storage_is_refused_then_a_rerun_completes(host: Host) -> None:
    before = host.snapshot()
    result = host.run(FAKE_PVE_NO_STORAGE="1")
    assert result.returncode == 6
    assert "no storage on this host can hold containers" in result.stderr
    assert host.changes() == []
    assert host.snapshot() == before
    host.ok()


def test_too_little_free_space_is_refused(host: Host) -> None:
    result = host.run(FAKE_PVE_ROOTDIR_AVAIL_KIB=str(3 * 1024 * 1024))
    assert result.returncode == 6
    assert "storage 'local-lvm' has 3 GiB free; the orchestrator needs 8 GiB (--disk)" in (
        result.stderr
    )
    assert host.changes() == []
    result = host.run("--storage", "nope")
    assert result.returncode == 6
    assert "storage 'nope' does not exist or cannot hold containers; usable: local-lvm" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("pveum acl modify / --tokens", "ACL / for token ctrlable@pve!provisioner failed"),
        (
            "pveum user token add",
            "creating API token ctrlable@pve!provisioner (privilege separated) failed",
        ),
    ],
)
def test_pveum_failing_midway_then_a_rerun_completes(host: Host, fault: str, message: str) -> None:
    result = host.run(FAKE_FAIL_ON=fault)
    assert result.returncode == 8, result.stderr
    assert message in result.stderr
    assert "injected failure" in result.stderr
    assert "pct" not in {c["tool"] for c in host.changes()}  # stopped before the container
    first = len(host.calls())
    host.ok()
    adds = [c for c in host.calls() if c["argv"][:3] == ["user", "token", "add"]]
    assert len(adds) == 1 + (fault == "pveum user token add")  # one success: the secret was kept
    rerun = [c["argv"][:2] for c in host.changes(first) if c["tool"] == "pveum"]
    assert ["role", "add"] not in rerun
    assert ["user", "add"] not in rerun
    assert not [c for c in host.changes() if c["argv"][:3] == ["user", "token", "remove"]]
    pve = host.pve()
    assert env_of(host)["CTRLABLE_PVE_TOKEN_SECRET"] == pve["tokens"][USER]["provisioner"]["secret"]
    assert len(pve["acls"]) == 2


def test_failure_inside_the_container_then_a_rerun_completes(host: Host) -> None:
    result = host.run(FAKE_FAIL_ON="pct exec 100 -- /opt/ctrlable/venv/bin/pip install")
    assert result.returncode == 10
    assert "pip install (dependencies) failed" in result.stderr
    assert not (host.ct() / "opt/ctrlable/SOURCE_SHA256").exists()
    mark = len(host.calls())
    host.ok()
    assert not [c for c in host.changes(mark) if c["argv"][0] in ("create", "add")]
    assert (host.ct() / "opt/ctrlable/SOURCE_SHA256").is_file()


def test_unsupported_architecture(host: Host) -> None:
    result = host.run(FAKE_UNAME_M="armv7l")
    assert result.returncode == 5
    assert "unsupported architecture 'armv7l'" in result.stderr
    assert host.changes() == []


def test_aarch64_uses_the_arm64_template(host: Host) -> None:
    result = host.run(FAKE_UNAME_M="aarch64", FAKE_FAIL_ON="pct create")  # stop there: enough
    assert result.returncode == 9
    assert "creating CT 100" in result.stderr
    downloads = [
        c["argv"] for c in host.changes() if c["tool"] == "pveam" and c["argv"][0] == "download"
    ]
    assert downloads == [["download", "local", "debian-12-standard_12.7-1_arm64.tar.zst"]]


def test_not_root_is_refused(host: Host) -> None:
    result = host.run(CTRLABLE_INSTALL_ALLOW_NONROOT="0", FAKE_ID_U="1000")
    assert result.returncode == 3
    assert "run install.sh as root" in result.stderr
    assert host.calls() == []


def test_not_a_pve_host(host: Host, tmp_path: Path) -> None:
    bin_dir = tmp_path / "nopve"
    bin_dir.mkdir()
    env = host.env()
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    result = subprocess.run(
        ["bash", str(host.src / "install.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 4
    assert "pveversion not found: this is not a Proxmox VE host" in result.stderr


def test_foreign_guest_id_is_refused(host: Host) -> None:
    subprocess.run(["pveum", "user", "add", "dealer@pve"], env=host.env(), check=True)
    pve = host.pve()
    pve["cts"]["150"] = {"config": {"hostname": "dealer-box", "tags": "prod"}, "status": "running"}
    host.set_pve(pve)
    mark = len(host.calls())
    result = host.run("--ctid", "150")
    assert result.returncode == 9
    assert "150 exists and is not the Ctrlable orchestrator" in result.stderr
    assert host.changes(mark) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "lots"], "--memory: must be an integer from 512 to 262144 (got 'lots')"),
        (["--ip", "192.168.1.50/24"], "--gw: required with a static --ip"),
        (["--ip", "192.168.1.300/24", "--gw", "192.168.1.1"], "--ip: not an IPv4 address"),
        (["--hostname", "bad_name"], "--hostname: must be a DNS label"),
        (["--vlan", "5000"], "--vlan: must be an integer from 1 to 4094"),
        (["--ctid"], "--ctid needs a value"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--purge-data"], "--purge-data only makes sense with --uninstall"),
    ],
)
def test_bad_command_line(host: Host, args: list[str], message: str) -> None:
    result = host.run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert host.calls() == []


# ------------------------------------------------------------------------------------------------
# Options, dry run, uninstall


def test_static_address_vlan_explicit_ids_platform(host: Host, tmp_path: Path) -> None:
    """Non-default options; the platform token comes from a file; no certificate file on disk
    (the fingerprint then comes from `pvenode cert info`)."""
    (host.root / "etc/pve/local/pve-ssl.pem").unlink()
    fingerprint = ":".join(["C0"] * 32)
    token_file = tmp_path / "platform-token"
    token_file.write_text("plat-0123456789abcdef\n")
    result = host.ok(
        "--ctid", "250", "--hostname", "orchestrator", "--bridge", "vmbr1",
        "--ip", "198.51.100.20/24", "--gw", "198.51.100.1", "--vlan", "20", "--cores", "4",
        "--port", "8600", "--site-id", "dealer-17",
        "--platform-url", "https://platform.example/api/report",
        "--platform-token-file", str(token_file),
        FAKE_PVENODE_FINGERPRINT=fingerprint,
    )  # fmt: skip
    create = next(c["argv"] for c in host.changes() if c["argv"][0] == "create")
    opts = dict(zip(create[3::2], create[4::2], strict=True))
    assert create[1] == "250"
    assert opts["--net0"] == (
        "name=eth0,bridge=vmbr1,firewall=1,gw=198.51.100.1,ip=198.51.100.20/24,tag=20"
    )
    assert opts["--hostname"] == "orchestrator"
    env = env_of(host, "250")
    assert env["CTRLABLE_PUBLIC_URL"] == "http://198.51.100.20:8600"
    assert env["CTRLABLE_PVE_URL"] == "https://198.51.100.10:8006"  # vmbr1's address
    assert env["CTRLABLE_PVE_FINGERPRINT"] == fingerprint
    assert env["CTRLABLE_SITE_ID"] == "dealer-17"
    assert env["CTRLABLE_PLATFORM_URL"] == "https://platform.example/api/report"
    settings = Settings.load(environ={}, env_file=host.ct("250") / "etc/ctrlable/.env")
    assert settings.platform_token.get_secret_value() == "plat-0123456789abcdef"
    assert "plat-0123456789abcdef" not in result.stdout + result.stderr
    assert "plat-0123456789abcdef" not in json.dumps(host.calls())
    assert "http://198.51.100.20:8600" in result.stdout
    # Switching to DHCP later changes the network (keeping the MAC) and nothing else in PVE.
    mac = host.pve()["cts"]["250"]["config"]["net0"].split("hwaddr=")[1].split(",")[0]
    mark = len(host.calls())
    host.ok("--ip", "dhcp", FAKE_PVENODE_FINGERPRINT=fingerprint)
    changed = [c["argv"] for c in host.changes(mark)]
    assert changed[0][:3] == ["set", "250", "--net0"]
    net0 = dict(part.split("=", 1) for part in changed[0][3].split(","))
    assert net0["ip"] == "dhcp"
    assert net0["hwaddr"] == mac
    assert "gw" not in net0
    assert not [c for c in changed if c[0] in ("create", "destroy", "role", "user", "acl")]
    assert env_of(host, "250")["CTRLABLE_PUBLIC_URL"] == "http://192.0.2.50:8600"
    assert env_of(host, "250")["CTRLABLE_PLATFORM_TOKEN"] == "plat-0123456789abcdef"


def test_missing_host_key_is_refused(host: Host) -> None:
    (host.root / "etc/ssh/ssh_host_ed25519_key.pub").unlink()
    result = host.run()
    assert result.returncode == 11
    assert "no trust on first use" in result.stderr
    assert host.changes() == []


def test_dry_run_on_a_fresh_host_changes_nothing(host: Host) -> None:
    before = host.snapshot()
    result = host.ok("--dry-run")
    assert host.changes() == []
    assert host.snapshot() == before
    assert not (host.root / "etc/ctrlable").exists()
    for expected in (
        f"would run: pveum role add {ROLE} --privs",
        "would run: pveum user token add ctrlable@pve provisioner --privsep 1",
        "would run: pct create 100 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        'would add: command="/usr/local/sbin/ctrlable-build"',
        "would run: pveam download local debian-12-standard_12.7-1_amd64.tar.zst",
    ):
        assert expected in result.stderr, expected
    assert "Dry run:" in result.stdout
    assert "nothing was changed" in result.stdout
    assert "Pairing token" not in result.stdout


def test_dry_run_on_an_installed_host(installed: Host) -> None:
    before = installed.snapshot()
    mark = len(installed.calls())
    result = installed.ok("--dry-run", "--cores", "6")
    assert installed.changes(mark) == []
    assert installed.snapshot() == before
    assert "would run: pct set 100 --cores 6" in result.stderr
    assert "Dry run: 1 change(s) would be made" in result.stdout
    assert installed.pve()["cts"]["100"]["config"]["cores"] == "2"


def test_uninstall_keeps_the_data_and_a_reinstall_restores_it(installed: Host) -> None:
    db = installed.ct() / "var/lib/ctrlable/ctrlable.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"SQLite format 3\x00 the state")
    env = env_of(installed)
    result = installed.ok("--uninstall")
    pve = installed.pve()
    assert pve["cts"] == {}
    assert ROLE not in pve["roles"]
    assert USER not in pve["users"]
    assert pve["acls"] == []
    assert USER not in pve["tokens"]
    assert (installed.root / "root/.ssh/authorized_keys").read_text() == ADMIN_KEY + "\n"
    assert not (installed.root / "usr/local/sbin/ctrlable-build").exists()
    assert not (installed.root / "usr/local/share/ctrlable-build").exists()
    assert not (installed.root / "etc/ctrlable/ctrlable-build.conf").exists()
    backup = installed.root / "var/lib/ctrlable/backup/ctrlable-data.tar"
    with tarfile.open(backup) as tar:
        member = tar.extractfile("./ctrlable.db")
        assert member is not None
        assert member.read() == b"SQLite format 3\x00 the state"
    assert "data kept" in result.stdout
    removed = [c["argv"] for c in installed.changes() if c["tool"] == "pveum"][-5:]
    assert removed == [
        ["acl", "delete", "/", "--tokens", TOKEN, "--roles", ROLE],
        ["acl", "delete", "/", "--users", USER, "--roles", ROLE],
        ["user", "token", "remove", USER, "provisioner"],
        ["user", "delete", USER],
        ["role", "delete", ROLE],
    ]
    # A second uninstall has nothing left to do.
    mark = len(installed.calls())
    installed.ok("--uninstall")
    assert installed.changes(mark) == []
    # Install again: a new token and container, the same pairing token and the saved DB.
    installed.ok()
    new_env = env_of(installed)
    assert new_env["CTRLABLE_API_TOKEN"] == env["CTRLABLE_API_TOKEN"]
    assert new_env["CTRLABLE_PVE_TOKEN_SECRET"] != env["CTRLABLE_PVE_TOKEN_SECRET"]
    restored = installed.ct() / "var/lib/ctrlable/ctrlable.db"
    assert restored.read_bytes() == b"SQLite format 3\x00 the state"
    assert installed.pve()["cts"]["100"]["owners"]["/var/lib/ctrlable"] == "ctrlable:ctrlable -R"
    assert not backup.exists()
    assert backup.with_suffix(".tar.restored").exists()


def test_uninstall_purge_data(installed: Host) -> None:
    installed.ok("--uninstall", "--purge-data")
    assert installed.pve()["cts"] == {}
    assert not (installed.root / "etc/ctrlable").exists()
    assert not (installed.root / "var/lib/ctrlable/backup").exists()
    assert (installed.root / "root/.ssh/authorized_keys").read_text() == ADMIN_KEY + "\n"


def test_uninstall_dry_run_changes_nothing(installed: Host) -> None:
    before = installed.snapshot()
    mark = len(installed.calls())
    result = installed.ok("--uninstall", "--dry-run")
    assert installed.changes(mark) == []
    assert installed.snapshot() == before
    assert "would run: pct destroy 100 --purge 1" in result.stderr
    assert f"would run: pveum role delete {ROLE}" in result.stderr


# ------------------------------------------------------------------------------------------------
# The script itself


def test_help_documents_options_and_exit_codes() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "install.sh"), "--help"], capture_output=True, text=True, check=True
    )
    for text in ("--dry-run", "--uninstall", "--purge-data", "--storage", "--bridge", "--ip",
                 "--gw", "--ctid", "CTRLABLE_ROOT", "Exit codes:"):  # fmt: skip
        assert text in result.stdout
    for code in range(13):
        assert f"\n {code:>2}  " in result.stdout, code


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(REPO / "install.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_pve9_gets_the_guest_agent_privilege_instead_of_vm_monitor(host: Host) -> None:
    host.ok(FAKE_PVE_VERSION="9.0.3")
    privs = host.pve()["roles"][ROLE]["privs"]
    assert "VM.GuestAgent.Audit" in privs
    assert "VM.Monitor" not in privs  # PVE 9 removed it
    assert sorted(p for p in privs if p != "VM.GuestAgent.Audit") == sorted(
        PRIVS.replace(" VM.Monitor", "").split()
    )
