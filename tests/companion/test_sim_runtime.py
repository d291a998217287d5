"""Running the simulator: seeding from the release, state file, thread runner, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from proxmoxer import ProxmoxAPI

from companion.sim import (
    DEFAULT_TEMPLATES,
    SimConfig,
    TemplateSpec,
    run_simulator,
    run_simulator_in_thread,
    templates_from_release,
)
from companion.sim.cli import main as cli_main

from .sim_support import fast_config, prox, run, wait_task

REPO = Path(__file__).resolve().parents[2]


def test_default_templates_match_the_release() -> None:
    specs = templates_from_release(REPO / "releases" / "2026.06.yaml")
    assert [(s.name, s.pve_kind, s.vmid) for s in specs] == [
        (s.name, s.pve_kind, s.vmid) for s in DEFAULT_TEMPLATES
    ]


def test_template_spec_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        _ = TemplateSpec("x", "docker", 9000).pve_kind


async def test_seed_with_explicit_templates_and_cluster(tmp_path: Path) -> None:
    specs = [TemplateSpec("a", "qemu", 8000, "pve"), TemplateSpec("b", "lxc", 8001, "pve2")]
    async with run_simulator(fast_config(), templates=specs) as sim:
        api = prox(sim)
        nodes = await run(lambda: api.nodes.get())
        assert [n["node"] for n in nodes] == ["pve", "pve2"]
        vms = await run(lambda: api.cluster.resources.get(type="vm"))
        assert [(v["vmid"], v["node"], v["type"], v["template"]) for v in vms] == [
            (8000, "pve", "qemu", 1),
            (8001, "pve2", "lxc", 1),
        ]
        perms = await run(lambda: api.access.permissions.get())
        assert perms["/"]["VM.Clone"] == 1
        assert "VM.Monitor" not in perms["/"]


async def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "sim-state.json"
    async with run_simulator(fast_config(state_file=state_file)) as sim:
        api = prox(sim)
        upid = await run(lambda: api.nodes("pve").lxc(9010).clone.post(newid=100, hostname="kept"))
        await wait_task(api, upid)
    assert state_file.exists()
    async with run_simulator(fast_config(state_file=state_file)) as sim:
        assert sim.state.guests[100].config["hostname"] == "kept"
        assert sim.state.guests[9010].lock is None


def test_thread_runner_serves_synchronous_clients() -> None:
    with run_simulator_in_thread(SimConfig(task_seconds=0.01)) as threaded:
        sim = threaded.sim
        api = ProxmoxAPI(**sim.proxmoxer_kwargs(), timeout=10)
        assert api.cluster.nextid.get() == "100"
        assert threaded.call(lambda: sorted(sim.state.guests))[0] == 9000


def test_cli_prints_connection_info_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "CTRLABLE_SIM_TOKEN_SECRET": "11111111-2222-3333-4444-555555555555"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "companion.sim", "--port", "0", "--auth-delay", "0",
         "--task-seconds", "0.05", "--state-file", str(tmp_path / "s.json"),
         "--cert-dir", str(tmp_path / "tls"), "--template", "solo:lxc:7000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["token_id"] == "ctrlable@pve!provisioner"
        assert info["token_secret"] == env["CTRLABLE_SIM_TOKEN_SECRET"]
        assert info["ca_file"] == str(tmp_path / "tls" / "ca.pem")
        assert len(info["fingerprint"].split(":")) == 32
        api = ProxmoxAPI(
            f"127.0.0.1:{info['port']}", user="ctrlable@pve", token_name="provisioner",
            token_value=info["token_secret"], verify_ssl=info["ca_file"], timeout=10,
        )  # fmt: skip
        assert [v["vmid"] for v in api.cluster.resources.get(type="vm")] == [7000]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
    assert rc == 0
    assert json.loads((tmp_path / "s.json").read_text())["guests"][0]["vmid"] == 7000


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--task-duration", "vzclone"])
    assert "TYPE=SECONDS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--template", "x:docker:1"])
    assert "kind must be" in capsys.readouterr().err
