"""Proxmox boundary benchmark, against the PVE simulator (real proxmoxer over HTTPS).

1. PVE API calls per host + guest refresh (``nodes()`` + ``guests()``) for 10, 100 and 500 guests,
   counted from the simulator's request log: must not grow with the number of guests.
2. The companion's added latency per PVE task: wall time of ``power(...)`` minus the task's own
   duration (from the simulator's task start to its end). Goal: under 150 ms.

Run: ``.venv311/bin/python bench/bench_proxmox.py`` (exit 1 if a goal is missed).
The simulator runs on its own event-loop thread, like a separate PVE process would.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from companion.proxmox import Connection, Kind, ProxmoxClient
from companion.sim import SimConfig, ThreadedSimulator, run_simulator_in_thread

GUEST_COUNTS = (10, 100, 500)
NODE_COUNTS = (1, 3)
TASK_SECONDS = (0.1, 0.5, 2.0)
RUNS_PER_DURATION = 6
LATENCY_GOAL = 0.150


def _client(threaded: ThreadedSimulator) -> ProxmoxClient:
    sim = threaded.sim
    connection = Connection.from_url(
        sim.base_url, sim.token_id, sim.token_secret, ca_file=str(sim.ca_file)
    )
    return ProxmoxClient(connection)


def _populate(threaded: ThreadedSimulator, nodes: int, guests: int) -> None:
    def fill() -> None:
        state = threaded.sim.state
        names = [f"pve{i}" if i else "pve" for i in range(nodes)]
        for name in names:
            if name not in state.nodes:
                state.add_node(name)
        for i in range(guests):
            kind: Kind = "lxc" if i % 3 else "qemu"
            state.add_guest(kind, 1000 + i, names[i % nodes], f"g{i}", running=i % 2 == 0)

    threaded.call(fill)


async def refresh_calls(nodes: int, guests: int) -> tuple[int, int, int]:
    """(calls, guests seen, nodes seen) for one host + guest refresh."""
    with run_simulator_in_thread(SimConfig(task_seconds=0.05, seed=1)) as threaded:
        _populate(threaded, nodes, guests)
        pve = _client(threaded)
        try:
            await pve.guests()  # warm the connection (TLS handshake) outside the count
            threaded.call(threaded.sim.request_log.clear)
            found_nodes, found_guests = await asyncio.gather(pve.nodes(), pve.guests())
            calls = threaded.call(lambda: len(threaded.sim.request_log.records()))
        finally:
            await pve.close()
    return calls, len(found_guests), len(found_nodes)


def _instrument(threaded: ThreadedSimulator) -> dict[str, list[float]]:
    """Record each simulated task's start and end (monotonic, same process) by upid."""
    times: dict[str, list[float]] = {}
    manager = threaded.sim.tasks
    start, finish = manager.start, manager._finish

    def timed_start(*args: Any, **kwargs: Any) -> Any:
        task = start(*args, **kwargs)
        times[task.upid] = [time.monotonic()]
        return task

    def timed_finish(task: Any, *args: Any, **kwargs: Any) -> None:
        times.setdefault(task.upid, [time.monotonic()]).append(time.monotonic())
        finish(task, *args, **kwargs)

    manager.start = timed_start  # type: ignore[method-assign]
    manager._finish = timed_finish  # type: ignore[method-assign]
    return times


async def task_latency(seconds: float) -> tuple[list[float], list[float], float]:
    """Added latency of ``power()`` per task (start + stop of an LXC): for the first task of each
    type (polled on the growth schedule) and for the later ones (polled around the duration the
    client learned), and the status polls per task."""
    cold: list[float] = []
    learned: list[float] = []
    with run_simulator_in_thread(SimConfig(task_seconds=seconds, seed=1)) as threaded:
        threaded.call(lambda: threaded.sim.state.add_guest("lxc", 500, "pve", "bench"))
        times = _instrument(threaded)
        pve = _client(threaded)
        try:
            await pve.guests()  # warm the connection
            threaded.call(threaded.sim.request_log.clear)
            for run in range(RUNS_PER_DURATION):
                for action in ("start", "stop"):
                    before = set(times)
                    began = time.monotonic()
                    await pve.power("lxc", "pve", 500, action)
                    wall = time.monotonic() - began
                    (upid,) = set(times) - before
                    task_start, task_end = times[upid]
                    (learned if run else cold).append(wall - (task_end - task_start))
            polls = threaded.call(
                lambda: threaded.sim.request_log.count("GET", "/nodes/*/tasks/*/status")
            )
        finally:
            await pve.close()
    return cold, learned, polls / (RUNS_PER_DURATION * 2)


async def main() -> int:
    ok = True
    print("PVE API calls per host + guest refresh (nodes() + guests())")
    print(f"{'nodes':>5} {'guests':>7} {'calls':>6} {'seen':>6}")
    for nodes in NODE_COUNTS:
        counts = set()
        for guests in GUEST_COUNTS:
            calls, seen, seen_nodes = await refresh_calls(nodes, guests)
            counts.add(calls)
            print(f"{nodes:>5} {guests:>7} {calls:>6} {seen:>6}")
            assert seen_nodes == nodes
        if len(counts) != 1:
            print(f"  FAIL: calls vary with the number of guests ({sorted(counts)})")
            ok = False
        else:
            print(f"  constant: {counts.pop()} calls (= 2 + 2 x {nodes} nodes)")

    print()
    print("Added latency per PVE task: wall time of power() minus the task's own duration")
    print("(first: first task of its type, polled on the growth schedule; then: later tasks,")
    print(" polled around the duration the client learned)")
    print(
        f"{'task s':>6} {'first max ms':>13} {'then median ms':>15} {'then max ms':>12}"
        f" {'polls/task':>11}"
    )
    for seconds in TASK_SECONDS:
        cold, learned, polls = await task_latency(seconds)
        median = statistics.median(learned) * 1000
        print(
            f"{seconds:>6.1f} {max(cold) * 1000:>13.1f} {median:>15.1f}"
            f" {max(learned) * 1000:>12.1f} {polls:>11.1f}"
        )
        if seconds == 0.5 and (median > LATENCY_GOAL * 1000 or max(cold) > LATENCY_GOAL * 1000):
            print(f"  FAIL: added latency above {LATENCY_GOAL * 1000:.0f} ms")
            ok = False
    print(f"goal: < {LATENCY_GOAL * 1000:.0f} ms added per 0.5 s task -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
