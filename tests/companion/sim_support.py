"""Helpers for the PVE simulator's own tests: a fast config, proxmoxer in threads, raw HTTPS."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from companion.sim import SimConfig, Simulator, Token

T = TypeVar("T")


def fast_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {
        "task_seconds": 0.05,
        "flock_timeout": 0.3,
        "clone_flock_timeout": 0.2,
        "seed": 7,
    }
    values.update(overrides)
    return SimConfig(**values)


def prox(sim: Simulator, token: Token | None = None) -> Any:
    """A proxmoxer client that verifies the simulator's certificate against its CA file."""
    return ProxmoxAPI(**sim.proxmoxer_kwargs(token), timeout=10)


async def run(fn: Callable[[], T]) -> T:
    """Run a blocking proxmoxer call in a worker thread (the simulator shares our loop)."""
    return await asyncio.to_thread(fn)


async def fails(fn: Callable[[], Any]) -> ResourceException:
    try:
        await run(fn)
    except ResourceException as exc:
        return exc
    msg = "expected a ResourceException"
    raise AssertionError(msg)


async def wait_task(client: Any, upid: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll the task status endpoint (like a client would) until the task stops."""
    node = upid.split(":")[1]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status: dict[str, Any] = await run(lambda: client.nodes(node).tasks(upid).status.get())
        if status["status"] == "stopped":
            return status
        if loop.time() > deadline:
            msg = f"task {upid} still running after {timeout}s"
            raise AssertionError(msg)
        await asyncio.sleep(0.02)


async def task_log(client: Any, upid: str) -> list[str]:
    node = upid.split(":")[1]
    lines = await run(lambda: client.nodes(node).tasks(upid).log.get(limit=500))
    return [line["t"] for line in lines]


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """aiohttp over real HTTPS (CA-verified), for status lines, headers and exact bodies."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._ssl = ssl.create_default_context(cafile=str(sim.ca_file))
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: Token | None = None,
        auth: str | None = None,
        base: str | None = None,
        **kwargs: Any,
    ) -> RawResponse:
        headers = dict(kwargs.pop("headers", {}))
        if auth is not None:
            headers["Authorization"] = auth
        else:
            headers.update(self.sim.auth_header(token))
        url = (base or self.sim.url) + path
        async with self.session.request(
            method, url, headers=headers, ssl=self._ssl, **kwargs
        ) as resp:
            return RawResponse(
                resp.status, resp.reason or "", dict(resp.headers), await resp.read()
            )
