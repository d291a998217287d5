"""A PVE 8.3 API simulator (aiohttp, HTTPS) for tests, benches and the demo. See docs/simulator.md.

async with run_simulator(SimConfig(task_seconds=0.05)) as sim:
    prox = ProxmoxAPI(**sim.proxmoxer_kwargs())
"""

from companion.sim.core import PveError, SimConfig, SimCore
from companion.sim.faults import FaultRule, Faults, RequestLog, RequestRecord
from companion.sim.model import ClusterState, Guest, Node, Storage
from companion.sim.perms import CTRLABLE_ROLE, Acl, Token
from companion.sim.seed import DEFAULT_TEMPLATES, TemplateSpec, seed_default, templates_from_release
from companion.sim.server import (
    Simulator,
    ThreadedSimulator,
    run_simulator,
    run_simulator_in_thread,
)
from companion.sim.tasks import Task

__all__ = [
    "CTRLABLE_ROLE",
    "DEFAULT_TEMPLATES",
    "Acl",
    "ClusterState",
    "FaultRule",
    "Faults",
    "Guest",
    "Node",
    "PveError",
    "RequestLog",
    "RequestRecord",
    "SimConfig",
    "SimCore",
    "Simulator",
    "Storage",
    "Task",
    "TemplateSpec",
    "ThreadedSimulator",
    "Token",
    "run_simulator",
    "run_simulator_in_thread",
    "seed_default",
    "templates_from_release",
]
