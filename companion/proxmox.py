"""The Proxmox boundary: every call the companion makes to PVE goes through here.

proxmoxer is blocking, so each request runs in a small dedicated thread pool; every worker
thread owns its own ``ProxmoxAPI`` (and so its own ``requests`` session). PVE's answers become
typed results (``Guest``, ``NodeStatus``) and its errors typed exceptions parsed from the reason
phrase PVE puts on the status line (see docs/proxmox.md for the full mapping).

Facts this module relies on are in ``shared/reference/proxmox-api.md`` (cited as §n):
booleans go out as 1/0 (§1), a missing guest is a 500 ``Configuration file ... does not exist``
(§1), lock errors are sync 500s or task failures (§4, §6), tasks are polled until ``stopped``
and ``OK``/``WARNINGS: n`` mean success (§7), ``/cluster/nextid`` answers a string (§2).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import requests

from .errors import ApiError
from .pve_http import PveSession, Timeout, TlsFailure, TransportError

if TYPE_CHECKING:
    from .settings import Settings

_LOGGER = logging.getLogger(__name__)

Kind = Literal["lxc", "qemu"]
PowerAction = Literal["start", "stop", "shutdown", "reboot"]
KINDS: tuple[Kind, ...] = ("lxc", "qemu")
POWER_ACTIONS: tuple[PowerAction, ...] = ("start", "stop", "shutdown", "reboot")
#: The guest status each power action leaves behind.
POWER_RESULT: dict[str, str] = {
    "start": "running",
    "reboot": "running",
    "stop": "stopped",
    "shutdown": "stopped",
}
LOG_TAIL_LINES = 20
#: Task types whose id is the clone's source (a template).
CLONE_TASKS = frozenset({"vzclone", "qmclone"})

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Exceptions. They are ApiErrors, so a handler that lets one escape still answers clear JSON.
# --------------------------------------------------------------------------------------------


class ProxmoxError(ApiError):
    """PVE refused or failed a request. ``status_code`` is PVE's HTTP status (None if none)."""

    status = 502
    code = "pve_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request: str | None = None,
        details: Any = None,
    ) -> None:
        if details is None:
            details = {"pve_status": status_code, "request": request}
        super().__init__(message, details=details)
        self.status_code = status_code
        self.request = request


class PveUnavailable(ProxmoxError):
    """PVE could not be reached or did not answer in time (connection, timeout, no quorum)."""

    status = 503
    code = "pve_unavailable"


class PveTlsError(PveUnavailable):
    """The PVE certificate failed verification (CA or pinned fingerprint). Never retried."""

    status = 502
    code = "pve_tls_error"


class PveAuthError(ProxmoxError):
    """PVE rejected the API token (401)."""

    code = "pve_auth_failed"


class PvePermissionDenied(ProxmoxError):
    """The API token lacks a privilege (403). ``path``/``privilege`` are None for PVE's bare
    ``Permission check failed`` (an ``or`` of several checks)."""

    code = "pve_permission_denied"

    def __init__(
        self,
        message: str,
        *,
        path: str | None,
        privilege: str | None,
        status_code: int | None = 403,
        request: str | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            request=request,
            details={"path": path, "privilege": privilege, "request": request},
        )
        self.path = path
        self.privilege = privilege


class PveNotFound(ProxmoxError):
    """The guest, node or task does not exist."""

    status = 404
    code = "pve_not_found"


class PveLocked(ProxmoxError):
    """The guest (or a lock file / storage) is locked; retried with backoff on requests."""

    status = 409
    code = "pve_locked"


class PveAlreadyRunning(ProxmoxError):
    status = 409
    code = "pve_already_running"


class PveNotRunning(ProxmoxError):
    status = 409
    code = "pve_not_running"


class PveAlreadyExists(ProxmoxError):
    status = 409
    code = "pve_already_exists"


class PveInvalidParameter(ProxmoxError):
    """PVE's parameter verification failed (400); ``errors`` is its per-parameter map."""

    code = "pve_invalid_parameter"

    def __init__(
        self,
        message: str,
        *,
        errors: Mapping[str, str],
        status_code: int | None = 400,
        request: str | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            request=request,
            details={"errors": dict(errors), "request": request},
        )
        self.errors = dict(errors)


class PveNotImplemented(ProxmoxError):
    """PVE has no such path or method (501)."""

    code = "pve_not_implemented"


class PveTaskFailed(ProxmoxError):
    """A PVE task ended with an exit status other than ``OK`` / ``WARNINGS: n``."""

    code = "pve_task_failed"

    def __init__(self, upid: str, exitstatus: str, log_tail: list[str]) -> None:
        super().__init__(
            f"Proxmox task {upid_type(upid) or 'task'} failed: {exitstatus}",
            details={"upid": upid, "exitstatus": exitstatus, "log_tail": log_tail},
        )
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail


class PveTaskTimeout(ProxmoxError):
    """A task was still running when the companion stopped waiting (it may still finish)."""

    status = 504
    code = "pve_task_timeout"

    def __init__(self, upid: str, waited: float, log_tail: list[str]) -> None:
        super().__init__(
            f"Proxmox task {upid_type(upid) or 'task'} still running after {waited:.0f} s",
            details={"upid": upid, "waited": round(waited, 1), "log_tail": log_tail},
        )
        self.upid = upid
        self.waited = waited
        self.log_tail = log_tail


