"""A sandboxed PVE host for the build wrapper's tests: fake PVE tools, a fixture community-scripts
repository (made here, never fetched), the wrapper's conf, and a REAL sshd on 127.0.0.1 that runs
``host/ctrlable-build`` through a ``command=`` restriction.
"""

from __future__ import annotations

import http.server
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "host" / "ctrlable-build"
SSHD = Path("/usr/sbin/sshd")
FAKE_TOOLS = ("pct", "qm", "pvesh", "pvesm", "pveam", "pveversion")
SCRIPTS_TAG = "2026-05-29"  # the ref releases/2026.06.yaml pins
RAW_MAIN = "https://raw.githubusercontent.com/community-scripts/ProxmoxVE/main"
GITEA_MAIN = "https://git.community-scripts.org/community-scripts/ProxmoxVE/raw/branch/main"
GITHUB_RAW_MAIN = "https://github.com/community-scripts/ProxmoxVE/raw/main"
KEY_OPTIONS = "no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding"


# ------------------------------------------------------------------------- the fixture tree


def _ct_script(app_name: str, port: int, build_func_url: str) -> str:
    return textwrap.dedent(
        f"""\
        #!/usr/bin/env bash
        source <(curl -fsSL {build_func_url})
        # Copyright (c) 2021-2026 community-scripts ORG (test fixture, not upstream code)
        # Source: {RAW_MAIN}/README.md

        APP="{app_name}"
        var_tags="${{var_tags:-fixture}}"
        var_cpu="${{var_cpu:-2}}"
        var_ram="${{var_ram:-1024}}"
        var_disk="${{var_disk:-4}}"
        var_os="${{var_os:-debian}}"
        var_version="${{var_version:-13}}"
        var_unprivileged="${{var_unprivileged:-1}}"

        header_info "$APP"
        variables
        color
        catch_errors

        function update_script() {{
          header_info
          exit
        }}

        start
        build_container
        description

        msg_ok "Completed successfully!\\n"
        echo "Access it using the following URL: http://${{IP:-}}:{port}"
        """
    )


BUILD_FUNC = textwrap.dedent(
    f"""\
    # Test fixture standing for misc/build.func: the upstream flow in miniature.
    source <(curl -fsSL {RAW_MAIN}/misc/core.func)
    _FUNC_BASE="{RAW_MAIN}/misc"
    source <(curl -fsSL "$_FUNC_BASE/api.func")

    variables() {{ NSAPP=$(echo "${{APP,,}}" | tr -d ' '); var_install="${{NSAPP}}-install"; }}
    header_info() {{ clear >/dev/null 2>&1 || true; echo "== ${{APP:-}} =="; }}
    color() {{ :; }}
    catch_errors() {{ set -Eeuo pipefail; }}
    behaviour() {{ cat "$FAKE_PVE_STATE/behaviour/$NSAPP" 2>/dev/null || echo ok; }}

    runtime_script_status_guard() {{
      echo "the remote status guard stopped this script"
      exit 1
    }}

    start() {{
      runtime_script_status_guard install
      if [[ ! -f "$CTRLABLE_BUILD_ROOT/usr/local/community-scripts/diagnostics" ]]; then
        echo "whiptail: diagnostics dialog; User exited script"
        exit 0
      fi
      case "${{mode:-}}" in
        generated) ;;
        "") echo "User exited script"; exit 0 ;;
        *) exit 112 ;;
      esac
      [[ "${{var_unattended:-}}" == yes ]] || {{ echo "User exited script"; exit 0; }}
      env | grep -E '^(var_|mode=|PHS_SILENT=|DISABLE_UPDATE=|TERM=|SSH_)' | sort \\
        >"$FAKE_PVE_STATE/builder-env-$NSAPP"
      if [[ $(behaviour) == tty-prompt ]]; then
        read -r -p "A newer template is available. Use it? <y/N> " reply </dev/tty || reply=n
        echo "answer: $reply"
      fi
    }}

    build_container() {{
      local b
      b=$(behaviour)
      if [[ $b == exit0-nocontainer ]]; then
        echo "User exited script"
        exit 0
      fi
      CTID=$var_ctid
      if [[ $b == moved-id ]]; then
        echo "ID $CTID is in use, using the next free one"
        CTID=$((CTID + 1))
      fi
      ostemplate="$var_os-$var_version-standard_amd64.tar.zst"
      pct create "$CTID" "$var_template_storage:vztmpl/$ostemplate" \\
        --hostname "$var_hostname" --cores "$var_cpu" --memory "$var_ram" \\
        --rootfs "$var_container_storage:$var_disk" --unprivileged "$var_unprivileged" \\
        --net0 "name=eth0,bridge=$var_brg,ip=$var_net" --tags "community-script;$var_tags"
      echo "Container ID: $CTID"
      if [[ $var_unprivileged == 0 ]]; then
        cat >>"$CTRLABLE_BUILD_ROOT/etc/pve/lxc/$CTID.conf" <<'EOF'
    lxc.cgroup2.devices.allow: a
    lxc.cap.drop:
    lxc.cgroup2.devices.allow: c 188:* rwm
    lxc.mount.entry: /dev/serial/by-id  dev/serial/by-id  none bind,optional,create=dir
    lxc.mount.entry: /dev/ttyUSB0       dev/ttyUSB0       none bind,optional,create=file
    dev0: /dev/dri/renderD128,gid=104
    EOF
      fi
      pct start "$CTID"
      FUNCTIONS_FILE_PATH="$(curl -fsSL {RAW_MAIN}/misc/install.func)"
      export FUNCTIONS_FILE_PATH
      pct exec "$CTID" -- bash -c "$(curl -fsSL {RAW_MAIN}/install/$var_install.sh)"
    }}

    description() {{ echo "description written"; }}
    """
)

