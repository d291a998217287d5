"""host/ctrlable-build on its own: shellcheck, --help, the command grammar through a REAL sshd with
the command= restriction, the URL rewrite of the served tree, overlays, conf and manifest checks.

Builds here run the wrapper by hand against a small manifest server (no companion); the companion's
side, through sshd, is in test_build_plane.py.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from .build_host import (
    GITEA_MAIN,
    RAW_MAIN,
    SCRIPTS_TAG,
    WRAPPER,
    FakeHost,
    ManifestServer,
    SshServer,
    events,
    make_fake_host,
    shipped_manifest,
)

TOKEN = "host-test-token-0123456789"
MAIN_MARKERS = ("ProxmoxVE/main", "raw/branch/main", "ProxmoxVE/raw/main")


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return make_fake_host(tmp_path / "host", TOKEN)


@pytest.fixture
def manifest_server(host: FakeHost) -> Iterator[ManifestServer]:
    server = ManifestServer(TOKEN, shipped_manifest())
    host.write_conf(server.url)
    yield server
    server.close()


def test_shellcheck_passes() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing (apt-get install shellcheck; CI installs it)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(WRAPPER)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_explains_itself(host: FakeHost) -> None:
    result = host.run("--help")
    assert result.returncode == 0
    text = result.stdout
    for needle in (
        "build RELEASE [TEMPLATE...]",
        "status",
        "cancel BUILD_ID",
        "version",
        'command="/usr/local/sbin/ctrlable-build",no-pty',
        "SSH_ORIGINAL_COMMAND",
        "CTRLABLE_BUILD_CONF",
        '"event":"result"',
        "mode=generated",
        "never started",
        "Exit:",
    ):
        assert needle in text, needle
    assert host.calls() == []


def test_no_arguments_prints_usage_and_fails(host: FakeHost) -> None:
    result = host.run()
    assert result.returncode == 2
    assert "build RELEASE" in result.stderr


async def test_only_the_grammar_passes_the_ssh_restriction(host: FakeHost, tmp_path: Path) -> None:
    sshd = SshServer(tmp_path / "sshd", host)
    sshd.start()
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port=sshd.port,
            username="root",
            client_keys=[str(sshd.client_key)],
            known_hosts=str(sshd.known_hosts()),
            agent_path=None,
            config=None,
        ) as conn:
            refused = {
                "rm -rf /": "'/' is not an allowed word",
                "reboot": "unknown command 'reboot'",
                "bash -i": "unknown command 'bash'",
                "build 2026.06; id": "'2026.06;' is not an allowed word",
                "build $(id)": "is not an allowed word",
                "build ../../etc/passwd": "is not an allowed word",
                "build 2026.6": "is not a release",
                "build 2026.06 Bad_Name": "is not a template name",
                "build 2026.06 -x": "is not a template name",
                "build": "usage: build RELEASE",
                "status now": "status takes no arguments",
                "cancel 42": "is not a build id",
                "version --all": "version takes no arguments",
                "scp -t /root": "'/root' is not an allowed word",
                "build 2026.06\nid": "control characters",
                "x" * 600: "longer than 512",
            }
            for command, message in refused.items():
                result = await conn.run(command, check=False)
                assert result.exit_status == 2, command
                assert "refused" in str(result.stderr), command
                assert message in str(result.stderr), (command, result.stderr)
                assert result.stdout == "", command
            shell = await conn.run(check=False)  # a login shell: no command at all
            assert shell.exit_status == 2
            assert "no command given" in str(shell.stderr)
            version = await conn.run("version", check=False)
            assert version.exit_status == 0
            assert '"event":"version"' in str(version.stdout)
            status = await conn.run("status", check=False)
            assert status.exit_status == 0
            assert '"running":false' in str(status.stdout)
        assert host.calls() == [], "a refused command reached a PVE tool"
    finally:
        sshd.stop()


def test_rewrite_leaves_no_main_reference_in_the_served_tree(
    host: FakeHost, manifest_server: ManifestServer
) -> None:
    # The fixture repo really has main URLs (both prefixes), or this test would prove nothing.
    pinned = subprocess.run(
        ["git", "-C", str(host.scripts_repo), "grep", "-c", "-e", "ProxmoxVE/main",
         "-e", "raw/branch/main", SCRIPTS_TAG, "--", "ct", "install", "misc", "tools", "vm"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert sum(int(line.rsplit(":", 1)[1]) for line in pinned.splitlines()) >= 15

    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 0, result.stderr
    [build_dir] = host.build_dirs()  # KEEP_TREE=yes keeps the served tree
    tree = build_dir / "tree"
    served = [p for d in ("ct", "install", "misc", "tools", "vm") for p in (tree / d).rglob("*")]
    assert len([p for p in served if p.is_file()]) >= 15
    for path in served:
        if path.is_file():
            text = path.read_text()
            for marker in MAIN_MARKERS:
                assert marker not in text, (path, marker)
    url = next(e for e in events(result.stdout) if e.get("step") == "rewrite")["message"]
    base = url.rsplit(" ", 1)[1]
    assert base.startswith("http://127.0.0.1:")
    assert (
        f"source <(curl -fsSL {base}/misc/build.func)" in (tree / "ct/zwave-js-ui.sh").read_text()
    )
    assert f"{base}/misc/build.func" in (tree / "ct/frigate.sh").read_text()  # the Gitea prefix
    assert GITEA_MAIN not in (tree / "misc/core.func").read_text()
    assert RAW_MAIN in (tree / "README.md").read_text()  # outside the rewritten dirs
    # The builder, and the install inside the "container", fetched everything from that server.
    [log_dir] = host.log_dirs()
    served_log = (log_dir / "serve.log").read_text()
    fetched = ("build.func", "core.func", "error_handler.func", "api.func", "install.func")
    for path in [*(f"/misc/{f}" for f in fetched), "/install/zwave-js-ui-install.sh"]:
        assert f'"GET {path} HTTP/1.1" 200' in served_log, path
    # The remote kill switch is overridden and docker's raw prompts are answered.
    assert "runtime_script_status_guard() { return 0; }" in (tree / "misc/build.func").read_text()
    docker = (tree / "install/docker-install.sh").read_text()
    assert "read -r -p" not in docker
    assert 'prompt=n # ctrlable-build: prompt answered "n"' in docker
    assert 'socket_prompt=n # ctrlable-build: prompt answered "n"' in docker


def test_a_main_url_the_rewrite_cannot_fix_stops_the_build(
    host: FakeHost, manifest_server: ManifestServer
) -> None:
    repo = host.scripts_repo
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "checkout", "-q", SCRIPTS_TAG], check=True)
    mirror = "https://cdn.example.invalid/gh/community-scripts/ProxmoxVE/main/misc/tools.func"
    (repo / "misc/tools.func").write_text(f"source <(curl -fsSL {mirror})\n")
    subprocess.run([*git, "commit", "-q", "-am", "a mirror URL"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    manifest_server.manifest["community_scripts_ref"] = sha

    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 1
    done = events(result.stdout)[-1]
    assert done["event"] == "done"
    assert done["ok"] is False
    assert "main URLs remain after the rewrite" in done["error"]
    assert "misc/tools.func" in done["error"]
    assert host.calls("pct") == []


def test_overlay_patches_apply_per_ref_and_a_broken_one_stops_the_build(
    host: FakeHost, manifest_server: ManifestServer, tmp_path: Path
) -> None:
    overlays = tmp_path / "overlays"
    (overlays / SCRIPTS_TAG).mkdir(parents=True)
    (overlays / SCRIPTS_TAG / "010-zwave-note.patch").write_text(
        "--- a/ct/zwave-js-ui.sh\n+++ b/ct/zwave-js-ui.sh\n@@ -1,2 +1,3 @@\n"
        " #!/usr/bin/env bash\n+# ctrlable overlay was here\n"
        f" source <(curl -fsSL {RAW_MAIN}/misc/build.func)\n"
    )
    host.write_conf(manifest_server.url, OVERLAY_DIR=str(overlays))
    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 0, result.stderr
    [build_dir] = host.build_dirs()
    assert "# ctrlable overlay was here" in (build_dir / "tree/ct/zwave-js-ui.sh").read_text()
    assert "applied 1 overlay patch(es)" in result.stdout

    (overlays / "default").mkdir()
    (overlays / "default" / "001-stale.patch").write_text(
        "--- a/ct/docker.sh\n+++ b/ct/docker.sh\n@@ -1,1 +1,1 @@\n-no such line\n+replacement\n"
    )
    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 1
    done = events(result.stdout)[-1]
    assert (
        f"overlay 001-stale.patch does not apply to community-scripts@{SCRIPTS_TAG}"
        in done["error"]
    )


def test_a_bad_manifest_field_is_named_and_nothing_is_built(
    host: FakeHost, manifest_server: ManifestServer
) -> None:
    manifest_server.manifest["templates"]["zwavejs"]["resources"]["cpu"] = 0
    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 1
    done = events(result.stdout)[-1]
    assert done["error"] == "manifest: templates.zwavejs.resources.cpu: must be an integer 1-64"
    manifest_server.manifest = shipped_manifest()
    manifest_server.manifest["community_scripts_ref"] = "main"
    result = host.run("build", "2026.06", "zwavejs")
    assert (
        "manifest: community_scripts_ref: must be a date tag" in events(result.stdout)[-1]["error"]
    )
    manifest_server.manifest = shipped_manifest()
    result = host.run("build", "2026.06", "nosuchtemplate")
    assert events(result.stdout)[-1]["error"] == "template nosuchtemplate is not in release 2026.06"
    assert host.calls("pct") == []
    assert host.calls("qm") == []
    # The token went in the Authorization header (never the URL).
    assert all(auth == f"Bearer {TOKEN}" for _, auth in manifest_server.requests)
    assert all(TOKEN not in path for path, _ in manifest_server.requests)


def test_a_wrong_token_is_reported(host: FakeHost, manifest_server: ManifestServer) -> None:
    host.token_file.write_text("wrong-token\n")
    result = host.run("build", "2026.06", "zwavejs")
    assert result.returncode == 1
    assert "refused the token" in events(result.stdout)[-1]["error"]


def test_conf_errors_name_the_key(host: FakeHost) -> None:
    host.write_conf("http://127.0.0.1:9", SERVE_ADDRESS="")
    result = host.run("build", "2026.06")
    assert result.returncode == 2
    assert "SERVE_ADDRESS is required" in result.stderr
    host.conf.write_text(host.conf.read_text() + "SERVE_ADRESS=10.0.0.1\n")
    result = host.run("build", "2026.06")
    assert result.returncode == 2
    assert "unknown key SERVE_ADRESS" in result.stderr
    host.write_conf("http://127.0.0.1:9", HEARTBEAT_SECONDS="soon")
    result = host.run("build", "2026.06")
    assert "HEARTBEAT_SECONDS must be a whole number" in result.stderr
    result = host.run("build", "2026.06", env={"CTRLABLE_BUILD_CONF": "/nonexistent.conf"})
    assert result.returncode == 2
    assert "cannot read /nonexistent.conf" in result.stderr


def test_one_build_at_a_time_on_the_host(host: FakeHost, manifest_server: ManifestServer) -> None:
    state = host.root / "run/ctrlable-build"
    state.mkdir(parents=True)
    (state / "state.json").write_text('{"build_id":"20260601T120000Z-1","pid":1}')
    with (state / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = host.run("build", "2026.06", "zwavejs")
        assert result.returncode == 75
        assert "another build is running (20260601T120000Z-1)" in events(result.stdout)[-1]["error"]
        status = host.run("status")
        assert '"running":true' in status.stdout
        assert '"build_id":"20260601T120000Z-1"' in status.stdout
        wrong = host.run("cancel", "20260601T120000Z-2")
        assert wrong.returncode == 1
        assert "is not running" in wrong.stderr
    assert manifest_server.requests == []
    assert '"running":false' in host.run("status").stdout