# --------------------------------------------------------------------------------------------
# Pure parsing: PVE's wire format to Python.
# --------------------------------------------------------------------------------------------

_PERMISSION_RE = re.compile(r"Permission check failed \((?P<path>[^,()]+),\s*(?P<priv>[^()]+)\)")
_LOCKED_RE = re.compile(
    r"(?:is locked \(|can't lock file|cfs-lock|got lock request timeout)", re.IGNORECASE
)
_NOT_FOUND_RE = re.compile(
    r"(?:Configuration file '[^']*' does not exist|does not exist|no such cluster node|"
    r"hostname lookup '[^']*' failed|no such (?:VM|CT|task|node|storage))",
    re.IGNORECASE,
)
_UNAVAILABLE_RE = re.compile(r"(?:cluster not ready|no quorum)", re.IGNORECASE)
_WARNINGS_RE = re.compile(r"^WARNINGS: \d+$")


def parse_permission(reason: str) -> tuple[str | None, str | None]:
    """``Permission check failed (/vms/100, VM.PowerMgmt)`` -> ``("/vms/100", "VM.PowerMgmt")``;
    the bare form (an ``or`` check) gives ``(None, None)``."""
    match = _PERMISSION_RE.search(reason)
    if match is None:
        return None, None
    return match.group("path").strip(), match.group("priv").strip()


def _errors_map(errors: Any) -> dict[str, str]:
    if isinstance(errors, Mapping):
        return {
            str(k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip()
            for k, v in errors.items()
        }
    return {}


def map_error(
    status_code: int, reason: str, errors: Any = None, *, request: str | None = None
) -> ProxmoxError:
    """Turn one failed PVE answer (status, reason phrase, ``errors`` body) into a typed error."""
    reason = (reason or "").strip()
    where = f" ({request})" if request else ""
    if status_code == 401:
        return PveAuthError(
            f"Proxmox rejected the API token: {reason or 'authentication failed'}",
            status_code=401,
            request=request,
        )
    if status_code == 403:
        path, privilege = parse_permission(reason)
        if privilege:
            message = f"Proxmox token lacks {privilege} on {path}{where}"
        else:
            message = f"Proxmox permission check failed{where}"
        return PvePermissionDenied(
            message, path=path, privilege=privilege, status_code=403, request=request
        )
    if status_code == 400:
        fields = _errors_map(errors)
        if any("already exists" in v for v in fields.values()):
            first = next(v for v in fields.values() if "already exists" in v)
            return PveAlreadyExists(f"Proxmox: {first}", status_code=400, request=request)
        summary = "; ".join(f"{k}: {v}" for k, v in sorted(fields.items())) or reason
        return PveInvalidParameter(
            f"Proxmox rejected the parameters{where}: {summary}",
            errors=fields,
            status_code=400,
            request=request,
        )
    if status_code == 501:
        return PveNotImplemented(
            f"Proxmox: {reason or 'not implemented'}", status_code=501, request=request
        )
    message = f"Proxmox: {reason}" if reason else f"Proxmox answered HTTP {status_code}{where}"
    if status_code >= 500 or status_code == 409:
        cls = classify_message(reason)
        if cls is not None:
            return cls(message, status_code=status_code, request=request)
    if status_code in (502, 503, 504) or status_code >= 595:
        # 595-599 are pveproxy's own codes when it cannot reach another node.
        return PveUnavailable(message, status_code=status_code, request=request)
    return ProxmoxError(message, status_code=status_code, request=request)


def classify_message(text: str) -> type[ProxmoxError] | None:
    """The typed error a PVE die-text (sync 500 or task exit status) stands for, if any."""
    if _LOCKED_RE.search(text):
        return PveLocked
    if "already running" in text:
        return PveAlreadyRunning
    if "not running" in text:
        return PveNotRunning
    if "already exists" in text:
        return PveAlreadyExists
    if _NOT_FOUND_RE.search(text):
        return PveNotFound
    if _UNAVAILABLE_RE.search(text):
        return PveUnavailable
    return None


def task_succeeded(exitstatus: str | None) -> bool:
    """``OK`` and ``WARNINGS: n`` are success (§7); anything else is a failure."""
    if exitstatus is None:
        return False
    return exitstatus == "OK" or bool(_WARNINGS_RE.match(exitstatus))


@dataclass(frozen=True, slots=True)
class Upid:
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str


def parse_upid(upid: str) -> Upid:
    """``UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`` (9 fields with the trailing
    colon; hex numbers). Raises ValueError on anything else."""
    parts = upid.split(":")
    if len(parts) != 9 or parts[0] != "UPID" or parts[8] != "" or not parts[1]:
        msg = f"not a PVE UPID: {upid!r}"
        raise ValueError(msg)
    try:
        pid, pstart, starttime = (int(p, 16) for p in parts[2:5])
    except ValueError:
        msg = f"not a PVE UPID: {upid!r}"
        raise ValueError(msg) from None
    return Upid(parts[1], pid, pstart, starttime, parts[5], parts[6], parts[7])


def upid_type(upid: str) -> str | None:
    try:
        return parse_upid(upid).type
    except ValueError:
        return None


def to_pve_params(values: Mapping[str, Any]) -> dict[str, str | int | float]:
    """Parameters as PVE wants them: booleans as 1/0 (never ``True``), None dropped, lists
    comma-joined (``delete``)."""
    out: dict[str, str | int | float] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, int | float | str):
            out[key] = value
        elif isinstance(value, list | tuple | set | frozenset):
            out[key] = ",".join(str(v) for v in value)
        else:
            msg = f"{key}: cannot send a {type(value).__name__} to Proxmox"
            raise TypeError(msg)
    return out


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _kind(value: Any) -> Kind:
    if value in KINDS:
        return cast(Kind, value)
    msg = f"kind must be one of {', '.join(KINDS)}, got {value!r}"
    raise ValueError(msg)


