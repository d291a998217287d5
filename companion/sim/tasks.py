"""UPID tasks (proxmox-api.md §7): workers that run for a configurable time, log, and end with
``OK``, ``WARNINGS: n``, an error text, or ``unexpected status`` (a worker that vanished)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from companion.sim.faults import Faults

_LOG = logging.getLogger(__name__)

UPID_RE = re.compile(
    r"^UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):"
    r"([0-9A-Fa-f]{8}):([^:\s]+):([^:\s]*):([^:\s]+):$"
)

KillMode = Literal["interrupt", "vanish"]


class TaskError(Exception):
    """A worker's ``die``: becomes the exitstatus and ``TASK ERROR: <message>``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message.rstrip("\n")


@dataclass
class Task:
    upid: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str  # the full user (``user@realm!token`` for tokens), as in the UPID
    status: str = "running"
    exitstatus: str | None = None
    log: list[str] = field(default_factory=list)
    kill_mode: KillMode | None = None
    runner: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def status_dict(self) -> dict[str, Any]:
        user, _, tokenid = self.user.partition("!")
        out: dict[str, Any] = {
            "upid": self.upid,
            "node": self.node,
            "pid": self.pid,
            "pstart": self.pstart,
            "starttime": self.starttime,
            "type": self.type,
            "id": self.id,
            "user": user,
            "status": self.status,
        }
        if tokenid:
            out["tokenid"] = tokenid
        if self.exitstatus is not None:
            out["exitstatus"] = self.exitstatus
        return out


Body = Callable[["TaskContext"], Awaitable[None]]


class TaskContext:
    """What a worker body gets: logging, its configured run time, injected failures."""

    def __init__(self, manager: TaskManager, task: Task) -> None:
        self.manager = manager
        self.task = task
        self.warnings = 0

    def log(self, line: str) -> None:
        self.task.log.append(line)

    def warn(self, line: str) -> None:
        self.warnings += 1
        self.task.log.append(f"WARN: {line}")

    @property
    def vanished(self) -> bool:
        return self.task.kill_mode == "vanish"

    def duration(self) -> float:
        return self.manager.duration(self.task.type)

    async def work(self, fraction: float = 1.0) -> None:
        """Spend (a fraction of) this task type's configured duration."""
        await asyncio.sleep(max(self.duration() * fraction, 0.0))

    def raise_injected(self) -> None:
        message = self.manager.faults.take_task_fault(self.task.type)
        if message is not None:
            raise TaskError(message)

    def reason(self, exc: BaseException, interrupted: str = "received interrupt") -> str:
        """The error text for an exception caught in a body's cleanup handler."""
        if isinstance(exc, TaskError):
            return exc.message
        if isinstance(exc, asyncio.CancelledError):
            return interrupted
        return str(exc) or type(exc).__name__


class TaskManager:
    def __init__(
        self,
        faults: Faults,
        durations: dict[str, float],
        default_duration: Callable[[], float],
        pid_source: Callable[[], int],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.faults = faults
        self.durations = durations
        self._default = default_duration
        self._pid = pid_source
        self._on_change = on_change
        self.tasks: dict[str, Task] = {}
        self._boot = time.monotonic() - 86400 * 3

    def duration(self, task_type: str) -> float:
        return self.durations.get(task_type, self._default())

    def start(self, node: str, task_type: str, task_id: str, user: str, body: Body) -> Task:
        pid = self._pid()
        pstart = int((time.monotonic() - self._boot) * 100)  # jiffies since "boot"
        starttime = int(time.time())
        upid = f"UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{task_type}:{task_id}:{user}:"
        task = Task(upid, node, pid, pstart, starttime, task_type, task_id, user)
        self.tasks[upid] = task
        ctx = TaskContext(self, task)
        task.runner = asyncio.get_running_loop().create_task(self._run(ctx, body), name=upid)
        return task

    async def _run(self, ctx: TaskContext, body: Body) -> None:
        task = ctx.task
        try:
            await body(ctx)
        except asyncio.CancelledError:
            if task.kill_mode == "vanish":
                self._finish(task, "unexpected status", final=None)
            else:
                self._finish(task, "received interrupt", final="TASK ERROR: received interrupt")
        except TaskError as exc:
            if task.kill_mode == "vanish":
                self._finish(task, "unexpected status", final=None)
            else:
                self._finish(task, exc.message, final=f"TASK ERROR: {exc.message}")
        except Exception as exc:
            _LOG.exception("simulated task %s crashed", task.upid)
            self._finish(task, f"internal error: {exc}", final=f"TASK ERROR: internal error: {exc}")
        else:
            warnings = ctx.warnings + self.faults.task_warnings.get(task.type, 0)
            for i in range(ctx.warnings, warnings):
                task.log.append(f"WARN: simulated warning {i + 1}")
            if warnings:
                self._finish(task, f"WARNINGS: {warnings}", final=f"TASK WARNINGS: {warnings}")
            else:
                self._finish(task, "OK", final="TASK OK")

    def _finish(self, task: Task, exitstatus: str, final: str | None) -> None:
        if final is not None:
            task.log.append(final)
        task.status = "stopped"
        task.exitstatus = exitstatus
        task.done.set()
        if self._on_change is not None:
            self._on_change()

    async def kill(self, upid: str, mode: KillMode = "interrupt") -> Task:
        """Stop a running task: ``interrupt`` (like ``DELETE /tasks/{upid}``: the worker's cleanup
        runs, exitstatus is its error) or ``vanish`` (the worker dies without cleanup; locks stay;
        exitstatus ``unexpected status``)."""
        task = self.tasks.get(upid)
        if task is None:
            msg = f"no such task {upid!r}"
            raise KeyError(msg)
        if task.status == "running" and task.runner is not None:
            task.kill_mode = mode
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.done.wait()
        return task

    async def wait(self, upid: str, timeout: float | None = None) -> Task:
        task = self.tasks[upid]
        await asyncio.wait_for(task.done.wait(), timeout)
        return task

    def running(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == "running"]

    async def shutdown(self) -> None:
        runners = [t.runner for t in self.running() if t.runner is not None]
        for runner in runners:
            runner.cancel()
        if runners:
            await asyncio.gather(*runners, return_exceptions=True)
