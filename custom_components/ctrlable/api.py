"""Asynchronous client for the Ctrlable companion HTTP API (docs/api.md).

The client is self-contained: it takes an aiohttp session (Home Assistant's shared one), sends the
API token as a Bearer header, parses answers into typed, frozen models and maps every failure to
one of its own exceptions. It never logs and never puts the token in a URL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import aiohttp
from yarl import URL

DEFAULT_TIMEOUT = 15.0
# The companion sends a keep-alive comment every 15 s; a silent stream is a dead stream.
EVENT_STREAM_READ_TIMEOUT = 45.0


class CtrlableError(Exception):
    """Base error of the Ctrlable client."""


class CtrlableConnectionError(CtrlableError):
    """The companion could not be reached or did not answer in time."""


class CtrlableAuthenticationError(CtrlableError):
    """The companion refused the API token (HTTP 401)."""


class CtrlableResponseError(CtrlableError):
    """The companion answered something that does not follow the API contract."""


class CtrlableApiError(CtrlableError):
    """The companion answered with an error document (HTTP 4xx/5xx)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


type JsonObject = Mapping[str, Any]


def _fail(key: str, expected: str) -> CtrlableResponseError:
    return CtrlableResponseError(f"invalid response: field '{key}' must be {expected}")


def _obj(data: Any, key: str = "body") -> JsonObject:
    if not isinstance(data, Mapping):
        raise _fail(key, "an object")
    return data


def _list(data: JsonObject, key: str) -> list[JsonObject]:
    value = data.get(key)
    if not isinstance(value, list):
        raise _fail(key, "a list")
    return [_obj(item, key) for item in value]