def placeholder_name(kind: str, vmid: int) -> str:
    """The name PVE shows for a guest it has not named yet: ``CT<vmid>`` / ``VM<vmid>``."""
    return ("CT" if kind == "lxc" else "VM") + str(vmid)


@dataclass(frozen=True, slots=True)
class Guest:
    """One guest from ``/cluster/resources?type=vm``. Right after a clone PVE may report
    ``status == "unknown"`` without a name for a few seconds (§3): that is kept as is."""

    vmid: int
    node: str
    type: Kind
    name: str
    status: str
    template: bool
    cpu: float = 0.0
    maxcpu: int = 0
    mem: int = 0
    maxmem: int = 0
    uptime: int = 0
    lock: str | None = None
    tags: tuple[str, ...] = ()
    pool: str | None = None

    @property
    def settling(self) -> bool:
        """PVE has not reported on this guest yet (fresh clone)."""
        return self.status == "unknown"

    @classmethod
    def from_resource(cls, entry: Mapping[str, Any]) -> Guest:
        kind = _kind(entry.get("type") or str(entry.get("id", "")).partition("/")[0])
        vmid = _int(entry.get("vmid"), -1)
        if vmid < 0:
            vmid = _int(str(entry.get("id", "")).partition("/")[2], -1)
        if vmid < 0:
            msg = f"guest entry without a vmid: {dict(entry)!r}"
            raise ValueError(msg)
        name = entry.get("name") or placeholder_name(kind, vmid)
        tags = tuple(t for t in re.split(r"[;, ]", str(entry.get("tags") or "")) if t)
        return cls(
            vmid=vmid,
            node=str(entry.get("node") or ""),
            type=kind,
            name=str(name),
            status=str(entry.get("status") or "unknown"),
            template=bool(_int(entry.get("template"))),
            cpu=_float(entry.get("cpu")),
            maxcpu=_int(entry.get("maxcpu")),
            mem=_int(entry.get("mem")),
            maxmem=_int(entry.get("maxmem")),
            uptime=_int(entry.get("uptime")),
            lock=str(entry["lock"]) if entry.get("lock") else None,
            tags=tags,
            pool=str(entry["pool"]) if entry.get("pool") else None,
        )

    def as_dict(self, instance_id: int | None = None) -> dict[str, Any]:
        """The API shape of docs/api.md (``Guest``)."""
        return {
            "vmid": self.vmid,
            "node": self.node,
            "type": self.type,
            "name": self.name,
            "status": self.status,
            "template": self.template,
            "cpu": self.cpu,
            "maxcpu": self.maxcpu,
            "mem": self.mem,
            "maxmem": self.maxmem,
            "uptime": self.uptime,
            "instance_id": instance_id,
        }

    def resource(self) -> dict[str, Any]:
        """A ``/cluster/resources``-like dict (what ``Releases.adopt`` reads)."""
        return {
            "id": f"{self.type}/{self.vmid}",
            "vmid": self.vmid,
            "node": self.node,
            "type": self.type,
            "name": self.name,
            "status": self.status,
            "template": int(self.template),
            "tags": ";".join(self.tags),
        }


@dataclass(frozen=True, slots=True)
class Storage:
    storage: str
    type: str
    total: int
    used: int
    avail: int
    active: bool = True
    enabled: bool = True
    shared: bool = False
    content: tuple[str, ...] = ()

    @classmethod
    def from_api(cls, entry: Mapping[str, Any]) -> Storage:
        return cls(
            storage=str(entry.get("storage", "")),
            type=str(entry.get("type", "")),
            total=_int(entry.get("total")),
            used=_int(entry.get("used")),
            avail=_int(entry.get("avail")),
            active=bool(_int(entry.get("active"), 1)),
            enabled=bool(_int(entry.get("enabled"), 1)),
            shared=bool(_int(entry.get("shared"))),
            content=tuple(c for c in str(entry.get("content") or "").split(",") if c),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "type": self.type,
            "total": self.total,
            "used": self.used,
            "avail": self.avail,
        }


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node's health: ``/nodes`` entry refined by ``/nodes/{n}/status``, plus its storages."""

    node: str
    status: str
    cpu: float = 0.0
    maxcpu: int = 0
    mem: int = 0
    maxmem: int = 0
    uptime: int = 0
    storages: tuple[Storage, ...] = ()
    loadavg: tuple[float, ...] = ()
    pveversion: str | None = None

    @classmethod
    def from_api(
        cls,
        entry: Mapping[str, Any],
        status: Mapping[str, Any] | None = None,
        storages: list[Mapping[str, Any]] | None = None,
    ) -> NodeStatus:
        cpu = _float(entry.get("cpu"))
        maxcpu = _int(entry.get("maxcpu"))
        mem = _int(entry.get("mem"))
        maxmem = _int(entry.get("maxmem"))
        uptime = _int(entry.get("uptime"))
        loadavg: tuple[float, ...] = ()
        pveversion = None
        if status:
            cpu = _float(status.get("cpu"), cpu)
            cpuinfo = status.get("cpuinfo") or {}
            maxcpu = _int(cpuinfo.get("cpus"), maxcpu)
            memory = status.get("memory") or {}
            mem = _int(memory.get("used"), mem)
            maxmem = _int(memory.get("total"), maxmem)
            uptime = _int(status.get("uptime"), uptime)
            loadavg = tuple(_float(x) for x in status.get("loadavg") or ())
            pveversion = str(status["pveversion"]) if status.get("pveversion") else None
        return cls(
            node=str(entry.get("node", "")),
            status=str(entry.get("status") or "unknown"),
            cpu=cpu,
            maxcpu=maxcpu,
            mem=mem,
            maxmem=maxmem,
            uptime=uptime,
            storages=tuple(
                sorted((Storage.from_api(s) for s in storages or ()), key=lambda s: s.storage)
            ),
            loadavg=loadavg,
            pveversion=pveversion,
        )

    def as_dict(self) -> dict[str, Any]:
        """The API shape of docs/api.md (``Node``)."""
        return {
            "node": self.node,
            "status": self.status,
            "cpu": self.cpu,
            "maxcpu": self.maxcpu,
            "mem": self.mem,
            "maxmem": self.maxmem,
            "uptime": self.uptime,
            "storages": [s.as_dict() for s in self.storages],
        }