CORE_FUNC = textwrap.dedent(
    f"""\
    # Test fixture standing for misc/core.func.
    source <(curl -fsSL {GITEA_MAIN}/misc/error_handler.func)
    msg_info() {{ echo "INFO $*"; }}
    msg_ok() {{ echo -e "OK $*"; }}
    msg_error() {{ echo "ERROR $*"; }}
    """
)

INSTALL_FUNC = textwrap.dedent(
    f"""\
    # Test fixture standing for misc/install.func (runs inside the container).
    source <(curl -fsSL {RAW_MAIN}/misc/core.func)
    R="${{CTRLABLE_GUEST_ROOT:?the fake pct sets this}}"
    behaviour() {{ cat "$FAKE_PVE_STATE/behaviour/$1" 2>/dev/null || echo ok; }}
    setting_up_container() {{ echo "container up"; }}
    unit_active() {{ mkdir -p "$R/.fake/units"; : >"$R/.fake/units/$1"; }}
    record_version() {{ printf '%s\\n' "$2" >"$R/root/.$1"; }}
    customize() {{
      mkdir -p "$R/etc/systemd/system/container-getty@1.service.d"
      printf '[Service]\\nExecStart=\\nExecStart=-/sbin/agetty --autologin root tty%%I $TERM\\n' \\
        >"$R/etc/systemd/system/container-getty@1.service.d/override.conf"
      printf '#!/bin/bash\\nbash -c "$(curl -fsSL {GITHUB_RAW_MAIN}/ct/%s.sh)"\\n' "$1" \\
        >"$R/usr/bin/update"
      chmod +x "$R/usr/bin/update"
      echo "install log of $1" >"$R/root/.install-abc123.log"
    }}
    """
)


def _install_script(app: str, body: str, version: str) -> str:
    return (
        textwrap.dedent(
            f"""\
        #!/usr/bin/env bash
        # Test fixture standing for install/{app}-install.sh.
        source /dev/stdin <<<"$FUNCTIONS_FILE_PATH"
        set -euo pipefail
        setting_up_container
        b=$(behaviour {app})
        if [[ $b == fail-install ]]; then
          echo "E: the install of {app} failed"
          exit 1
        fi
        if [[ $b == hang ]]; then
          sleep 300
        fi
        """
        )
        + textwrap.dedent(body)
        + textwrap.dedent(
            f"""\
        record_version {app} "{version}"
        [[ $b == unit-inactive ]] || unit_active {app}
        customize {app}
        """
        )
    )


