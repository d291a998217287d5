"""``ctrlable-companion sim``: run the PVE simulator standalone.

Prints one JSON line at start (url, token id and secret, certificate fingerprint, CA file, nodes)
so scripts can read it, then serves until SIGINT/SIGTERM. See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

from companion.sim.core import SimConfig
from companion.sim.seed import DEFAULT_TEMPLATES, TemplateSpec, templates_from_release
from companion.sim.server import Simulator

SECRET_ENV = "CTRLABLE_SIM_TOKEN_SECRET"  # noqa: S105 - an env var name
_RELEASE_NAME = re.compile(r"^\d{4}\.\d{2}(\.\d+)?\.ya?ml$")


def _duration(text: str) -> tuple[str, float]:
    task_type, sep, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not sep or not task_type or value < 0:
        msg = f"expected TYPE=SECONDS with SECONDS >= 0 (e.g. vzclone=3), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return task_type, value


def _template(text: str) -> TemplateSpec:
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[2].isdigit():
        msg = f"expected NAME:KIND:VMID[:NODE] (e.g. zwavejs:lxc:9010), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    spec = TemplateSpec(parts[0], parts[1], int(parts[2]), parts[3] if len(parts) == 4 else "pve")
    try:
        spec.pve_kind  # noqa: B018 - validates the kind
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        msg = f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctrlable-companion sim",
        description="Run the PVE 8.3 API simulator (HTTPS, self-signed) seeded with a release.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8006, help="listen port (default 8006; 0 = any)")
    p.add_argument("--state-file", type=Path, help="load state from / save state to this JSON file")
    p.add_argument("--cert-dir", type=Path, help="write ca.pem, node.pem, node.key here")
    p.add_argument("--task-seconds", type=_non_negative, default=2.0, help="default task time")
    p.add_argument(
        "--task-duration",
        type=_duration,
        action="append",
        default=[],
        metavar="TYPE=SECONDS",
        help="per task type, e.g. vzclone=5 (repeatable)",
    )
    p.add_argument("--resources-lag", type=_non_negative, default=5.0, help="fresh guest 'unknown'")
    p.add_argument("--auth-delay", type=_non_negative, default=3.0, help="delay before a 401")
    p.add_argument("--flock-timeout", type=_non_negative, default=10.0)
    p.add_argument("--message-in-body", action="store_true", help="8.4-style 'message' in errors")
    p.add_argument("--agent-ip", help="address every guest reports (default 10.x.y.z from vmid)")
    p.add_argument("--token-user", default="ctrlable@pve")
    p.add_argument("--token-name", default="provisioner")
    p.add_argument(
        "--nodes", default="pve", help="comma-separated node names (default pve); first is local"
    )
    p.add_argument("--release", type=Path, help="seed this release YAML's templates")
    p.add_argument(
        "--template",
        type=_template,
        action="append",
        default=[],
        metavar="NAME:KIND:VMID[:NODE]",
        help="seed this template instead of a release's (repeatable)",
    )
    p.add_argument("--no-seed", action="store_true", help="start empty (nodes only)")
    p.add_argument("--seed", type=int, help="RNG seed (MACs, numbers)")
    return p


def find_release() -> Path | None:
    """The newest ``releases/YYYY.MM.yaml`` in the working directory or the repository."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        directory = base / "releases"
        if directory.is_dir():
            files = sorted(p for p in directory.iterdir() if _RELEASE_NAME.match(p.name))
            if files:
                return files[-1]
    return None


def _templates(args: argparse.Namespace) -> list[TemplateSpec]:
    if args.template:
        return list(args.template)
    release = args.release or find_release()
    if release is None:
        return list(DEFAULT_TEMPLATES)
    return templates_from_release(release, node=args.nodes.split(",")[0])


async def serve(args: argparse.Namespace) -> int:
    secret = os.environ.get(SECRET_ENV) or None
    config = SimConfig(
        host=args.host,
        port=args.port,
        token_user=args.token_user,
        token_name=args.token_name,
        token_secret=secret,
        task_seconds=args.task_seconds,
        task_durations=dict(args.task_duration),
        resources_lag=args.resources_lag,
        auth_delay=args.auth_delay,
        flock_timeout=args.flock_timeout,
        message_in_body=args.message_in_body,
        agent_ip=args.agent_ip,
        seed=args.seed,
        cert_dir=args.cert_dir,
        state_file=args.state_file,
    )
    sim = Simulator(config)
    if not sim.state.nodes:
        for node in [n for n in args.nodes.split(",") if n]:
            sim.state.add_node(node)
        if not args.no_seed:
            sim.seed_default(_templates(args))
    await sim.start()
    print(json.dumps(sim.info(), sort_keys=True), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"ctrlable-companion sim: {exc}", file=sys.stderr)
        return 2