def normalize_fingerprint(value: str) -> str:
    """``AA:BB:...`` (or bare hex) SHA-256 -> 64 lowercase hex digits; ValueError otherwise."""
    digits = value.strip().replace(":", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        msg = "must be a SHA-256 certificate fingerprint: 64 hex digits, colons optional"
        raise ValueError(msg)
    return digits


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff for requests PVE refused with a lock error or that could not reach PVE.
    Only whole requests are retried, never a task that ran and failed."""

    attempts: int = 8
    first_delay: float = 0.25
    factor: float = 2.0
    max_delay: float = 5.0
    jitter: float = 0.2

    def delays(self) -> Iterator[float]:
        delay = self.first_delay
        for _ in range(self.attempts - 1):
            yield delay * (1 + random.uniform(-self.jitter, self.jitter))
            delay = min(self.max_delay, delay * self.factor)


@dataclass(frozen=True, slots=True)
class TaskPolicy:
    """How tasks are waited on. The poll interval grows with the task's age (``growth`` of the
    time waited so far, between ``first_poll`` and ``max_poll``), so a short task is noticed
    within tens of milliseconds and a long clone costs one poll every couple of seconds."""

    first_poll: float = 0.04
    growth: float = 0.12
    max_poll: float = 2.0
    timeout: float = 900.0
    missing_grace: float = 3.0  # a fresh UPID may answer 400 "no such task" this long
    settle: float = 0.05  # past a learned duration: poll every this fraction of it

    def next_poll(self, waited: float, expected: float | None = None) -> float:
        """The pause before the next poll. With ``expected`` (what this kind of task took
        last time) the first poll comes when the task should be done (never later than
        ``max_poll``), then every ``settle`` of it, growing again if it runs long: one or two
        polls per task instead of dozens, each a PVE request."""
        if expected is None or expected <= 0:
            return min(self.max_poll, max(self.first_poll, waited * self.growth))
        if waited < expected:
            return min(self.max_poll, max(self.first_poll, expected - waited))
        overtime = (waited - expected) * self.growth
        return min(self.max_poll, max(self.first_poll, expected * self.settle, overtime))


# --------------------------------------------------------------------------------------------
# Transport: proxmoxer in worker threads, one client (and one keep-alive connection: its
# session is pve_http.PveSession) per thread.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to reach PVE. The secret never appears in ``repr``."""

    host: str
    port: int
    user: str
    token_name: str
    token_secret: str = field(repr=False)
    verify: bool | str = True
    fingerprint: str | None = None
    timeout: float = 10.0
    path_prefix: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        token_id: str,
        token_secret: str,
        *,
        verify_tls: bool = True,
        ca_file: str | None = None,
        fingerprint: str | None = None,
        timeout: float = 10.0,
    ) -> Connection:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            msg = f"pve_url: must be an https:// URL, got {url!r}"
            raise ValueError(msg)
        user, sep, token_name = token_id.partition("!")
        if not sep or "@" not in user or not token_name:
            msg = "pve_token_id: must look like USER@REALM!TOKENID"
            raise ValueError(msg)
        pinned = normalize_fingerprint(fingerprint) if fingerprint else None
        verify: bool | str
        if ca_file:
            verify = ca_file
        elif pinned:
            verify = False  # the pinned fingerprint is the trust anchor
        else:
            verify = verify_tls
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        prefix = parts.path.strip("/").removesuffix("api2/json").strip("/") or None
        return cls(
            host=host,
            port=parts.port or 8006,
            user=user,
            token_name=token_name,
            token_secret=token_secret,
            verify=verify,
            fingerprint=pinned,
            timeout=timeout,
            path_prefix=prefix,
        )

    def make_api(self) -> Any:
        from proxmoxer import ProxmoxAPI

        api = ProxmoxAPI(
            self.host,
            port=self.port,
            user=self.user,
            token_name=self.token_name,
            token_value=self.token_secret,
            verify_ssl=self.verify,
            timeout=self.timeout,
            path_prefix=self.path_prefix,
            backend="https",
            service="PVE",
        )
        # proxmoxer keeps its session in the resource store (copied into every resource made
        # from the API object): give it ours, see pve_http.py.
        original = api._store.get("session")
        if not isinstance(original, requests.Session):
            msg = "proxmoxer's session is not where this proxmoxer version keeps it"
            raise TypeError(msg)
        original.close()
        api._store["session"] = PveSession(
            authorization=self.authorization,
            verify=self.verify,
            fingerprint=self.fingerprint,
            timeout=self.timeout,
        )
        return api

    @property
    def authorization(self) -> str:
        """The API token header value (Proxmox: ``PVEAPIToken=USER@REALM!TOKENID=SECRET``)."""
        return f"PVEAPIToken={self.user}!{self.token_name}={self.token_secret}"