INSTALLS = {
    "zwave-js-ui": _install_script(
        "zwave-js-ui",
        """\
        mkdir -p "$R/opt/zwave_store/.config-db"
        echo '{"zwave":{"securityKeys":{"S0_Legacy":"0123"}}}' >"$R/opt/zwave_store/settings.json"
        echo '[]' >"$R/opt/zwave_store/nodes.json"
        echo 'STORE_DIR=/opt/zwave_store' >"$R/opt/.env"
        """,
        "${var_appversion:-v99.0.0}",
    ),
    "zigbee2mqtt": _install_script(
        "zigbee2mqtt",
        """\
        mkdir -p "$R/opt/zigbee2mqtt/data/log"
        cat >"$R/opt/zigbee2mqtt/data/configuration.yaml" <<'EOF'
        mqtt:
          base_topic: zigbee2mqtt
          server: mqtt://localhost
        serial:
          port: /dev/ttyACM0
        advanced:
          network_key:
            - 17
            - 34
            - 51
          pan_id: 6754
          ext_pan_id: [221, 221, 221, 221, 221, 221, 221, 221]
          log_level: info
        frontend:
          port: 8080
        EOF
        echo '{}' >"$R/opt/zigbee2mqtt/data/state.json"
        echo 'db' >"$R/opt/zigbee2mqtt/data/database.db"
        echo '{}' >"$R/opt/zigbee2mqtt/data/coordinator_backup.json"
        """,
        "${var_appversion:-99.0.0}",
    ),
    "docker": _install_script(
        "docker",
        """\
        : >"$R/usr/bin/docker"
        chmod +x "$R/usr/bin/docker"
        read -r -p "${TAB3:-}Would you like to add Portainer Agent? <y/N> " prompt
        if [[ ${prompt,,} =~ ^(y|yes)$ ]]; then
          echo "installing the Portainer agent"
        fi
        read -r -p "${TAB3:-}Expose Docker TCP socket? <n/l/a>: " socket_prompt
        case ${socket_prompt,,} in
          n | "") ;;
          *) echo "exposing the docker socket"; exit 9 ;;
        esac
        """,
        "27.3.1",
    ),
    "frigate": _install_script(
        "frigate",
        """\
        mkdir -p "$R/config"
        echo 'db' >"$R/config/frigate.db"
        echo 'jwt' >"$R/config/.jwt_secret"
        echo 'mqtt: {enabled: false}' >"$R/config/config.yml"
        """,
        "0.16.1",
    ),
    "freepbx": _install_script("freepbx", ': >"$R/etc/freepbx.conf"\n', "17.0.19"),
}

CT_SCRIPTS = {
    "zwave-js-ui": ("Zwave-JS-UI", 8091, f"{RAW_MAIN}/misc/build.func"),
    "zigbee2mqtt": ("Zigbee2MQTT", 9442, f"{RAW_MAIN}/misc/build.func"),
    "docker": ("Docker", 9443, f"{RAW_MAIN}/misc/build.func"),
    "frigate": ("Frigate", 5000, f"{GITEA_MAIN}/misc/build.func"),  # like upstream's frigate.sh
    "freepbx": ("FreePBX", 80, f"{RAW_MAIN}/misc/build.func"),
}


