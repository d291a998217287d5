"""Deploy bench: a 6-guest stack on the PVE simulator with realistic task durations.

Prints the wall time from ``POST /api/v1/deploy`` until every instance is ``active`` against the
ideal critical path (goal <= 1.10x), and the companion's CPU time per instance (goal < 25 ms).

- The simulator (``ctrlable-companion sim``) and the companion (``ctrlable-companion serve``) run
  as separate processes; the companion's CPU is the sum of its threads' time on the CPU from
  ``/proc/<pid>/task/*/schedstat`` (nanoseconds; what ``time.process_time()`` reports inside it).
- This process plays the guests: on each ``instance.state`` event ``awaiting_firstboot`` it waits
  ``--boot`` seconds and then does what ``ctrlable-firstboot.sh`` does over HTTP (fetch the
  assignment, report complete). The companion's side of that is in the CPU figure.
- Ideal = max over templates of ``n_t x clone + start`` + boot: LXC clones of one template
  are serialized by PVE (the source's ``disk`` lock), everything else may overlap.
- Round 0 is the first deploy of a fresh companion (an empty data dir): it does not know yet how
  long PVE's tasks take and polls them on the growth schedule. It is printed on its own; the
  goals are judged on the medians of the warm rounds after it. ``--verbose`` lists each round's PVE
  requests and splits the CPU into the event-loop thread and the others (PVE workers, SQLite).

Usage: ``.venv311/bin/python bench/bench_deploy.py [--rounds 7] [--clone 2] [--start 1]
[--boot 0] [--types zwavejs,zigbee2mqtt,...] [--verbose] [--strict] [--profile FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TYPES = "zwavejs,zigbee2mqtt,docker-portainer,frigate,freepbx,zwavejs"
WALL_GOAL = 1.10
CPU_GOAL_MS = 25.0


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds on the CPU of every thread of ``pid`` (``/proc/<pid>/task/*/schedstat``, in
    nanoseconds). A thread that ends mid-round takes its time with it; the companion's threads
    (PVE workers, SQLite) live as long as it does."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
    return times


def cpu_seconds(pid: int) -> float:
    return sum(thread_cpu(pid).values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_sim(
    args: argparse.Namespace, workdir: Path
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "companion.sim",
        "--port",
        "0",
        "--cert-dir",
        str(workdir / "certs"),
        "--task-seconds",
        "0.5",
        "--task-duration",
        f"vzclone={args.clone}",
        "--task-duration",
        f"vzstart={args.start}",
        "--release",
        str(REPO / "releases" / "2026.06.yaml"),
        "--seed",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        msg = "the simulator did not start"
        raise RuntimeError(msg)
    return proc, json.loads(line)


def start_companion(
    sim: dict[str, Any], workdir: Path, token: str, secret: str, port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CTRLABLE_API_TOKEN": token,
        "CTRLABLE_FIRSTBOOT_SECRET": secret,
        "CTRLABLE_DATA_DIR": str(workdir / "data"),
        "CTRLABLE_LISTEN_PORT": str(port),
        "CTRLABLE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CTRLABLE_PVE_URL": sim["url"].split("/api2")[0],
        "CTRLABLE_PVE_TOKEN_ID": sim["token_id"],
        "CTRLABLE_PVE_TOKEN_SECRET": sim["token_secret"],
        "CTRLABLE_PVE_CA_FILE": sim["ca_file"],
        "CTRLABLE_LOG_LEVEL": "WARNING",
        "CTRLABLE_FIRSTBOOT_RATE_IP": "10000",
    }
    log = (workdir / "companion.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "companion", "serve"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy (``pip install py-spy``) sampling every thread of the companion."""
    cmd = ["py-spy", "record", "--format", "raw", "--rate", "250", "--pid", str(pid)]
    return subprocess.Popen(
        [*cmd, "--output", str(output.resolve())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Bench:
    def __init__(
        self, base: str, token: str, secret: str, boot: float, sim: dict[str, Any]
    ) -> None:
        self.base = base
        self.sim_control = sim["url"].split("/api2")[0] + "/_sim"
        self.sim_ssl = ssl.create_default_context(cafile=sim["ca_file"])
        self.sim_headers = {"Authorization": f"PVEAPIToken={sim['token_id']}={sim['token_secret']}"}
        self.headers = {"Authorization": f"Bearer {token}"}
        self.secret = secret
        self.boot = boot
        self.session = aiohttp.ClientSession()
        self.active: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.booting: set[int] = set()
        self.changed = asyncio.Event()
        self.guests: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in self.guests:
            task.cancel()
        await self.session.close()

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path, headers=self.headers) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def pve_requests(self, *, clear: bool = False) -> collections.Counter[str]:
        """The simulator's request log (method and path with the vmid/UPID generalized)."""
        url = self.sim_control + "/requests"
        kwargs: dict[str, Any] = {"ssl": self.sim_ssl, "headers": self.sim_headers}
        async with self.session.get(url, **kwargs) as resp:
            resp.raise_for_status()
            records = await resp.json()
        if clear:
            async with self.session.delete(url, **kwargs) as resp:
                resp.raise_for_status()
        return collections.Counter(f"{r['method']} {r['endpoint'] or r['path']}" for r in records)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                releases = await self.get("/api/v1/releases")
                if releases["active"]:
                    return
            await asyncio.sleep(0.1)
        msg = "the companion did not come up with an active release"
        raise RuntimeError(msg)

    async def follow(self) -> None:
        """Read the event stream; play each guest's first boot when it is started."""
        last = (await self.get("/api/v1/overview"))["last_event_id"]
        url = f"{self.base}/api/v1/events?since={last}"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(url, headers=self.headers, timeout=timeout) as resp:
            event, data = "", ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and event:
                    if event == "instance.state":
                        self.on_state(json.loads(data))
                    event, data = "", ""

    def on_state(self, instance: dict[str, Any]) -> None:
        iid = int(instance["id"])
        if instance["state"] == "awaiting_firstboot" and iid not in self.booting:
            self.booting.add(iid)
            task = asyncio.ensure_future(self.guest(instance))
            self.guests.add(task)
            task.add_done_callback(self.guests.discard)
        elif instance["state"] == "active":
            self.active.setdefault(iid, time.monotonic())
            self.changed.set()
        elif instance["state"] == "failed":
            self.failed[iid] = str(instance["error"])
            self.changed.set()

    async def guest(self, instance: dict[str, Any]) -> None:
        """What ctrlable-firstboot.sh does over HTTP, after the guest's boot time."""
        await asyncio.sleep(self.boot)
        headers = {"X-Ctrlable-Secret": self.secret}
        params = {"hostname": instance["hostname"], "mac": instance["mac"]}
        async with self.session.get(
            self.base + "/api/provision/assignment", params=params, headers=headers
        ) as resp:
            resp.raise_for_status()
            await resp.json()
        report = {**params, "machine_id_changed": True, "app_restart": "queued"}
        async with self.session.post(
            self.base + "/api/provision/complete", json=report, headers=headers
        ) as resp:
            resp.raise_for_status()

    async def deploy(self, project: str, types: list[str]) -> list[int]:
        async with self.session.post(
            self.base + "/api/v1/deploy",
            json={"project": project, "types": types},
            headers=self.headers,
        ) as resp:
            body = await resp.json()
            if resp.status != 202:
                msg = f"deploy refused: {resp.status} {body}"
                raise RuntimeError(msg)
        return [int(i["id"]) for i in body["instances"]]

    async def until_done(self, ids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(i in self.active or i in self.failed for i in ids):
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"not done after {timeout:g} s: {sorted(set(ids) - set(self.active))}"
                raise RuntimeError(msg)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def ideal_seconds(types: list[str], clone: float, start: float, boot: float) -> float:
    counts = collections.Counter(types)
    return max(n * clone + start for n in counts.values()) + boot


async def run(args: argparse.Namespace) -> int:
    types = [t for t in args.types.split(",") if t]
    token, secret = secrets.token_hex(16), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        workdir = Path(tmp)
        sim_proc, sim = start_sim(args, workdir)
        port = free_port()
        companion = start_companion(sim, workdir, token, secret, port)
        bench = Bench(f"http://127.0.0.1:{port}", token, secret, args.boot, sim)
        follower: asyncio.Task[None] | None = None
        profiler: subprocess.Popen[bytes] | None = None
        try:
            await bench.wait_ready()
            follower = asyncio.ensure_future(bench.follow())
            await asyncio.sleep(0.3)  # the stream is open
            ideal = ideal_seconds(types, args.clone, args.start, args.boot)
            cpu0, t0 = cpu_seconds(companion.pid), time.monotonic()
            await asyncio.sleep(3.0)
            idle = (cpu_seconds(companion.pid) - cpu0) / (time.monotonic() - t0)
            print(f"companion idle: {idle * 1000:.1f} ms CPU per second")
            walls, cpus = [], []
            for n in range(args.rounds):
                if args.profile and n == min(1, args.rounds - 1):
                    # py-spy (pip install py-spy) samples every thread of the companion, from
                    # the first warm round on
                    profiler = start_profiler(companion.pid, args.profile)
                await asyncio.sleep(1.0)  # let the previous round's background work settle
                await bench.pve_requests(clear=True)
                threads0, t0 = thread_cpu(companion.pid), time.monotonic()
                cpu0 = sum(threads0.values())
                ids = await bench.deploy(f"bench-{n}", types)
                await bench.until_done(ids, timeout=ideal * 5 + 30)
                wall = max(bench.active.get(i, time.monotonic()) for i in ids) - t0
                cpu = cpu_seconds(companion.pid) - cpu0
                pve = await bench.pve_requests()
                threads = thread_cpu(companion.pid)
                main_cpu = threads.get(companion.pid, 0.0) - threads0.get(companion.pid, 0.0)
                failed = {i: bench.failed[i] for i in ids if i in bench.failed}
                if failed:
                    print(f"round {n}: FAILED instances: {failed}")
                    return 1
                walls.append(wall)
                cpus.append(cpu / len(ids))
                print(
                    f"round {n}: {len(ids)} guests active in {wall:.2f} s "
                    f"(ideal {ideal:.2f} s, {wall / ideal:.3f}x); "
                    f"companion CPU {cpu * 1000:.0f} ms = {cpu / len(ids) * 1000:.1f} ms/instance; "
                    f"{pve.total() / len(ids):.1f} PVE requests/instance"
                )
                if args.verbose:
                    print(
                        f"    event-loop thread {main_cpu * 1000:.0f} ms, "
                        f"other threads (PVE workers, SQLite) {(cpu - main_cpu) * 1000:.0f} ms"
                    )
                    for request, count in sorted(pve.items()):
                        print(f"    {count:3d} {request}")
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(BaseException):
                    await follower
            await bench.close()
            for proc in (companion, sim_proc):
                proc.send_signal(signal.SIGTERM)
            for proc in (companion, sim_proc):
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    first_wall, first_cpu = walls[0], cpus[0] * 1000
    warm_walls, warm_cpus = walls[1:] or walls, [c * 1000 for c in cpus[1:] or cpus]
    wall, cpu_ms = statistics.median(warm_walls), statistics.median(warm_cpus)
    ratio = wall / ideal
    print(
        f"deploy of {len(types)} guests ({','.join(types)}), clone {args.clone:g} s, "
        f"start {args.start:g} s, boot {args.boot:g} s"
    )
    print(
        f"  first round (task durations not learned yet): wall {first_wall:.2f} s = "
        f"{first_wall / ideal:.3f}x, companion CPU {first_cpu:.1f} ms/instance"
    )
    print(f"  warm rounds ({len(warm_walls)}), medians:")
    print(
        f"  wall {wall:.2f} s vs ideal critical path {ideal:.2f} s = {ratio:.3f}x "
        f"(goal <= {WALL_GOAL:.2f}x): {'ok' if ratio <= WALL_GOAL else 'MISSED'}"
    )
    print(
        f"  companion CPU {cpu_ms:.1f} ms/instance (range {min(warm_cpus):.1f}-"
        f"{max(warm_cpus):.1f}; goal < {CPU_GOAL_MS:g} ms): "
        f"{'ok' if cpu_ms < CPU_GOAL_MS else 'MISSED'}"
    )
    met = ratio <= WALL_GOAL and cpu_ms < CPU_GOAL_MS
    return 0 if met or not args.strict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="the first, then warm ones")
    parser.add_argument("--clone", type=float, default=2.0, help="vzclone task seconds")
    parser.add_argument("--start", type=float, default=1.0, help="vzstart task seconds")
    parser.add_argument("--boot", type=float, default=0.0, help="guest boot before first boot")
    parser.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated, repeats allowed")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--verbose", action="store_true", help="list each round's PVE requests")
    parser.add_argument("--profile", type=Path, help="write a py-spy raw profile of the companion")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