class _Transport:
    """Blocking calls; runs inside worker threads. Maps every failure to a ProxmoxError."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._local = threading.local()
        self._lock = threading.Lock()
        self._apis: list[Any] = []
        self.calls = 0  # requests sent (for tests and the bench)

    def _api(self) -> Any:
        api = getattr(self._local, "api", None)
        if api is None:
            api = self._connection.make_api()
            self._local.api = api
            with self._lock:
                self._apis.append(api)
        return api

    def call(self, method: str, path: str, params: Mapping[str, Any] | None) -> Any:
        from proxmoxer.core import ResourceException

        request = f"{method} /{path}"
        resource = self._api()(path)
        data = dict(params or {})
        with self._lock:
            self.calls += 1
        try:
            if method == "GET":
                return resource.get(**data)
            if method == "POST":
                return resource.post(**data)
            if method == "PUT":
                return resource.put(**data)
            if method == "DELETE":
                return resource.delete(**data)
        except ResourceException as err:
            raise map_error(
                int(err.status_code), str(err.content or ""), err.errors, request=request
            ) from None
        except TlsFailure as err:
            raise PveTlsError(
                f"Proxmox TLS verification failed ({request}): {_short(err)}", request=request
            ) from None
        except Timeout:
            raise PveUnavailable(
                f"Proxmox did not answer within {self._connection.timeout:g} s ({request})",
                request=request,
            ) from None
        except TransportError as err:
            raise PveUnavailable(
                f"Proxmox unreachable ({request}): {_short(err)}", request=request
            ) from None
        msg = f"unsupported method {method}"
        raise ValueError(msg)

    def close(self) -> None:
        with self._lock:
            apis, self._apis = self._apis, []
        for api in apis:
            session = api._store.get("session")
            if isinstance(session, PveSession):
                session.close()


def _short(err: BaseException) -> str:
    text = str(err)
    for marker in ("Fingerprints did not match", "CERTIFICATE_VERIFY_FAILED", "Connection refused"):
        if marker in text:
            return marker
    return text[:200]


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskResult:
    upid: str
    exitstatus: str


class ProxmoxClient:
    """Async facade over PVE. Every method may raise a ``ProxmoxError`` subclass."""

    def __init__(
        self,
        connection: Connection,
        *,
        retry: RetryPolicy | None = None,
        tasks: TaskPolicy | None = None,
        max_workers: int = 4,
    ) -> None:
        self.connection = connection
        self.retry = retry or RetryPolicy()
        self.tasks = tasks or TaskPolicy()
        self._transport = _Transport(connection)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pve")
        self._clone_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._durations: dict[str, float] = {}  # learned task durations (see wait_task)
        self._problems: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
        self._problem_origins: dict[tuple[str, str | None, str | None], set[str]] = {}
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxmoxClient:
        try:
            connection = Connection.from_url(
                settings.pve_url,
                settings.pve_token_id,
                settings.pve_token_secret.get_secret_value(),
                verify_tls=settings.pve_verify_tls,
                ca_file=str(settings.pve_ca_file) if settings.pve_ca_file else None,
                fingerprint=settings.pve_fingerprint,
                timeout=settings.pve_timeout,
            )
        except ValueError as err:
            text = str(err)
            name, sep, rest = text.partition(": ")
            if sep and name.startswith("pve_"):
                text = f"CTRLABLE_{name.upper()}: {rest}"
            elif "fingerprint" in text:
                text = f"CTRLABLE_PVE_FINGERPRINT: {text}"
            raise ValueError(text) from None
        if connection.verify is False and not connection.fingerprint:
            _LOGGER.warning("PVE TLS verification is off (CTRLABLE_PVE_VERIFY_TLS=false)")
        return cls(connection)

    @property
    def calls(self) -> int:
        """Requests sent to PVE so far (every attempt counts)."""
        return self._transport.calls

    # -- lifecycle of the client itself -------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: connections are opened on first use."""

    async def stop(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    # -- problems (missing privileges, auth, reachability) ------------------------------------

    def problems(self) -> list[dict[str, Any]]:
        """What currently stops the companion from doing its job on PVE, for the overview:
        ``{"code": "missing_privilege", "message", "privilege", "path"}`` per privilege PVE
        refused (cleared once the same request succeeds), ``pve_auth_failed`` and
        ``pve_tls_error`` (cleared by any successful request). Unreachability is not listed:
        the caller sees it as the ``PveUnavailable`` its own request raised."""
        return [dict(p) for p in self._problems.values()]

    def _note_failure(self, request: str, err: ProxmoxError) -> None:
        problem: dict[str, Any]
        if isinstance(err, PvePermissionDenied):
            key: tuple[str, str | None, str | None] = (
                "missing_privilege",
                err.path,
                err.privilege,
            )
            problem = {
                "code": "missing_privilege",
                "message": err.message,
                "privilege": err.privilege,
                "path": err.path,
            }
        elif isinstance(err, PveAuthError):
            key = ("pve_auth_failed", None, None)
            problem = {"code": "pve_auth_failed", "message": err.message}
        elif isinstance(err, PveTlsError):
            key = ("pve_tls_error", None, None)
            problem = {"code": "pve_tls_error", "message": err.message}
        else:
            return
        self._problems[key] = problem
        self._problem_origins.setdefault(key, set()).add(request)

    def _note_success(self, request: str) -> None:
        if not self._problems:
            return
        for key in list(self._problems):
            origins = self._problem_origins.get(key, set())
            if key[0] != "missing_privilege":
                origins.clear()  # PVE answered: auth, TLS and reachability are fine
            else:
                origins.discard(request)
            if not origins:
                self._problems.pop(key, None)
                self._problem_origins.pop(key, None)

    # -- requests -----------------------------------------------------------------------------

    async def _run(self, func: Callable[[], T]) -> T:
        if self._closed:
            msg = "Proxmox client is closed"
            raise PveUnavailable(msg)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func)

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        retry: bool = True,
    ) -> Any:
        """One PVE call (``path`` relative to ``/api2/json``), retried with backoff while PVE
        answers a lock error (nothing was done) or cannot be reached. Every mutating call made
        through here is idempotent or handles its own "already done" answer."""
        path = path.strip("/")
        pve_params = to_pve_params(params or {})
        request = f"{method} /{path}"
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                result = await self._run(lambda: self._transport.call(method, path, pve_params))
            except ProxmoxError as err:
                self._note_failure(request, err)
                retryable = isinstance(err, PveLocked) or (
                    isinstance(err, PveUnavailable) and not isinstance(err, PveTlsError)
                )
                delay = next(delays, None) if retryable else None
                if delay is None:
                    raise
                _LOGGER.info("retrying %s in %.2f s: %s", request, delay, err.message)
                await asyncio.sleep(delay)
                continue
            self._note_success(request)
            return result

    # -- tasks --------------------------------------------------------------------------------

    async def wait_task(self, upid: str, *, timeout: float | None = None) -> TaskResult:
        """Poll a task until it stops; ``OK``/``WARNINGS: n`` return, anything else raises
        ``PveTaskFailed`` with the log's last lines. A UPID PVE does not know yet (400 ``no
        such task``) is polled again for ``missing_grace`` seconds."""
        try:
            parsed = parse_upid(upid)
        except ValueError as err:
            raise ProxmoxError(f"Proxmox returned {upid!r} instead of a task id") from err
        node = parsed.node
        limit = self.tasks.timeout if timeout is None else timeout
        # Tasks of one type (and id: a clone's source) take about as long each time: poll when
        # the last one was done instead of on a fixed schedule.
        keys = (f"{parsed.type}:{parsed.id}", parsed.type)
        expected = next((self._durations[k] for k in keys if k in self._durations), None)
        running_seen = False
        started = time.monotonic()
        path = f"nodes/{node}/tasks/{upid}/status"
        while True:
            waited = time.monotonic() - started
            await asyncio.sleep(self.tasks.next_poll(waited, expected))
            waited = time.monotonic() - started
            try:
                status = await self.request("GET", path)
            except PveInvalidParameter as err:
                unknown = "no such task" in err.errors.get("upid", "") or (
                    "no such task" in err.message
                )
                if unknown and waited < self.tasks.missing_grace:
                    continue
                raise
            if isinstance(status, Mapping) and status.get("status") == "stopped":
                exitstatus = str(status.get("exitstatus") or "unexpected status")
                if task_succeeded(exitstatus):
                    self._learn(keys, expected, waited, running_seen)
                    return TaskResult(upid, exitstatus)
                raise PveTaskFailed(upid, exitstatus, await self.task_log_tail(upid))
            running_seen = True
            if waited >= limit:
                raise PveTaskTimeout(upid, waited, await self.task_log_tail(upid))

    def learned_durations(self) -> dict[str, float]:
        """What is worth keeping across a restart of what ``wait_task`` learned: per task type,
        and per clone source (a template is cloned again and again; a started guest's own id
        says nothing about the next one)."""
        return {
            key: value
            for key, value in self._durations.items()
            if ":" not in key or key.partition(":")[0] in CLONE_TASKS
        }

    def remember_durations(self, durations: Mapping[str, Any]) -> None:
        """Take durations kept by :meth:`learned_durations` (what this run learned wins)."""
        for key, value in durations.items():
            if isinstance(value, int | float) and 0 < value <= self.tasks.timeout:
                self._durations.setdefault(str(key), float(value))

    def _learn(
        self, keys: tuple[str, ...], expected: float | None, waited: float, running_seen: bool
    ) -> None:
        """Remember how long a successful task took: the time it was seen stopped (an upper
        bound); if the first poll found it done already, creep 5 % lower so a task that got
        faster is noticed."""
        if expected is not None and not running_seen:
            value = min(expected, waited) * 0.95
        else:
            value = waited
        for key in keys:
            self._durations[key] = value

    async def task_log_tail(self, upid: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The task log's last ``lines`` lines (best effort: [] if the log cannot be read)."""
        try:
            node = parse_upid(upid).node
            log = await self.request(
                "GET", f"nodes/{node}/tasks/{upid}/log", {"start": 0, "limit": 5000}
            )
        except (ProxmoxError, ValueError):
            return []
        if not isinstance(log, list):
            return []
        entries = sorted((e for e in log if isinstance(e, Mapping)), key=lambda e: _int(e.get("n")))
        return [str(e.get("t", "")) for e in entries][-lines:]

    async def _run_task(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> TaskResult | None:
        """A call that may answer a UPID: wait for it. ``None`` when PVE answered synchronously."""
        result = await self.request(method, path, params)
        if isinstance(result, str) and result.startswith("UPID:"):
            return await self.wait_task(result, timeout=timeout)
        return None

    # -- reads --------------------------------------------------------------------------------

    async def version(self) -> dict[str, Any]:
        result = await self.request("GET", "version")
        return dict(result) if isinstance(result, Mapping) else {}

    async def guests(self, *, retry: bool = False) -> list[Guest]:
        """Every guest of the cluster the token may see, from ONE ``/cluster/resources`` call."""
        # A dashboard read has no retry loop by default (the next poll is the retry), so an
        # unreachable PVE is reported at once instead of after the whole backoff.
        entries = await self.request("GET", "cluster/resources", {"type": "vm"}, retry=retry)
        guests = []
        for entry in entries or ():
            if not isinstance(entry, Mapping) or entry.get("type") not in KINDS:
                continue
            try:
                guests.append(Guest.from_resource(entry))
            except ValueError:
                _LOGGER.warning("ignoring an odd /cluster/resources entry: %r", entry)
        return sorted(guests, key=lambda g: g.vmid)

    async def find_guest(self, vmid: int) -> Guest | None:
        """The guest with this vmid on any node (its ``node`` is where it lives), or None."""
        return next((g for g in await self.guests(retry=True) if g.vmid == vmid), None)

    async def node_of(self, vmid: int) -> str:
        guest = await self.find_guest(vmid)
        if guest is None:
            msg = f"Proxmox has no guest {vmid}"
            raise PveNotFound(msg)
        return guest.node

    async def nodes(self) -> list[NodeStatus]:
        """Health of every node: ``/nodes``, then per online node its status and storages.
        A node whose status PVE refuses (no Sys.Audit) is still listed from ``/nodes`` and the
        missing privilege is recorded in ``problems()``."""
        listed = await self.request("GET", "nodes", retry=False)  # a dashboard read, see guests()
        entries = [e for e in listed or () if isinstance(e, Mapping)]

        async def optional(path: str) -> Any:
            # Degrade, do not fail: a refused or unreachable detail leaves the /nodes numbers
            # (and the refusal is in problems()).
            try:
                return await self.request("GET", path, retry=False)
            except (PvePermissionDenied, PveUnavailable, PveNotFound) as err:
                _LOGGER.info("node detail %s unavailable: %s", path, err.message)
                return None

        async def one(entry: Mapping[str, Any]) -> NodeStatus:
            name = str(entry.get("node", ""))
            if entry.get("status") != "online":
                return NodeStatus.from_api(entry)
            status, storages = await asyncio.gather(
                optional(f"nodes/{name}/status"), optional(f"nodes/{name}/storage")
            )
            return NodeStatus.from_api(
                entry,
                status if isinstance(status, Mapping) else None,
                [s for s in storages if isinstance(s, Mapping)]
                if isinstance(storages, list)
                else None,
            )

        results = await asyncio.gather(*(one(e) for e in entries))
        return sorted(results, key=lambda n: n.node)

    async def next_vmid(self) -> int:
        """A free vmid (PVE answers a string, sometimes an int). Not reserved: a clone with it
        may still find it taken."""
        value = await self.request("GET", "cluster/nextid")
        try:
            return int(value)
        except (TypeError, ValueError):
            msg = f"Proxmox /cluster/nextid answered {value!r}"
            raise ProxmoxError(msg) from None

    async def status(self, kind: Kind, node: str, vmid: int) -> dict[str, Any]:
        kind = _kind(kind)
        result = await self.request("GET", f"nodes/{node}/{kind}/{vmid}/status/current")
        return dict(result) if isinstance(result, Mapping) else {}

    async def guest_config(self, kind: Kind, node: str, vmid: int) -> dict[str, Any]:
        kind = _kind(kind)
        result = await self.request("GET", f"nodes/{node}/{kind}/{vmid}/config")
        return dict(result) if isinstance(result, Mapping) else {}

    async def agent_interfaces(self, node: str, vmid: int) -> list[dict[str, Any]]:
        """The QEMU guest agent's network interfaces; [] while PVE answers that the agent is not
        running (yet). A VM that is not running raises ``PveNotRunning``; a VM without an agent
        configured raises ``ProxmoxError``."""
        try:
            result = await self.request(
                "GET", f"nodes/{node}/qemu/{vmid}/agent/network-get-interfaces", retry=False
            )
        except ProxmoxError as err:
            if err.status_code == 500 and "agent is not running" in err.message:
                return []
            raise
        items = result.get("result") if isinstance(result, Mapping) else result
        return [dict(i) for i in items or () if isinstance(i, Mapping)]

    # -- writes -------------------------------------------------------------------------------

    async def set_config(self, kind: Kind, node: str, vmid: int, **values: Any) -> None:
        """Synchronous config update (PUT for both kinds; LXC has no POST, §5)."""
        kind = _kind(kind)
        params = to_pve_params(values)
        if not params:
            msg = "set_config: no values given"
            raise ValueError(msg)
        await self.request("PUT", f"nodes/{node}/{kind}/{vmid}/config", params)

    async def power(
        self, kind: Kind, node: str, vmid: int, action: PowerAction, *, timeout: float | None = None
    ) -> str:
        """start / stop / shutdown / reboot and wait for the task. Idempotent: starting a
        running guest or stopping a stopped one succeeds (LXC answers those with a sync 500,
        QEMU with a task, §6). Returns the status the guest is left in. Rebooting a stopped
        guest raises ``PveNotRunning``."""
        kind = _kind(kind)
        if action not in POWER_ACTIONS:
            msg = f"action must be one of {', '.join(POWER_ACTIONS)}, got {action!r}"
            raise ValueError(msg)
        path = f"nodes/{node}/{kind}/{vmid}/status/{action}"
        try:
            await self._run_task("POST", path, timeout=timeout)
        except PveAlreadyRunning:
            if action != "start":
                raise
        except PveNotRunning:
            if action not in ("stop", "shutdown"):
                raise
        except PveTaskFailed as err:
            if not (action == "start" and classify_message(err.exitstatus) is PveAlreadyRunning):
                raise
        return POWER_RESULT[action]

    async def destroy(
        self, kind: Kind, node: str, vmid: int, *, timeout: float | None = None
    ) -> None:
        """Stop the guest, then delete it with ``purge=1``. A guest that is already gone is
        fine (idempotent)."""
        kind = _kind(kind)
        try:
            await self.power(kind, node, vmid, "stop", timeout=timeout)
            await self._run_task(
                "DELETE",
                f"nodes/{node}/{kind}/{vmid}",
                {"purge": True, "destroy-unreferenced-disks": True},
                timeout=timeout,
            )
        except PveNotFound:
            return

    def _clone_lock(self, node: str, source_vmid: int) -> asyncio.Lock:
        key = (node, source_vmid)
        lock = self._clone_locks.get(key)
        if lock is None:
            lock = self._clone_locks[key] = asyncio.Lock()
        return lock

    async def clone(
        self,
        kind: Kind,
        node: str,
        source_vmid: int,
        newid: int,
        name: str,
        *,
        full: bool | None = None,
        target: str | None = None,
        storage: str | None = None,
        pool: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Clone ``source_vmid`` (on ``node``) to ``newid`` named ``name`` and wait for the task.

        ``full=None`` leaves PVE's default: a linked clone from a template, full otherwise.
        LXC clones of one source run one at a time (PVE locks the source with ``disk``, §4).
        If ``newid`` already exists and is ours (same name), the clone counts as done (a
        retried or resumed clone); otherwise ``PveAlreadyExists``."""
        kind = _kind(kind)
        params: dict[str, Any] = {
            "newid": newid,
            "hostname" if kind == "lxc" else "name": name,
            "full": full,
            "target": target,
            "storage": storage,
            "pool": pool,
            "description": description,
        }
        path = f"nodes/{node}/{kind}/{source_vmid}/clone"
        if kind == "lxc":
            async with self._clone_lock(node, source_vmid):
                await self._clone(kind, path, params, newid, name, target or node, timeout)
        else:
            await self._clone(kind, path, params, newid, name, target or node, timeout)

    async def _clone(
        self,
        kind: Kind,
        path: str,
        params: dict[str, Any],
        newid: int,
        name: str,
        target_node: str,
        timeout: float | None,
    ) -> None:
        try:
            await self._run_task("POST", path, params, timeout=timeout)
        except PveAlreadyExists:
            if not await self._is_our_clone(kind, target_node, newid, name):
                raise
            _LOGGER.info("clone %s -> %s already exists and is ours; waiting for it", path, newid)
            await self._wait_unlocked(kind, target_node, newid, timeout)

    async def _is_our_clone(self, kind: Kind, node: str, vmid: int, name: str) -> bool:
        try:
            config = await self.guest_config(kind, node, vmid)
        except PveNotFound:
            guest = await self.find_guest(vmid)
            if guest is None or guest.type != kind:
                return False
            node = guest.node
            config = await self.guest_config(kind, node, vmid)
        return config.get("hostname" if kind == "lxc" else "name") == name

    async def _wait_unlocked(self, kind: Kind, node: str, vmid: int, timeout: float | None) -> None:
        """Wait until a guest carries no lock (an in-flight clone of ours finishing)."""
        limit = self.tasks.timeout if timeout is None else timeout
        started = time.monotonic()
        while True:
            state = await self.status(kind, node, vmid)
            if not state.get("lock"):
                return
            waited = time.monotonic() - started
            if waited >= limit:
                msg = f"guest {vmid} still locked ({state.get('lock')}) after {waited:.0f} s"
                raise PveLocked(msg)
            await asyncio.sleep(self.tasks.next_poll(waited))