def make_scripts_repo(path: Path) -> str:
    """A git repository shaped like community-scripts/ProxmoxVE; returns the tag's commit SHA.

    Every file references ``main`` URLs like upstream does. A later commit on the branch breaks
    build.func, so a build that does not use the pinned tag fails."""
    files: dict[str, str] = {
        "misc/build.func": BUILD_FUNC,
        "misc/core.func": CORE_FUNC,
        "misc/api.func": f"# api.func fixture\nAPI_URL_DOC={RAW_MAIN}/misc/api.func\n",
        "misc/error_handler.func": "# error_handler.func fixture\ncatch() { :; }\n",
        "misc/install.func": INSTALL_FUNC,
        "misc/tools.func": f"# tools.func fixture\n# {RAW_MAIN}/misc/tools.func\n",
        "tools/addon/portainer.sh": (
            f"#!/usr/bin/env bash\nsource <(curl -fsSL {RAW_MAIN}/misc/core.func)\n"
            f"source <(curl -fsSL {RAW_MAIN}/misc/tools.func)\n"
        ),
        "vm/haos-vm.sh": (
            f"#!/usr/bin/env bash\nsource <(curl -fsSL {RAW_MAIN}/misc/api.func)\n"
            'whiptail --yesno "This will create a new Home Assistant OS VM. Proceed?" 10 58\n'
            'echo "vm/haos-vm.sh must never run in a ctrlable build"; exit 1\n'
        ),
        "README.md": f"Fixture. {RAW_MAIN}/README.md (outside ct/ install/ misc/ tools/ vm/)\n",
    }
    for app, (name, port, url) in CT_SCRIPTS.items():
        files[f"ct/{app}.sh"] = _ct_script(name, port, url)
        files[f"install/{app}-install.sh"] = INSTALLS[app]
    path.mkdir(parents=True)
    for rel, text in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=fixture", "-c", "user.email=f@example.invalid"]
    subprocess.run([*git[:3], "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fixture"], check=True)
    subprocess.run([*git, "tag", SCRIPTS_TAG], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    broken = path / "misc/build.func"
    broken.write_text('echo "this is main, not the pinned tag"; exit 99\n' + broken.read_text())
    subprocess.run([*git, "commit", "-q", "-am", "main moves on"], check=True)
    return sha


# ------------------------------------------------------------------------- the fake host


@dataclass
class FakeHost:
    base: Path
    root: Path  # CTRLABLE_BUILD_ROOT
    state: Path  # FAKE_PVE_STATE
    bin: Path
    conf: Path
    work: Path
    scripts_repo: Path
    scripts_sha: str
    token_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CTRLABLE_BUILD_CONF": str(self.conf),
            "CTRLABLE_BUILD_ROOT": str(self.root),
            "FAKE_PVE_STATE": str(self.state),
        }

    def write_conf(self, companion_url: str, **extra: str) -> None:
        values = {
            "COMPANION_URL": companion_url,
            "COMPANION_TOKEN_FILE": str(self.token_file),
            "CONTAINER_STORAGE": "local-lvm",
            "TEMPLATE_STORAGE": "local",
            "VM_STORAGE": "local-lvm",
            "BRIDGE": "vmbr0",
            "SERVE_ADDRESS": "127.0.0.1",
            "SERVE_PORT": "0",
            "SCRIPTS_REPO": str(self.scripts_repo),
            "WORK_DIR": str(self.work),
            "OVERLAY_DIR": str(REPO / "host" / "overlays"),
            "FIRSTBOOT_DIR": str(REPO / "firstboot"),
            "HAOS_IMAGE_DIR": str(self.root / "var/lib/vz/template/cache"),
            "HAOS_URL_BASE": "http://127.0.0.1:9/nowhere",
            "HEARTBEAT_SECONDS": "1",
            "UNIT_WAIT_SECONDS": "0",
            "KEEP_TREE": "yes",
            "NODE": "pve",
        }
        values.update(extra)
        lines = ["# written by the test", *(f'{k}="{v}"' for k, v in values.items())]
        self.conf.write_text("\n".join(lines) + "\n")

    def behave(self, app: str, behaviour: str) -> None:
        (self.state / "behaviour").mkdir(parents=True, exist_ok=True)
        (self.state / "behaviour" / app).write_text(behaviour + "\n")

    def calls(self, tool: str | None = None) -> list[list[str]]:
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [[r["tool"], *r["argv"]] for r in rows if tool is None or r["tool"] == tool]

    def lxc_conf(self, vmid: int) -> Path:
        return self.root / "etc/pve/lxc" / f"{vmid}.conf"

    def qemu_conf(self, vmid: int) -> Path:
        return self.root / "etc/pve/qemu-server" / f"{vmid}.conf"

    def rootfs(self, vmid: int) -> Path:
        return self.state / "guests" / str(vmid) / "rootfs"

    def guest_exists(self, vmid: int) -> bool:
        return self.lxc_conf(vmid).exists() or self.qemu_conf(vmid).exists()

    def build_dirs(self) -> list[Path]:
        return sorted((self.work / "builds").glob("*")) if (self.work / "builds").is_dir() else []

    def log_dirs(self) -> list[Path]:
        return sorted((self.work / "logs").glob("*")) if (self.work / "logs").is_dir() else []

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
        """Run the wrapper by hand (no SSH)."""
        merged = {**self.env, "HOME": str(self.base), **(env or {})}
        return subprocess.run(
            [str(WRAPPER), *args],
            env=merged,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def make_fake_host(base: Path, token: str) -> FakeHost:
    root, state, bindir = base / "root", base / "state", base / "bin"
    for d in (root, state, bindir):
        d.mkdir(parents=True)
    fake = bindir / "_fakepve.py"
    source = (Path(__file__).parent / "build_fakepve.py").read_text()
    fake.write_text(f"#!{sys.executable} -S\n" + source.split("\n", 1)[1])
    fake.chmod(0o755)
    for tool in FAKE_TOOLS:
        (bindir / tool).symlink_to(fake)
    token_file = base / "companion.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    scripts = base / "ProxmoxVE"
    sha = make_scripts_repo(scripts)
    # The pinned HAOS image, already cached (tests never download).
    cache = root / "var/lib/vz/template/cache"
    cache.mkdir(parents=True)
    (cache / "haos_ova-16.0.qcow2.xz").write_bytes(lzma.compress(b"QFI\xfb fake qcow2 image"))
    return FakeHost(
        base=base,
        root=root,
        state=state,
        bin=bindir,
        conf=base / "ctrlable-build.conf",
        work=base / "work",
        scripts_repo=scripts,
        scripts_sha=sha,
        token_file=token_file,
    )


# ------------------------------------------------------------------------- a real sshd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SshServer:
    """A real OpenSSH sshd on 127.0.0.1, with its own host key, config and authorized_keys."""

    def __init__(self, base: Path, host: FakeHost) -> None:
        self.base = base
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = base / "id_ed25519"
        self.host_key = base / "ssh_host_ed25519_key"
        self.log = base / "sshd.log"

    @staticmethod
    def require() -> None:
        if not SSHD.exists():
            pytest.fail(
                f"{SSHD} is missing: the build tests need a real sshd "
                "(apt-get install openssh-server; CI installs it)"
            )
        if os.geteuid() != 0:
            pytest.fail("the build tests start sshd, which must run as root")
        if not shutil.which("ssh-keygen"):
            pytest.fail("ssh-keygen is missing (apt-get install openssh-client)")

    def command_line(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.host.env.items())
        return f'command="env {env} {WRAPPER}",{KEY_OPTIONS}'

    def start(self) -> None:
        self.require()
        self.base.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        pub = self.client_key.with_suffix(".pub").read_text().strip()
        authorized = self.base / "authorized_keys"
        authorized.write_text(f"{self.command_line()} {pub}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for _attempt in range(5):
            self.port = free_port()
            config = self.base / "sshd_config"
            config.write_text(
                textwrap.dedent(
                    f"""\
                    Port {self.port}
                    ListenAddress 127.0.0.1
                    HostKey {self.host_key}
                    PidFile {self.base}/sshd.pid
                    AuthorizedKeysFile {authorized}
                    StrictModes no
                    PermitRootLogin forced-commands-only
                    PubkeyAuthentication yes
                    PasswordAuthentication no
                    KbdInteractiveAuthentication no
                    UsePAM no
                    AllowUsers root
                    LogLevel VERBOSE
                    """
                )
            )
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=self.log.open("ab"),
                stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        pytest.fail(f"sshd did not start; its log:\n{self.log.read_text()}")

    def known_hosts(self, path: Path | None = None, key: Path | None = None) -> Path:
        path = path or self.base / "known_hosts"
        pub = (key or self.host_key).with_suffix(".pub").read_text().split()
        path.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        return path

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (below the listener), not the wrapper they run."""
        assert self.proc is not None
        parents: dict[int, int] = {}
        names: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            pid = int(entry.name)
            names[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])

        def below_listener(pid: int) -> bool:
            while pid in parents and pid > 1:
                pid = parents[pid]
                if pid == self.proc.pid:  # type: ignore[union-attr]
                    return True
            return False

        return [p for p, n in names.items() if n.startswith("sshd") and below_listener(p)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# ------------------------------------------------------------------------- a manifest server


class ManifestServer:
    """Serves ``/api/v1/releases/<release>/manifest`` like the companion, for by-hand runs of
    the wrapper (no companion). Checks the bearer token; ``manifest`` may be edited between runs."""

    def __init__(self, token: str, manifest: dict[str, Any]) -> None:
        self.token = token
        self.manifest = manifest
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization", "")))
                release = outer.manifest.get("release")
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self._answer(401, {"error": {"code": "unauthorized"}})
                elif self.path != f"/api/v1/releases/{release}/manifest":
                    self._answer(404, {"error": {"code": "not_found"}})
                else:
                    self._answer(200, outer.manifest)

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def shipped_manifest(
    release: str = "2026.06",
    secret: str = "test-firstboot-secret-0123456789",  # noqa: S107
) -> dict[str, Any]:
    """The shipped manifest as the companion's route answers it."""
    from companion.manifest import load_manifest

    data: dict[str, Any] = load_manifest(REPO / "releases" / f"{release}.yaml").model_dump(
        mode="json"
    )
    data["build"] = {
        "manifest_sha256": "0" * 64,
        "companion_url": "http://127.0.0.1:8580",
        "firstboot_secret": secret,
    }
    return data


def events(stdout: str) -> list[dict[str, Any]]:
    """The wrapper's JSON lines."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]
