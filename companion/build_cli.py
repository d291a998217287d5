"""``ctrlable-companion build RELEASE [TEMPLATE...]``: start a build through the HTTP API
of the companion and follow it (``GET /api/v1/builds/{id}``) with a text progress bar.

The token comes from ``CTRLABLE_API_TOKEN`` (environment, else the env file); the companion URL from
``--url``, else ``CTRLABLE_PUBLIC_URL``, else ``http://127.0.0.1:8580``.
Exit status: 0 built, 1 the build failed or was cancelled, 2 usage or configuration error,
3 the companion refused the request (e.g. 409: another build is running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .settings import SettingsError, read_env_file

FINAL = ("succeeded", "failed", "cancelled")
BAR_WIDTH = 30


class CliError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlable-companion build",
        description="Build the templates of a release on the PVE host and show the progress.",
    )
    parser.add_argument("release", help="release to build, e.g. 2026.06")
    parser.add_argument("templates", nargs="*", help="templates to build (default: all)")
    parser.add_argument("--url", help="companion URL (default: CTRLABLE_PUBLIC_URL)")
    parser.add_argument(
        "--env-file", type=Path, help="read CTRLABLE_* from this file (default: ./.env if present)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between progress polls (default 1)"
    )
    parser.add_argument("--no-follow", action="store_true", help="start the build and exit")
    return parser


def _config(args: argparse.Namespace, environ: dict[str, str]) -> tuple[str, str]:
    values: dict[str, str] = {}
    env_file = args.env_file
    if env_file is None and Path(".env").is_file():
        env_file = Path(".env")
    if env_file is not None:
        try:
            values.update(read_env_file(env_file))
        except (OSError, SettingsError) as err:
            raise CliError(f"cannot read {env_file}: {err}", 2) from None
    values.update({k: v for k, v in environ.items() if k.startswith("CTRLABLE_")})
    token = values.get("CTRLABLE_API_TOKEN", "")
    if not token:
        raise CliError("CTRLABLE_API_TOKEN is not set (environment or --env-file)", 2)
    url = args.url or values.get("CTRLABLE_PUBLIC_URL") or "http://127.0.0.1:8580"
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--url: {url!r} is not an http(s) URL", 2)
    return url.rstrip("/"), token


def render(build: dict[str, Any]) -> str:
    """One progress line: bar, percent, state and what the running template is doing."""
    percent = int(build.get("percent") or 0)
    filled = BAR_WIDTH * percent // 100
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    templates: dict[str, dict[str, Any]] = build.get("templates") or {}
    done = sum(1 for t in templates.values() if t.get("state") in FINAL)
    line = f"[{bar}] {percent:3d}% {build.get('state')} ({done}/{len(templates)})"
    running = [(n, t) for n, t in templates.items() if t.get("state") == "running"]
    if running:
        name, item = running[0]
        detail = f"{name} {item.get('percent', 0)}% {item.get('step') or ''}"
        message = str(item.get("message") or "")
        line += f" {detail}: {message}" if message else f" {detail}"
    return line[:160]


def summary(build: dict[str, Any]) -> list[str]:
    lines = [f"build {build['id']} of release {build['release']}: {build['state']}"]
    for name, item in (build.get("templates") or {}).items():
        if item.get("state") == "succeeded":
            lines.append(
                f"  {name:<18} ok      template {item.get('template_vmid')}"
                f"  {item.get('app_version') or ''}"
            )
        else:
            lines.append(f"  {name:<18} {item.get('state'):<7} {item.get('error') or ''}")
    if build.get("error"):
        lines.append(f"error: {build['error']}")
    return lines


async def _request(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    try:
        async with session.request(method, url, json=body) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = {"error": {"message": (await resp.text())[:300]}}
            return resp.status, data
    except aiohttp.ClientError as err:
        raise CliError(f"cannot reach the companion at {url}: {err}", 2) from None


def _api_error(status: int, data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return f"HTTP {status}: {data['error'].get('message')}"
    return f"HTTP {status}"


async def run(args: argparse.Namespace, environ: dict[str, str], out: TextIO) -> int:
    url, token = _config(args, environ)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        body = {"templates": args.templates} if args.templates else {}
        status, data = await _request(
            session, "POST", f"{url}/api/v1/releases/{args.release}/build", body
        )
        if status != 202:
            raise CliError(_api_error(status, data), 2 if status in (400, 401, 404) else 3)
        build: dict[str, Any] = data
        print(f"build {build['id']} of release {build['release']} started", file=out)
        if args.no_follow:
            return 0
        tty = out.isatty()
        last = ""
        while True:
            line = render(build)
            if line != last:
                if tty:
                    out.write("\r\x1b[K" + line)
                else:
                    out.write(line + "\n")
                out.flush()
                last = line
            if build["state"] in FINAL:
                break
            await asyncio.sleep(args.interval)
            status, data = await _request(session, "GET", f"{url}/api/v1/builds/{build['id']}")
            if status != 200:
                raise CliError(_api_error(status, data), 3)
            build = data
        if tty:
            out.write("\n")
        for text in summary(build):
            print(text, file=out)
        return 0 if build["state"] == "succeeded" else 1


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    args = _parser().parse_args(list(argv))
    if args.interval <= 0:
        print("ctrlable-companion build: --interval must be positive", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, dict(os.environ), out or sys.stdout))
    except CliError as err:
        print(f"ctrlable-companion build: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(
            "\nctrlable-companion build: stopped following; the build goes on "
            "(cancel it with POST /api/v1/builds/{id}/cancel)",
            file=sys.stderr,
        )
        return 1
