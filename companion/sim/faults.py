"""Fault injection (per-endpoint error rate, extra latency, fail-next-N) and the request log."""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FaultRule:
    """Applies to requests whose path matches ``endpoint`` and whose method matches ``method``.

    ``endpoint`` is either a schema template (``/nodes/{node}/lxc/{vmid}/clone``) or a glob on the
    concrete path below ``/api2/json`` (``/nodes/*/lxc/*/clone``, ``*``).
    """

    endpoint: str = "*"
    method: str | None = None
    latency: float = 0.0
    error_rate: float = 0.0
    fail_next: int = 0
    status: int = 500
    message: str = "simulated failure"

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            msg = f"error_rate must be within 0..1, got {self.error_rate}"
            raise ValueError(msg)
        if self.latency < 0:
            msg = f"latency must be >= 0, got {self.latency}"
            raise ValueError(msg)
        if self.fail_next < 0:
            msg = f"fail_next must be >= 0, got {self.fail_next}"
            raise ValueError(msg)
        if not 400 <= self.status <= 599:
            msg = f"status must be an HTTP error status (400-599), got {self.status}"
            raise ValueError(msg)
        if "\n" in self.message or "\r" in self.message:
            msg = "message must be one line (it becomes the HTTP reason phrase)"
            raise ValueError(msg)
        if self.method is not None:
            self.method = self.method.upper()

    def matches(self, method: str, path: str, template: str | None) -> bool:
        if self.method is not None and self.method != method:
            return False
        if template is not None and self.endpoint == template:
            return True
        return fnmatch.fnmatchcase(path, self.endpoint)


@dataclass(frozen=True)
class InjectedError:
    status: int
    message: str


@dataclass
class TaskFault:
    message: str
    count: int  # remaining; -1 = every time


@dataclass
class RequestRecord:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    time: float  # wall clock (epoch seconds) when the request arrived
    duration: float
    endpoint: str | None  # the schema template, when the path matched one
    token: str | None  # full token id of the caller, when authenticated
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Faults:
    """All knobs that make the simulator misbehave on purpose. Safe to mutate from tests."""

    rng: random.Random = field(default_factory=random.Random)
    rules: list[FaultRule] = field(default_factory=list)
    task_faults: dict[str, list[TaskFault]] = field(default_factory=dict)
    task_warnings: dict[str, int] = field(default_factory=dict)

    def add(self, rule: FaultRule) -> FaultRule:
        self.rules.append(rule)
        return rule

    def set_latency(self, endpoint: str, seconds: float, method: str | None = None) -> FaultRule:
        return self.add(FaultRule(endpoint=endpoint, method=method, latency=seconds))

    def set_error_rate(
        self,
        endpoint: str,
        rate: float,
        *,
        status: int = 500,
        message: str = "simulated failure",
        method: str | None = None,
    ) -> FaultRule:
        return self.add(
            FaultRule(
                endpoint=endpoint, method=method, error_rate=rate, status=status, message=message
            )
        )

    def fail_next(
        self,
        count: int = 1,
        endpoint: str = "*",
        *,
        status: int = 500,
        message: str = "simulated failure",
        method: str | None = None,
    ) -> FaultRule:
        return self.add(
            FaultRule(
                endpoint=endpoint, method=method, fail_next=count, status=status, message=message
            )
        )

    def fail_task(self, task_type: str, message: str, count: int = 1) -> None:
        """Make the next ``count`` tasks of ``task_type`` (e.g. ``vzclone``) fail with ``message``
        (``count=-1``: every one). Clone failures read ``clone failed: <message>`` as in PVE."""
        if count == 0 or count < -1:
            msg = f"count must be >= 1 or -1, got {count}"
            raise ValueError(msg)
        self.task_faults.setdefault(task_type, []).append(TaskFault(message, count))

    def warn_task(self, task_type: str, warnings: int) -> None:
        """Tasks of ``task_type`` end with ``WARNINGS: n`` (0 turns it off)."""
        if warnings < 0:
            msg = f"warnings must be >= 0, got {warnings}"
            raise ValueError(msg)
        if warnings:
            self.task_warnings[task_type] = warnings
        else:
            self.task_warnings.pop(task_type, None)

    def clear(self) -> None:
        self.rules.clear()
        self.task_faults.clear()
        self.task_warnings.clear()

    # -- used by the server --------------------------------------------------------------------

    def latency_for(self, method: str, path: str, template: str | None) -> float:
        return sum(r.latency for r in self.rules if r.matches(method, path, template))

    def error_for(self, method: str, path: str, template: str | None) -> InjectedError | None:
        for rule in self.rules:
            if not rule.matches(method, path, template):
                continue
            if rule.fail_next > 0:
                rule.fail_next -= 1
                return InjectedError(rule.status, rule.message)
            if rule.error_rate > 0 and self.rng.random() < rule.error_rate:
                return InjectedError(rule.status, rule.message)
        return None

    def take_task_fault(self, task_type: str) -> str | None:
        queue = self.task_faults.get(task_type)
        if not queue:
            return None
        fault = queue[0]
        if fault.count > 0:
            fault.count -= 1
            if fault.count == 0:
                queue.pop(0)
        return fault.message


class RequestLog:
    """The last ``limit`` API requests, oldest first."""

    def __init__(self, limit: int = 10000) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=limit)

    def append(self, record: RequestRecord) -> None:
        self._records.append(record)

    def records(self) -> list[RequestRecord]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()

    def count(self, method: str | None = None, endpoint: str | None = None) -> int:
        return sum(
            1
            for r in self._records
            if (method is None or r.method == method)
            and (
                endpoint is None or r.endpoint == endpoint or fnmatch.fnmatchcase(r.path, endpoint)
            )
        )


def wall_time() -> float:
    return time.time()