def _str(data: JsonObject, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _fail(key, "a string")
    return value


def _opt_str(data: JsonObject, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(key, "a string or null")
    return value


def _opt_int(data: JsonObject, key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(key, "an integer or null")
    return int(value)


def _opt_size(data: JsonObject, key: str) -> int | None:
    """A byte count or duration: an integer, tolerating a JSON float."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _fail(key, "a number or null")
    return int(value)


def _int(data: JsonObject, key: str) -> int:
    value = _opt_int(data, key)
    if value is None:
        raise _fail(key, "an integer")
    return value


def _opt_float(data: JsonObject, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, "a number or null")
    return float(value)


def _bool(data: JsonObject, key: str, default: bool = False) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _fail(key, "a boolean")
    return value


def _opt_time(data: JsonObject, key: str) -> datetime | None:
    value = _opt_str(data, key)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise _fail(key, "an ISO 8601 time") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Companion:
    """The companion itself."""

    version: str
    site_id: str
    name: str

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            version=_str(data, "version"), site_id=_str(data, "site_id"), name=_str(data, "name")
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Storage:
    """A storage as seen from one node."""

    storage: str
    type: str | None
    total: int | None
    used: int | None
    avail: int | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            storage=_str(data, "storage"),
            type=_opt_str(data, "type"),
            total=_opt_size(data, "total"),
            used=_opt_size(data, "used"),
            avail=_opt_size(data, "avail"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    """A Proxmox VE node."""

    node: str
    status: str
    cpu: float | None
    maxcpu: int | None
    mem: int | None
    maxmem: int | None
    uptime: int | None
    storages: tuple[Storage, ...] = ()

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        storages = _list(data, "storages") if data.get("storages") is not None else []
        return cls(
            node=_str(data, "node"),
            status=_str(data, "status"),
            cpu=_opt_float(data, "cpu"),
            maxcpu=_opt_int(data, "maxcpu"),
            mem=_opt_size(data, "mem"),
            maxmem=_opt_size(data, "maxmem"),
            uptime=_opt_size(data, "uptime"),
            storages=tuple(Storage.from_dict(item) for item in storages),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Guest:
    """A virtual machine (qemu) or container (lxc)."""

    vmid: int
    node: str
    type: str
    name: str
    status: str
    template: bool
    cpu: float | None
    maxcpu: int | None
    mem: int | None
    maxmem: int | None
    uptime: int | None
    instance_id: int | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        vmid = _int(data, "vmid")
        return cls(
            vmid=vmid,
            node=_str(data, "node"),
            type=_str(data, "type"),
            name=_opt_str(data, "name") or f"guest-{vmid}",
            status=_str(data, "status"),
            template=_bool(data, "template"),
            cpu=_opt_float(data, "cpu"),
            maxcpu=_opt_int(data, "maxcpu"),
            mem=_opt_size(data, "mem"),
            maxmem=_opt_size(data, "maxmem"),
            uptime=_opt_size(data, "uptime"),
            instance_id=_opt_int(data, "instance_id"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Project:
    """A dealer project (one customer site's stack)."""

    id: int
    name: str
    created_at: datetime | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            id=_int(data, "id"), name=_str(data, "name"), created_at=_opt_time(data, "created_at")
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Instance:
    """One deployed (or deploying) appliance."""

    id: int
    project: str
    type: str
    hostname: str
    release: str | None
    node: str | None
    vmid: int | None
    mac: str | None
    state: str
    error: str | None
    needs_binding: bool
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            id=_int(data, "id"),
            project=_str(data, "project"),
            type=_str(data, "type"),
            hostname=_str(data, "hostname"),
            release=_opt_str(data, "release"),
            node=_opt_str(data, "node"),
            vmid=_opt_int(data, "vmid"),
            mac=_opt_str(data, "mac"),
            state=_str(data, "state"),
            error=_opt_str(data, "error"),
            needs_binding=_bool(data, "needs_binding"),
            created_at=_opt_time(data, "created_at"),
            updated_at=_opt_time(data, "updated_at"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Template:
    """One template of a release (an appliance type)."""

    name: str
    kind: str
    template_vmid: int | None
    app_version: str | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            name=_str(data, "name"),
            kind=_str(data, "kind"),
            template_vmid=_opt_int(data, "template_vmid"),
            app_version=_opt_str(data, "app_version"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Release:
    """A release manifest known to the companion."""

    release: str
    state: str
    notes: str
    templates: tuple[Template, ...]

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        templates = _list(data, "templates") if data.get("templates") is not None else []
        return cls(
            release=_str(data, "release"),
            state=_str(data, "state"),
            notes=_opt_str(data, "notes") or "",
            templates=tuple(Template.from_dict(item) for item in templates),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Releases:
    """The releases block: which one is active, which one is the latest validated."""

    active: str | None
    latest: str | None
    releases: tuple[Release, ...]

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            active=_opt_str(data, "active"),
            latest=_opt_str(data, "latest"),
            releases=tuple(Release.from_dict(item) for item in _list(data, "releases")),
        )

    def get(self, release: str | None) -> Release | None:
        """Return the release called `release`, if known."""
        return next((item for item in self.releases if item.release == release), None)


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildTemplate:
    """Progress of one template inside a build."""

    state: str
    percent: int | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(state=_str(data, "state"), percent=_opt_int(data, "percent"))


@dataclass(frozen=True, kw_only=True, slots=True)
class Build:
    """A template build of one release on the Proxmox host."""

    id: int
    release: str
    state: str
    percent: int
    templates: Mapping[str, BuildTemplate]
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        templates = _obj(data.get("templates") or {}, "templates")
        return cls(
            id=_int(data, "id"),
            release=_str(data, "release"),
            state=_str(data, "state"),
            percent=_opt_int(data, "percent") or 0,
            templates={
                str(name): BuildTemplate.from_dict(_obj(item, f"templates.{name}"))
                for name, item in templates.items()
            },
            error=_opt_str(data, "error"),
            started_at=_opt_time(data, "started_at"),
            finished_at=_opt_time(data, "finished_at"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Platform:
    """State of the report-up to the central management platform."""

    last_success: datetime | None
    outbox_depth: int
    unreachable_since: datetime | None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            last_success=_opt_time(data, "last_success"),
            outbox_depth=_opt_int(data, "outbox_depth") or 0,
            unreachable_since=_opt_time(data, "unreachable_since"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """Something the companion cannot do on its own (e.g. a missing PVE privilege)."""

    code: str
    message: str
    privilege: str | None = None
    path: str | None = None

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            code=_str(data, "code"),
            message=_opt_str(data, "message") or "",
            privilege=_opt_str(data, "privilege"),
            path=_opt_str(data, "path"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Overview:
    """Everything Home Assistant polls, in one answer (`GET /api/v1/overview`)."""

    companion: Companion
    nodes: tuple[Node, ...]
    guests: tuple[Guest, ...]
    projects: tuple[Project, ...]
    instances: tuple[Instance, ...]
    releases: Releases
    builds: tuple[Build, ...]
    platform: Platform
    problems: tuple[Problem, ...] = ()
    last_event_id: int = 0

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        problems = _list(data, "problems") if data.get("problems") is not None else []
        return cls(
            companion=Companion.from_dict(_obj(data.get("companion"), "companion")),
            nodes=tuple(Node.from_dict(item) for item in _list(data, "nodes")),
            guests=tuple(Guest.from_dict(item) for item in _list(data, "guests")),
            projects=tuple(Project.from_dict(item) for item in _list(data, "projects")),
            instances=tuple(Instance.from_dict(item) for item in _list(data, "instances")),
            releases=Releases.from_dict(_obj(data.get("releases"), "releases")),
            builds=tuple(Build.from_dict(item) for item in _list(data, "builds")),
            platform=Platform.from_dict(_obj(data.get("platform"), "platform")),
            problems=tuple(Problem.from_dict(item) for item in problems),
            last_event_id=_opt_int(data, "last_event_id") or 0,
        )

    def guest(self, vmid: int) -> Guest | None:
        """Return the guest with this vmid, if present."""
        return next((guest for guest in self.guests if guest.vmid == vmid), None)

    def node(self, name: str) -> Node | None:
        """Return the node with this name, if present."""
        return next((node for node in self.nodes if node.node == name), None)

    def instance(self, instance_id: int) -> Instance | None:
        """Return the instance with this id, if present."""
        return next((item for item in self.instances if item.id == instance_id), None)


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestActionResult:
    """Answer of a power action on a guest."""

    vmid: int
    action: str
    status: str

    @classmethod
    def from_dict(cls, data: JsonObject) -> Self:
        return cls(
            vmid=_int(data, "vmid"), action=_str(data, "action"), status=_str(data, "status")
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CtrlableEvent:
    """One Server-Sent Event: `data` is the decoded JSON, or the raw text if it is not JSON."""

    id: int | None
    event: str
    data: Any


class SseParser:
    """Incremental parser for the text/event-stream format (one line at a time)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: int | None = None

    def feed(self, line: str) -> CtrlableEvent | None:
        """Consume one line (without its line ending); return an event when one is complete."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            try:
                self._id = int(value)
            except ValueError:
                self._id = None
        return None

    def _dispatch(self) -> CtrlableEvent | None:
        if not self._data:
            self._event = ""
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        event = CtrlableEvent(id=self._id, event=self._event or "message", data=data)
        self._event = ""
        self._data = []
        return event


class CtrlableClient:
    """Talks to one Ctrlable companion."""

    def __init__(
        self,
        url: str,
        token: str,
        session: aiohttp.ClientSession,
        *,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._base = URL(url.rstrip("/"))
        self._token = token
        self._session = session
        self._timeout = request_timeout

    @property
    def url(self) -> str:
        """The companion's base URL."""
        return str(self._base)

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "Accept": accept}

    def _url(self, path: str) -> URL:
        return self._base.with_path(self._base.path.rstrip("/") + path)

    @staticmethod
    def _raise_for_status(status: int, body: bytes) -> None:
        if status < 400:
            return
        code, message, details = "http_error", f"HTTP {status}", None
        try:
            error = json.loads(body)["error"]
            code = str(error["code"])
            message = str(error["message"])
            details = error.get("details")
        except (ValueError, KeyError, TypeError):
            pass
        if status == 401:
            raise CtrlableAuthenticationError(message)
        raise CtrlableApiError(status, code, message, details)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> JsonObject:
        headers = self._headers() if auth else {"Accept": "application/json"}
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.request(
                    method,
                    self._url(path),
                    json=body,
                    headers=headers,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    raw = await response.read()
        except TimeoutError as err:
            raise CtrlableConnectionError(
                f"timeout after {self._timeout:g} s talking to the companion"
            ) from err
        except aiohttp.ClientError as err:
            raise CtrlableConnectionError(f"cannot reach the companion: {err}") from err
        self._raise_for_status(status, raw)
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise CtrlableResponseError("invalid response: body is not JSON") from err
        return _obj(data)

    async def health(self) -> str:
        """Return the companion version (`GET /api/health`, no auth)."""
        return _str(await self._request("GET", "/api/health", auth=False), "version")

    async def overview(self) -> Overview:
        """Return everything Home Assistant shows (`GET /api/v1/overview`)."""
        return Overview.from_dict(await self._request("GET", "/api/v1/overview"))

    async def instance(self, instance_id: int) -> Instance:
        """Return one instance."""
        return Instance.from_dict(await self._request("GET", f"/api/v1/instances/{instance_id}"))

    async def build(self, build_id: int) -> Build:
        """Return one build."""
        return Build.from_dict(await self._request("GET", f"/api/v1/builds/{build_id}"))

    async def create_instance(
        self,
        *,
        project: str,
        instance_type: str,
        hostname: str,
        overrides: Mapping[str, Any] | None = None,
    ) -> Instance:
        """Deploy one instance (`POST /api/v1/instances`)."""
        body = {
            "project": project,
            "type": instance_type,
            "hostname": hostname,
            "overrides": dict(overrides or {}),
        }
        return Instance.from_dict(await self._request("POST", "/api/v1/instances", body=body))

    async def deploy(
        self,
        *,
        project: str,
        types: Sequence[str] | None = None,
        hostname_prefix: str | None = None,
    ) -> list[Instance]:
        """Deploy a stack (`POST /api/v1/deploy`)."""
        body: dict[str, Any] = {"project": project}
        if types is not None:
            body["types"] = list(types)
        if hostname_prefix:
            body["hostname_prefix"] = hostname_prefix
        data = await self._request("POST", "/api/v1/deploy", body=body)
        return [Instance.from_dict(item) for item in _list(data, "instances")]

    async def delete_instance(self, instance_id: int) -> Instance:
        """Remove an instance and destroy its guest."""
        return Instance.from_dict(await self._request("DELETE", f"/api/v1/instances/{instance_id}"))

    async def guest_action(self, vmid: int, action: str) -> GuestActionResult:
        """Start, stop, shut down or reboot a guest."""
        data = await self._request("POST", f"/api/v1/guests/{vmid}/{action}")
        return GuestActionResult.from_dict(data)

    async def build_release(self, release: str, templates: Sequence[str] | None = None) -> Build:
        """Start building the templates of a release (`POST /api/v1/releases/{r}/build`)."""
        body: dict[str, Any] = {}
        if templates is not None:
            body["templates"] = list(templates)
        data = await self._request("POST", f"/api/v1/releases/{release}/build", body=body)
        return Build.from_dict(data)

    async def events(self, since: int | None = None) -> AsyncIterator[CtrlableEvent]:
        """Yield events from `GET /api/v1/events`, replaying those after `since` first.

        Ends when the companion closes the stream; raises a `CtrlableError` on failures.
        """
        url = self._url("/api/v1/events")
        if since is not None:
            url = url.with_query(since=str(since))
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeout, sock_read=EVENT_STREAM_READ_TIMEOUT
        )
        parser = SseParser()
        try:
            async with self._session.get(
                url,
                headers=self._headers("text/event-stream"),
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                if response.status >= 400:
                    self._raise_for_status(response.status, await response.read())
                async for raw in response.content:
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as err:
                        raise CtrlableResponseError("invalid event stream: not UTF-8") from err
                    if (event := parser.feed(line)) is not None:
                        yield event
        except TimeoutError as err:
            raise CtrlableConnectionError("the event stream went silent") from err
        except ValueError as err:  # aiohttp: a line longer than its buffer
            raise CtrlableResponseError(f"invalid event stream: {err}") from err
        except aiohttp.ClientError as err:
            raise CtrlableConnectionError(f"event stream lost: {err}") from err
