"""The deploy plane: projects, instances and stacks, with rollback and resume.

One instance walks these steps; each is written to the DB (``instances.state`` / ``step``)
*before* it is taken, so a restart finds every unfinished instance and resumes or rolls it back:

=====================  ================  ====================================================
state                  step              action
=====================  ================  ====================================================
pending                resolve_template  template VMID + node of the instance's release
pending                allocate_vmid     a free VMID (allocation is serialized in-process)
cloning                clone             clone with hostname + an ownership marker
cloning                configure         read the config back, record the MAC, PUT onboot/net
starting               assign            pending first-boot assignment (hostname + MAC)
starting               start             power on
awaiting_firstboot     firstboot         wait for the guest's callback (or the kind's flow)
active                 -                 done
rolling_back           rollback/remove   revoke, destroy the guest if it is ours
failed / removed       -                 final (the hostname is free again)
=====================  ================  ====================================================

How a kind (``lxc``, ``vm``) is prepared and finished is a :class:`KindHandler`; the LXC
handler is built in and ``haos.py`` registers the ``vm`` one with :meth:`DeployPlane.register_kind`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ApiError, Conflict, InvalidRequest, NotFound
from .manifest import Manifest
from .proxmox import Kind, ProxmoxError, PveAlreadyExists, PveNotFound
from .state import INSTANCE_FINAL_STATES, Row, dumps, utcnow
from .wiring import WIRING_OVERRIDES, WiringError, validate_overrides

if TYPE_CHECKING:
    from .services import Services

_LOGGER = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Names and validation
# --------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_PROJECT = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_MARKER = re.compile(r"ctrlable-instance:\s*(\d+)")
_MAC = re.compile(r"^[0-9A-F]{2}(?::[0-9A-F]{2}){5}$")

#: How long a resumed clone (or a rollback) waits for PVE to drop the guest's lock.
LOCK_WAIT = 1800.0
#: In-process attempts to undo a guest before handing it to the periodic retry.
UNDO_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
UNDO_RETRY_EVERY = 60.0
#: Clones that find their VMID taken by someone else's guest get a fresh VMID this often.
VMID_ATTEMPTS = 3
#: Allocations this close together (a stack) count up from the last one instead of asking
#: PVE each time; a clone that finds the id taken anyway allocates again from PVE.
VMID_HINT_SECONDS = 5.0

#: the changes that make an ``instance.state`` event (a step alone does not)
PUBLISHED = frozenset({"state", "error", "needs_binding"})


def check_hostname(value: str) -> str:
    """A DNS label (RFC 1123): 1-63 of a-z 0-9 '-', not starting or ending with '-', not all
    digits. Upper case is folded to lower case (hostnames are case-insensitive)."""
    host = value.strip().lower()
    if not _LABEL.match(host):
        msg = (
            f"{value!r} is not a DNS label: 1-63 letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
        raise ValueError(msg)
    if host.isdigit():
        msg = f"{value!r} is not a valid hostname: it may not be all digits"
        raise ValueError(msg)
    return host


def check_project_name(value: str) -> str:
    name = value.strip().lower()
    if not _PROJECT.match(name):
        msg = (
            f"{value!r} is not a project name: 1-64 letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
        raise ValueError(msg)
    return name


class Overrides(BaseModel):
    """What a deploy may change. The four fields below are the deploy plane's (applied to the
    clone's config); any other key is a wiring override of the type (``companion.wiring``),
    checked by the kind's handler and applied by the guest's first boot. Resources stay as the
    release validated them (changing them needs privileges the companion's role lacks)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    onboot: bool = Field(default=True, description="start the guest when the host boots")
    ip: str | None = Field(default=None, description="LXC only: 'dhcp' or an IPv4 CIDR for net0")
    gw: str | None = Field(default=None, description="LXC only: IPv4 gateway (with a static ip)")
    vlan: int | None = Field(default=None, ge=1, le=4094, description="VLAN tag for net0")

    @field_validator("ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is None or value == "dhcp":
            return value
        try:
            iface = ipaddress.IPv4Interface(value)
        except ValueError:
            msg = f"{value!r} must be 'dhcp' or an IPv4 address with prefix, e.g. 192.168.1.20/24"
            raise ValueError(msg) from None
        if "/" not in value:
            msg = f"{value!r} needs a prefix length, e.g. {value}/24"
            raise ValueError(msg)
        return str(iface)

    @field_validator("gw")
    @classmethod
    def _check_gw(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            msg = f"{value!r} is not an IPv4 address"
            raise ValueError(msg) from None

    @model_validator(mode="after")
    def _gw_needs_static(self) -> Overrides:
        if self.gw is not None and (self.ip is None or self.ip == "dhcp"):
            msg = "gw needs a static ip"
            raise ValueError(msg)
        return self


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    id: int
    project_id: int
    project: str
    type: str
    hostname: str
    release: str
    node: str | None
    template_vmid: int | None
    vmid: int | None
    mac: str | None
    state: str
    step: str | None
    error: str | None
    needs_binding: bool
    overrides: Overrides
    created_at: str
    updated_at: str
    step_at: str | None

    @classmethod
    def from_row(cls, row: Row) -> Instance:
        return cls(
            id=int(row["id"]),
            project_id=int(row["project_id"]),
            project=str(row["project"]),
            type=str(row["type"]),
            hostname=str(row["hostname"]),
            release=str(row["release"]),
            node=row["node"],
            template_vmid=row["template_vmid"],
            vmid=row["vmid"],
            mac=row["mac"],
            state=str(row["state"]),
            step=row["step"],
            error=row["error"],
            needs_binding=bool(row["needs_binding"]),
            overrides=Overrides.model_validate_json(row["overrides"] or "{}"),
            created_at=str(row["created_at"]),
            updated_at=str(row["updated_at"]),
            step_at=row["step_at"],
        )

    @property
    def final(self) -> bool:
        return self.state in INSTANCE_FINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        """The API shape (``Instance`` in docs/api.md)."""
        return {
            "id": self.id,
            "project": self.project,
            "type": self.type,
            "hostname": self.hostname,
            "release": self.release,
            "node": self.node,
            "vmid": self.vmid,
            "mac": self.mac,
            "state": self.state,
            "step": self.step,
            "error": self.error,
            "needs_binding": self.needs_binding,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_SELECT = "SELECT i.*, p.name AS project FROM instances i JOIN projects p ON p.id = i.project_id"


def description_for(instance: Instance) -> str:
    """The clone's PVE notes: human text plus the marker that proves the guest is ours."""
    return (
        f"Ctrlable {instance.type} of project {instance.project} (release {instance.release})\n"
        f"ctrlable-instance: {instance.id}\n"
    )


def owner_of(config: Mapping[str, Any]) -> int | None:
    match = _MARKER.search(str(config.get("description") or ""))
    return int(match.group(1)) if match else None


def parse_net(value: str) -> list[tuple[str, str]]:
    """A PVE ``netX`` property string as ordered (key, value) pairs; a bare first item (QEMU
    ``virtio=MAC`` or ``virtio``) keeps its key."""
    pairs: list[tuple[str, str]] = []
    for part in value.split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        pairs.append((key.strip(), val.strip() if sep else ""))
    return pairs


def format_net(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" if v != "" else k for k, v in pairs)


def _set_pairs(pairs: list[tuple[str, str]], changes: Mapping[str, str | None]) -> None:
    for key, val in changes.items():
        index = next((i for i, (k, _) in enumerate(pairs) if k == key), None)
        if val is None:
            if index is not None:
                del pairs[index]
        elif index is None:
            pairs.append((key, val))
        else:
            pairs[index] = (key, val)


class StepFailed(Exception):
    """A step failed in a way the instance cannot recover from: roll back with this reason."""


class _Superseded(Exception):
    """The instance changed under the pipeline (completed, removed): stop quietly."""


# --------------------------------------------------------------------------------------------
# Per-kind handlers
# --------------------------------------------------------------------------------------------


class KindHandler:
    """How guests of one manifest kind are deployed around the common steps.

    The plane clones, configures and starts every kind itself; a handler says how to read the
    MAC, what to PUT after the clone, what to do before the start (``prepare``), how the guest
    becomes ready after it (``finish``, which returns the readiness report) and what to undo on
    rollback (``cleanup``). This class is the LXC handler (first-boot callback); ``haos.py``
    subclasses it for ``vm`` and registers it with :meth:`DeployPlane.register_kind`.
    """

    manifest_kind: ClassVar[str] = "lxc"
    pve_kind: ClassVar[Kind] = "lxc"
    #: the config key holding the guest's name (LXC ``hostname``, QEMU ``name``)
    name_key: ClassVar[str] = "hostname"

    def mac_of(self, config: Mapping[str, Any]) -> str | None:
        """The net0 MAC the clone got (PVE gives every clone fresh MACs)."""
        for key, val in parse_net(str(config.get("net0") or "")):
            if key in ("hwaddr", "macaddr") or (key != "name" and _MAC.match(val.upper())):
                return val.upper() if _MAC.match(val.upper()) else None
        return None

    def check_overrides(self, type_: str, overrides: Overrides) -> None:
        """Refuse (400 naming ``overrides.<key>``) what this kind cannot apply to ``type_``."""
        extra = dict(overrides.model_extra or {})
        known = WIRING_OVERRIDES.get(type_, frozenset())
        for key in sorted(extra):
            if key not in known:
                allowed = ", ".join(sorted({*Overrides.model_fields, *known}))
                raise InvalidRequest.field(
                    f"overrides.{key}", f"not an override of {type_} (allowed: {allowed})"
                )
        try:
            validate_overrides(type_, extra)
        except WiringError as err:
            raise InvalidRequest.field(err.field, err.message) from None

    def config_changes(self, instance: Instance, config: Mapping[str, Any]) -> dict[str, Any]:
        """The PUT after the clone: onboot, and net0 edits that keep the MAC."""
        changes: dict[str, Any] = {}
        ov = instance.overrides
        if bool(int(config.get("onboot") or 0)) != ov.onboot:
            changes["onboot"] = ov.onboot
        net = str(config.get("net0") or "")
        if net and (ov.ip is not None or ov.vlan is not None):
            pairs = parse_net(net)
            edit: dict[str, str | None] = {}
            if ov.ip is not None:
                edit["ip"] = ov.ip
                edit["gw"] = ov.gw
            if ov.vlan is not None:
                edit["tag"] = str(ov.vlan)
            _set_pairs(pairs, edit)
            new = format_net(pairs)
            if new != net:
                changes["net0"] = new
        return changes

    async def prepare(self, plane: DeployPlane, instance: Instance) -> None:
        """Before the start: the pending first-boot assignment (bound to hostname + MAC)."""
        assert instance.mac is not None
        await plane.services.provision.create_assignment(
            instance.id, instance.type, instance.hostname, instance.mac, instance.project
        )

    async def finish(
        self, plane: DeployPlane, instance: Instance, remaining: float
    ) -> dict[str, Any]:
        """After the start: wait for the guest's first-boot callback."""
        return await plane.wait_firstboot(instance.id, remaining)

    async def cleanup(self, plane: DeployPlane, instance: Instance) -> None:
        """On rollback or removal: the assignment can no longer be fetched."""
        await plane.services.provision.revoke(instance.id)


class VmHandler(KindHandler):
    """The base for ``vm`` kinds (QEMU): name in ``name``, MAC in ``net0`` (``virtio=MAC``), no
    static IP override (QEMU net0 carries none). Not registered by default: it has no way to
    know when the guest is ready; ``haos.py`` subclasses it (``prepare``/``finish``/``cleanup``).
    The plane also uses it to undo a ``vm`` guest when no handler is registered."""

    manifest_kind: ClassVar[str] = "vm"
    pve_kind: ClassVar[Kind] = "qemu"
    name_key: ClassVar[str] = "name"

    def check_overrides(self, type_: str, overrides: Overrides) -> None:
        for key in ("ip", "gw"):
            if getattr(overrides, key) is not None:
                raise InvalidRequest.field(f"overrides.{key}", "applies to LXC guests only")
        for key in sorted(overrides.model_extra or {}):
            raise InvalidRequest.field(f"overrides.{key}", f"not an override of {type_}")

    async def prepare(self, plane: DeployPlane, instance: Instance) -> None:
        return None

    async def finish(
        self, plane: DeployPlane, instance: Instance, remaining: float
    ) -> dict[str, Any]:
        raise StepFailed(f"no readiness flow for {instance.type} guests")

    async def cleanup(self, plane: DeployPlane, instance: Instance) -> None:
        return None


_FALLBACK: dict[str, KindHandler] = {"lxc": KindHandler(), "vm": VmHandler()}


# --------------------------------------------------------------------------------------------
# The plane
# --------------------------------------------------------------------------------------------


#: kv key: the PVE task durations the boundary learned, kept across restarts.
KV_TASK_DURATIONS = "pve.task_durations"


class DeployPlane:
    """Projects, instances, stacks; a Component (``start`` resumes, ``stop`` cancels)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.db = services.db
        self._handlers: dict[str, KindHandler] = {"lxc": KindHandler()}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._completed: dict[int, Instance] = {}  # made active by firstboot_completed
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._alloc_lock = asyncio.Lock()
        self._reallocations: dict[int, int] = {}
        self._vmid_hint: tuple[int, float] | None = None  # (next id to try, when it was set)
        self._stopping = False

    # -- component ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume (or roll back) every instance a previous run left unfinished."""
        self._stopping = False
        await self._load_task_durations()
        rows = await self.db.fetchall(
            _SELECT + " WHERE i.state NOT IN ('active', 'failed', 'removed') ORDER BY i.id"
        )
        for row in rows:
            instance = Instance.from_row(row)
            _LOGGER.info(
                "resuming instance %s (%s) at %s/%s",
                instance.id,
                instance.hostname,
                instance.state,
                instance.step,
            )
            if instance.state in ("starting", "awaiting_firstboot"):
                self._waiter(instance.id)  # a callback arriving before the task runs is kept
            if instance.state == "rolling_back":
                final = "removed" if instance.step == "remove" else "failed"
                self._spawn(instance.id, self._undo_task(instance, final))
            else:
                self._spawn(instance.id, self._pipeline(instance, resumed=True))

    async def stop(self) -> None:
        """Cancel in-flight work; it stays recorded in the DB and resumes on the next start."""
        self._stopping = True
        tasks = list(self._tasks.values()) + list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._inflight.clear()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
        await self._save_task_durations()

    async def _load_task_durations(self) -> None:
        """How long PVE's clones and starts took in the last run: the first deploy after a
        restart then polls its tasks once or twice, not on the growth schedule (docs/proxmox.md)."""
        raw = await self.db.get_kv(KV_TASK_DURATIONS)
        try:
            kept = json.loads(raw) if raw else {}
        except ValueError:
            kept = None
        if isinstance(kept, dict):
            self.services.pve.remember_durations(kept)
        else:
            _LOGGER.warning("ignoring unreadable %s in the state DB", KV_TASK_DURATIONS)

    async def _save_task_durations(self) -> None:
        learned = self.services.pve.learned_durations()
        if learned:
            await self.db.set_kv(KV_TASK_DURATIONS, json.dumps(learned, sort_keys=True))

    # -- kinds ----------------------------------------------------------------------------

    def register_kind(self, handler: KindHandler) -> None:
        """Deploy guests of ``handler.manifest_kind`` with ``handler`` (haos.py: ``vm``)."""
        self._handlers[handler.manifest_kind] = handler

    def handler_for(self, manifest: Manifest, type_: str) -> KindHandler | None:
        template = manifest.templates.get(type_)
        return None if template is None else self._handlers.get(template.kind)

    # -- projects -------------------------------------------------------------------------

    async def list_projects(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall("SELECT id, name, created_at FROM projects ORDER BY name")
        return [dict(r) for r in rows]

    async def create_project(self, name: str) -> dict[str, Any]:
        name = check_project_name(name)
        try:
            project_id = await self.db.execute(
                "INSERT INTO projects (name, created_at) VALUES (?, ?)", (name, utcnow())
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"project {name!r} already exists", code="project_exists") from None
        row = await self.db.fetchone(
            "SELECT id, name, created_at FROM projects WHERE id = ?", (project_id,)
        )
        assert row is not None
        return dict(row)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, instance_id: int) -> Instance:
        row = await self.db.fetchone(_SELECT + " WHERE i.id = ?", (instance_id,))
        if row is None:
            raise NotFound(f"no instance {instance_id}")
        return Instance.from_row(row)

    async def instance(self, instance_id: int) -> dict[str, Any]:
        return (await self.get(instance_id)).as_dict()

    async def list_instances(
        self, project: str | None = None, *, include_removed: bool = False
    ) -> list[dict[str, Any]]:
        where, params = [], []
        if project is not None:
            row = await self.db.fetchone("SELECT id FROM projects WHERE name = ?", (project,))
            if row is None:
                raise NotFound(f"no project {project!r}")
            where.append("i.project_id = ?")
            params.append(row["id"])
        if not include_removed:
            where.append("i.state != 'removed'")
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY i.id"
        return [Instance.from_row(r).as_dict() for r in await self.db.fetchall(sql, params)]

    async def instance_ids_by_vmid(self) -> dict[int, int]:
        """vmid -> instance id of every live instance that has a guest (for the guest list)."""
        rows = await self.db.fetchall(
            "SELECT id, vmid FROM instances WHERE vmid IS NOT NULL "
            "AND state NOT IN ('failed', 'removed')"
        )
        return {int(r["vmid"]): int(r["id"]) for r in rows}

    # -- requests -------------------------------------------------------------------------

    async def _active_manifest(self) -> Manifest:
        release = await self.services.releases.active()
        manifest = None if release is None else self.services.catalog.get(release)
        if release is None or manifest is None:
            raise Conflict(
                "no active release: build or adopt a release's templates first",
                code="no_active_release",
            )
        return manifest

    async def create_instance(
        self, project: str, type_: str, hostname: str, overrides: Overrides | None = None
    ) -> dict[str, Any]:
        """Record one instance (state ``pending``) and start its pipeline."""
        manifest = await self._active_manifest()
        overrides = overrides or Overrides()
        self._check_type(manifest, type_, "type", overrides)
        hostname = _field(check_hostname, hostname, "hostname")
        project = _field(check_project_name, project, "project")
        [created] = await self._insert(project, manifest.release, [(type_, hostname, overrides)])
        await self._publish(created)
        self._spawn(created.id, self._pipeline(created))
        return created.as_dict()

    async def deploy_stack(
        self,
        project: str,
        types: list[str] | None = None,
        hostname_prefix: str = "",
        overrides: Mapping[str, Overrides] | None = None,
    ) -> dict[str, Any]:
        """Record a stack (the manifest's default ``stack`` or ``types``) and start it.

        Hostnames are ``<prefix><type>-<n>`` with the smallest free ``n`` in the project.
        Types whose kind has no handler are skipped from the default stack (reported in
        ``skipped``) and refused when asked for explicitly. ``overrides`` maps a type to the
        overrides of every instance of that type."""
        manifest = await self._active_manifest()
        project = _field(check_project_name, project, "project")
        skipped: list[dict[str, str]] = []
        chosen: list[str] = []
        if types is None:
            for name in manifest.default_stack:
                if self.handler_for(manifest, name) is None:
                    kind = manifest.templates[name].kind
                    skipped.append({"type": name, "reason": f"no deploy handler for kind {kind!r}"})
                else:
                    chosen.append(name)
        else:
            if not types:
                raise InvalidRequest.field("types", "must name at least one type")
            for index, name in enumerate(types):
                self._check_type(manifest, name, f"types.{index}", Overrides())
            chosen = list(types)
        per_type = dict(overrides or {})
        for name, given in per_type.items():
            if name not in chosen:
                raise InvalidRequest.field(f"overrides.{name}", "is not a type of this deploy")
            handler = self.handler_for(manifest, name)
            assert handler is not None
            try:
                handler.check_overrides(name, given)
            except InvalidRequest as err:
                # name the type: overrides.<type>.<key>
                raise InvalidRequest.field(
                    f"overrides.{name}.{err.details[0]['field'].removeprefix('overrides.')}",
                    err.details[0]["message"],
                ) from None
        if hostname_prefix:
            _field(lambda v: check_hostname(v + "x"), hostname_prefix, "hostname_prefix")
        prefix = hostname_prefix.strip().lower()
        created = await self._insert(
            project,
            manifest.release,
            [(t, None, per_type.get(t, Overrides())) for t in chosen],
            prefix=prefix,
        )
        for inst in created:
            await self._publish(inst)
        for inst in created:
            self._spawn(inst.id, self._pipeline(inst))
        return {"instances": [i.as_dict() for i in created], "skipped": skipped}

    def _check_type(
        self, manifest: Manifest, type_: str, field: str, overrides: Overrides
    ) -> KindHandler:
        if type_ not in manifest.templates:
            known = ", ".join(manifest.templates)
            raise InvalidRequest.field(
                field, f"{type_!r} is not a type of release {manifest.release} ({known})"
            )
        handler = self.handler_for(manifest, type_)
        if handler is None:
            kind = manifest.templates[type_].kind
            raise InvalidRequest.field(
                field, f"{type_!r} (kind {kind!r}) cannot be deployed: no handler is available"
            )
        handler.check_overrides(type_, overrides)
        return handler

    async def _insert(
        self,
        project: str,
        release: str,
        items: list[tuple[str, str | None, Overrides]],
        *,
        prefix: str = "",
    ) -> list[Instance]:
        """Insert instances in ONE transaction: all or none. A hostname in use by a live
        instance of the project is a 400 (the partial unique index is the last word)."""
        now = utcnow()
        try:
            async with self.db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO projects (name, created_at) VALUES (?, ?) "
                    "ON CONFLICT(name) DO NOTHING",
                    (project, now),
                )
                prow = await tx.fetchone("SELECT id FROM projects WHERE name = ?", (project,))
                assert prow is not None
                project_id = int(prow["id"])
                used = {
                    str(r["hostname"]): int(r["id"])
                    for r in await tx.fetchall(
                        "SELECT id, hostname FROM instances WHERE project_id = ? "
                        "AND state NOT IN ('failed', 'removed')",
                        (project_id,),
                    )
                }
                ids: list[int] = []
                for type_, wanted, overrides in items:
                    if wanted is None:
                        hostname = _free_hostname(f"{prefix}{type_}", used)
                    else:
                        hostname = wanted
                        if hostname in used:
                            raise InvalidRequest(
                                f"hostname: {hostname!r} is already used in project "
                                f"{project!r} by instance {used[hostname]}",
                                details=[
                                    {
                                        "field": "hostname",
                                        "message": f"already used by instance {used[hostname]}",
                                    }
                                ],
                                code="duplicate_hostname",
                            )
                    new_id = await tx.execute(
                        "INSERT INTO instances (project_id, type, hostname, release, state, step,"
                        " overrides, created_at, updated_at, step_at)"
                        " VALUES (?, ?, ?, ?, 'pending', 'resolve_template', ?, ?, ?, ?)",
                        (
                            project_id,
                            type_,
                            hostname,
                            release,
                            overrides.model_dump_json(),
                            now,
                            now,
                            now,
                        ),
                    )
                    used[hostname] = new_id
                    ids.append(new_id)
        except sqlite3.IntegrityError as err:
            # Only reachable if the check above missed a live duplicate: the index decides.
            raise InvalidRequest(
                "hostname: already used in the project",
                details=[{"field": "hostname", "message": "already used in the project"}],
                code="duplicate_hostname",
            ) from err
        placeholders = ",".join("?" * len(ids))
        rows = await self.db.fetchall(
            _SELECT + f" WHERE i.id IN ({placeholders}) ORDER BY i.id",
            ids,
        )
        return [Instance.from_row(r) for r in rows]

    async def remove(self, instance_id: int) -> dict[str, Any]:
        """Stop and destroy the instance's guest; the record ends ``removed``."""
        instance = await self.get(instance_id)
        if instance.state == "removed":
            return instance.as_dict()
        task = self._tasks.pop(instance_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            instance = await self.get(instance_id)
        if instance.state == "failed":
            # Rolled back already: nothing is left on PVE.
            instance = await self._transition(instance, {"failed"}, state="removed", step=None)
            return instance.as_dict()
        instance = await self._transition(
            instance,
            {instance.state},
            state="rolling_back",
            step="remove",
            step_at=utcnow(),
        )
        self._spawn(instance_id, self._undo_task(instance, "removed"))
        return instance.as_dict()

    # -- first boot -----------------------------------------------------------------------

    async def firstboot_completed(self, instance_id: int, report: Mapping[str, Any]) -> None:
        """The provision plane's word that the guest finished its first boot: ``active``.

        Idempotent for an instance that is already active. Raises ``NotFound`` for an unknown
        instance and ``Conflict`` when the instance is no longer waiting (rolled back or
        removed): the caller should then refuse the guest."""
        instance = await self.get(instance_id)
        if instance.state == "active":
            return
        if instance.state not in ("starting", "awaiting_firstboot"):
            raise Conflict(
                f"instance {instance_id} is {instance.state}, not waiting for its first boot",
                code="not_waiting",
            )
        try:
            current = await self._activate(instance, report)
        except _Superseded:
            current = await self.get(instance_id)
            if current.state != "active":
                raise Conflict(
                    f"instance {instance_id} is {current.state}, not waiting for its first boot",
                    code="not_waiting",
                ) from None
        waiter = self._waiters.get(instance_id)
        if waiter is not None and not waiter.done():
            self._completed[instance_id] = current  # the pipeline need not activate it again
            waiter.set_result(dict(report))

    async def wait_firstboot(self, instance_id: int, timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` s for :meth:`firstboot_completed` on this instance."""
        waiter = self._waiter(instance_id)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), max(timeout, 0.0))
        except TimeoutError:
            raise StepFailed(
                f"no first-boot callback within {self.services.settings.firstboot_timeout:g} s"
            ) from None

    def _waiter(self, instance_id: int) -> asyncio.Future[dict[str, Any]]:
        waiter = self._waiters.get(instance_id)
        if waiter is None or waiter.cancelled():
            waiter = self._waiters[instance_id] = asyncio.get_running_loop().create_future()
        return waiter

    async def _activate(self, instance: Instance, report: Mapping[str, Any]) -> Instance:
        needs_binding = bool(report.get("needs_binding", instance.needs_binding))
        return await self._transition(
            instance,
            {"starting", "awaiting_firstboot"},
            state="active",
            step=None,
            error=None,
            needs_binding=int(needs_binding),
            step_at=utcnow(),
            check_step=False,
        )

    # -- state changes --------------------------------------------------------------------

    async def _transition(
        self,
        instance: Instance,
        expect: set[str],
        *,
        check_step: bool = False,
        **changes: Any,
    ) -> Instance:
        """Compare-and-set: apply ``changes`` if the instance is still in one of ``expect``
        (and, with ``check_step``, at its known step). A change of state, error or binding is
        published as ``instance.state`` in the same commit; a step alone is not (it is in the
        record). Raises ``_Superseded`` when something else changed the instance first."""
        now = utcnow()
        values = {**changes, "updated_at": now}
        sets = ", ".join(f"{k} = ?" for k in values)
        params: list[Any] = [dumps(v) if isinstance(v, dict) else v for v in values.values()]
        states = ",".join("?" * len(expect))
        sql = f"UPDATE instances SET {sets} WHERE id = ? AND state IN ({states})"  # noqa: S608
        params += [instance.id, *sorted(expect)]
        if check_step:
            sql += " AND step IS ?"
            params.append(instance.step)
        if "needs_binding" in changes:
            changes["needs_binding"] = bool(changes["needs_binding"])
        new = replace(instance, **changes, updated_at=now)
        if not PUBLISHED.intersection(changes):
            if await self.db.rowcount(sql, params) != 1:  # one statement: its own transaction
                raise _Superseded
            return new
        events = self.services.events
        data = new.as_dict()
        insert = events.insert("instance.state", data)
        ids = await self.db.atomic([(sql, params), insert], guard=True)
        if ids is None:
            raise _Superseded
        event = events.recorded(insert, ids[1], data)
        events.fanout(event)  # right after the commit: ids stay in order
        await events.prune(event.id)
        self._notify()
        return new

    async def _advance(self, instance: Instance, **changes: Any) -> Instance:
        """Record the next step (same compare-and-set on state and step)."""
        if "step" in changes and "step_at" not in changes:
            changes["step_at"] = utcnow()
        return await self._transition(instance, {instance.state}, check_step=True, **changes)

    async def _publish(self, instance: Instance) -> None:
        await self.services.events.publish("instance.state", instance.as_dict())
        self._notify()

    def _notify(self) -> None:
        platform = getattr(self.services, "platform", None)
        if platform is not None:
            try:
                platform.notify()
            except Exception:
                _LOGGER.exception("platform notify failed")

    # -- tasks ----------------------------------------------------------------------------

    def _spawn(self, instance_id: int, coro: Coroutine[Any, Any, None]) -> None:
        if self._stopping:
            coro.close()  # shutting down: the record stays where it is for the next start
            return
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks[instance_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._tasks.get(instance_id) is t:
                del self._tasks[instance_id]

        task.add_done_callback(done)

    async def _pipeline(self, instance: Instance, *, resumed: bool = False) -> None:
        try:
            await self._drive(instance, resumed=resumed)
        except _Superseded:
            return
        except asyncio.CancelledError:
            raise
        except Exception as err:
            reason = _reason(err)
            if not isinstance(err, StepFailed | ProxmoxError):
                _LOGGER.exception("instance %s: unexpected error", instance.id)
            try:
                current = await self.get(instance.id)
            except NotFound:
                return
            if current.final or current.state == "rolling_back":
                return
            _LOGGER.warning(
                "instance %s (%s) failed at %s: %s",
                current.id,
                current.hostname,
                current.step,
                reason,
            )
            try:
                current = await self._transition(
                    current,
                    {current.state},
                    state="rolling_back",
                    step="rollback",
                    error=f"{current.step}: {reason}",
                    step_at=utcnow(),
                )
            except _Superseded:
                return
            await self._undo_task(current, "failed")
        finally:
            self._waiters.pop(instance.id, None)
            self._completed.pop(instance.id, None)
            self._reallocations.pop(instance.id, None)

    async def _drive(self, instance: Instance, *, resumed: bool) -> None:
        steps: dict[str | None, Callable[[Instance, bool], Awaitable[Instance]]] = {
            "resolve_template": self._step_resolve,
            "allocate_vmid": self._step_allocate,
            "clone": self._step_clone,
            "configure": self._step_configure,
            "assign": self._step_assign,
            "start": self._step_start,
            "firstboot": self._step_firstboot,
        }
        while not instance.final:
            step = steps.get(instance.step)
            if step is None:
                raise StepFailed(f"unknown step {instance.step!r} in state {instance.state}")
            instance = await step(instance, resumed)
            resumed = False

    def _handler(self, instance: Instance, *, undo: bool = False) -> KindHandler:
        manifest = self.services.catalog.get(instance.release)
        handler = None if manifest is None else self.handler_for(manifest, instance.type)
        if (
            handler is None
            and undo
            and manifest is not None
            and instance.type in manifest.templates
        ):
            # Undo must work even when the kind's handler is gone (e.g. haos.py not loaded).
            handler = _FALLBACK[manifest.templates[instance.type].kind]
        if handler is None:
            raise StepFailed(f"no deploy handler for {instance.release}/{instance.type}")
        return handler

    # -- steps ----------------------------------------------------------------------------

    async def _step_resolve(self, instance: Instance, resumed: bool) -> Instance:
        record = await self.services.releases.template(instance.release, instance.type)
        if record is None or record.template_vmid is None:
            raise StepFailed(
                f"release {instance.release} has no built template for {instance.type}"
            )
        node = record.node
        if node is None:
            guest = await self.services.pve.find_guest(record.template_vmid)
            if guest is None:
                raise StepFailed(f"template {record.template_vmid} is not on any node")
            node = guest.node
        target = self.services.settings.pve_node or node
        return await self._advance(
            instance, step="allocate_vmid", node=target, template_vmid=record.template_vmid
        )

    async def _step_allocate(self, instance: Instance, resumed: bool) -> Instance:
        async with self._alloc_lock:
            vmid = await self._free_vmid()
            return await self._advance(instance, state="cloning", step="clone", vmid=vmid)

    async def _free_vmid(self) -> int:
        """PVE's next free id, skipping ids this companion has promised to unfinished clones
        and every release's template blocks (PVE reserves nothing, §11)."""
        pve = self.services.pve
        rows = await self.db.fetchall(
            "SELECT vmid FROM instances WHERE vmid IS NOT NULL "
            "AND state NOT IN ('failed', 'removed')"
        )
        reserved = {int(r["vmid"]) for r in rows}
        for name in self.services.catalog.names():
            manifest = self.services.catalog.get(name)
            assert manifest is not None
            for template in manifest.templates.values():
                reserved.update(template.vmid_range)
        hint = self._vmid_hint
        if hint is not None and time.monotonic() - hint[1] < VMID_HINT_SECONDS:
            candidate = hint[0]
            while candidate in reserved:
                candidate += 1
        else:
            candidate = await pve.next_vmid()
            if candidate in reserved:
                used = {g.vmid for g in await pve.guests()}
                while candidate in reserved or candidate in used:
                    candidate += 1
        self._vmid_hint = (candidate + 1, time.monotonic())
        return candidate

    async def _source(self, instance: Instance) -> tuple[str, int]:
        """The template's node and VMID."""
        assert instance.template_vmid is not None
        record = await self.services.releases.template(instance.release, instance.type)
        node = (
            record.node
            if record is not None and record.template_vmid == instance.template_vmid
            else None
        )
        if node is None:
            guest = await self.services.pve.find_guest(instance.template_vmid)
            if guest is None:
                raise StepFailed(f"template {instance.template_vmid} is not on any node")
            node = guest.node
        return node, instance.template_vmid

    async def _guest_config(
        self, instance: Instance, handler: KindHandler
    ) -> dict[str, Any] | None:
        if instance.vmid is None or instance.node is None:
            return None
        try:
            return await self.services.pve.guest_config(
                handler.pve_kind, instance.node, instance.vmid
            )
        except PveNotFound:
            return None

    def _is_ours(self, instance: Instance, config: Mapping[str, Any], handler: KindHandler) -> bool:
        owner = owner_of(config)
        if owner is not None:
            return owner == instance.id
        return config.get(handler.name_key) == instance.hostname

    async def _step_clone(self, instance: Instance, resumed: bool) -> Instance:
        handler = self._handler(instance)
        assert instance.vmid is not None
        assert instance.node is not None
        if resumed:
            # The clone may have been sent before the restart: PVE creates the target first,
            # locked, and writes its final config when the task ends.
            config = await self._guest_config(instance, handler)
            if config is not None:
                if config.get("lock"):
                    await self._wait_unlocked(instance, handler)
                    config = await self._guest_config(instance, handler)
                if config is not None:
                    if not self._is_ours(instance, config, handler):
                        return await self._reallocate(instance)
                    return await self._advance(instance, step="configure")
        node, source = await self._source(instance)
        target = instance.node if instance.node != node else None
        try:
            try:
                await self._clone(instance, handler, node, source, target, full=None)
            except ProxmoxError as err:
                if isinstance(err, PveAlreadyExists) or "linked clone" not in str(err).lower():
                    raise
                _LOGGER.info("instance %s: linked clone not possible, cloning full", instance.id)
                await self._clone(instance, handler, node, source, target, full=True)
        except PveAlreadyExists:
            # Someone else's guest took the VMID between allocation and clone.
            return await self._reallocate(instance)
        return await self._advance(instance, step="configure")

    async def _clone(
        self,
        instance: Instance,
        handler: KindHandler,
        node: str,
        source: int,
        target: str | None,
        *,
        full: bool | None,
    ) -> None:
        assert instance.vmid is not None
        # The clone runs as its own task, so a cancelled pipeline (DELETE) can wait for it to
        # land before destroying what it made: no guest appears after its record is final.
        call = asyncio.ensure_future(
            self.services.pve.clone(
                handler.pve_kind,
                node,
                source,
                instance.vmid,
                instance.hostname,
                full=full,
                target=target,
                description=description_for(instance),
            )
        )
        self._inflight[instance.id] = call
        try:
            await asyncio.shield(call)
        finally:
            if call.done() and self._inflight.get(instance.id) is call:
                del self._inflight[instance.id]

    async def _reallocate(self, instance: Instance) -> Instance:
        """The VMID holds a guest that is not this instance's: never touch it, take another."""
        count = self._reallocations[instance.id] = self._reallocations.get(instance.id, 0) + 1
        if count > VMID_ATTEMPTS:
            raise StepFailed(f"VMID {instance.vmid} was taken by another guest, {count} times")
        self._vmid_hint = None  # ask PVE again
        _LOGGER.warning(
            "instance %s: VMID %s is taken by another guest; allocating again",
            instance.id,
            instance.vmid,
        )
        return await self._advance(instance, state="pending", step="allocate_vmid", vmid=None)

    async def _wait_unlocked(self, instance: Instance, handler: KindHandler) -> None:
        assert instance.vmid is not None
        assert instance.node is not None
        started = time.monotonic()
        delay = 0.2
        while True:
            status = await self.services.pve.status(handler.pve_kind, instance.node, instance.vmid)
            if not status.get("lock"):
                return
            if time.monotonic() - started > LOCK_WAIT:
                raise StepFailed(f"guest {instance.vmid} stayed locked ({status.get('lock')})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _step_configure(self, instance: Instance, resumed: bool) -> Instance:
        handler = self._handler(instance)
        assert instance.vmid is not None
        assert instance.node is not None
        config = await self._guest_config(instance, handler)
        if config is None:
            raise StepFailed(f"the clone {instance.vmid} is gone")
        if not self._is_ours(instance, config, handler):
            # Someone else's guest: forget the VMID so the rollback leaves it alone.
            await self._advance(instance, vmid=None)
            raise StepFailed(f"VMID {instance.vmid} holds a guest that is not this instance's")
        mac = handler.mac_of(config)
        if mac is None:
            raise StepFailed("the clone has no net0 MAC address")
        changes = handler.config_changes(instance, config)
        if changes:
            await self.services.pve.set_config(
                handler.pve_kind, instance.node, instance.vmid, **changes
            )
        return await self._advance(instance, state="starting", step="assign", mac=mac)

    async def _step_assign(self, instance: Instance, resumed: bool) -> Instance:
        handler = self._handler(instance)
        self._waiter(instance.id)
        await handler.prepare(self, instance)  # idempotent (a resumed step repeats it)
        return await self._advance(instance, step="start")

    async def _step_start(self, instance: Instance, resumed: bool) -> Instance:
        handler = self._handler(instance)
        assert instance.vmid is not None
        assert instance.node is not None
        await self.services.pve.power(handler.pve_kind, instance.node, instance.vmid, "start")
        return await self._advance(instance, state="awaiting_firstboot", step="firstboot")

    async def _step_firstboot(self, instance: Instance, resumed: bool) -> Instance:
        handler = self._handler(instance)
        timeout = self.services.settings.firstboot_timeout
        remaining = timeout - _age(instance.step_at)
        if resumed and await self._assignment_consumed(instance.id):
            # The guest reported while this companion was going down.
            return await self._activate(instance, {})
        report = await handler.finish(self, instance, remaining)
        done = self._completed.pop(instance.id, None)
        if done is not None:
            return done
        try:
            return await self._activate(instance, report)
        except _Superseded:
            current = await self.get(instance.id)
            if current.state == "active":
                return current
            raise

    async def _assignment_consumed(self, instance_id: int) -> bool:
        row = await self.db.fetchone(
            "SELECT state FROM assignments WHERE instance_id = ? ORDER BY id DESC LIMIT 1",
            (instance_id,),
        )
        return row is not None and row["state"] == "consumed"

    # -- undo -----------------------------------------------------------------------------

    async def _undo_task(self, instance: Instance, final: str) -> None:
        """Revoke, destroy the guest if it is ours, then ``final`` (failed / removed). Keeps
        retrying (in the background) while PVE cannot destroy it: no orphan guests."""
        self._waiters.pop(instance.id, None)
        inflight = self._inflight.pop(instance.id, None)
        if inflight is not None:
            with contextlib.suppress(Exception):
                await inflight
        while True:
            try:
                await self._undo(instance)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                reason = _reason(err)
                _LOGGER.warning(
                    "instance %s: undo failed (%s); retrying in %g s",
                    instance.id,
                    reason,
                    UNDO_RETRY_EVERY,
                )
                with contextlib.suppress(_Superseded):
                    instance = await self._advance(
                        instance, error=_merge_error(instance.error, f"cleanup: {reason}")
                    )
                await asyncio.sleep(UNDO_RETRY_EVERY)
                continue
            break
        with contextlib.suppress(_Superseded):
            await self._advance(instance, state=final, step=None)

    async def _undo(self, instance: Instance) -> None:
        handler = self._handler(instance, undo=True)
        await handler.cleanup(self, instance)
        if instance.vmid is None or instance.node is None:
            return
        for delay in (*UNDO_DELAYS, None):
            try:
                config = await self._guest_config(instance, handler)
                if config is None:
                    return
                if config.get("lock"):
                    # A clone still landing (resumed after a restart): judge it once it is done.
                    await self._wait_unlocked(instance, handler)
                    config = await self._guest_config(instance, handler)
                    if config is None:
                        return
                if not self._is_ours(instance, config, handler):
                    _LOGGER.warning(
                        "instance %s: guest %s is not ours; leaving it",
                        instance.id,
                        instance.vmid,
                    )
                    return
                await self.services.pve.destroy(handler.pve_kind, instance.node, instance.vmid)
            except ProxmoxError as err:
                if delay is None:
                    raise
                _LOGGER.info("instance %s: destroy failed (%s), retrying", instance.id, err)
                await asyncio.sleep(delay)
                continue
            return


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _field(check: Callable[[str], str], value: str, name: str) -> str:
    try:
        return check(value)
    except ValueError as err:
        raise InvalidRequest.field(name, str(err)) from None


def _free_hostname(base: str, used: Mapping[str, int]) -> str:
    n = 1
    while f"{base}-{n}" in used:
        n += 1
    host = f"{base}-{n}"
    return _field(check_hostname, host, "hostname_prefix")


def _age(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max(0.0, (datetime.now(UTC) - then).total_seconds())


def _reason(err: BaseException) -> str:
    if isinstance(err, ApiError):
        return err.message
    text = str(err)
    return text or type(err).__name__


def _merge_error(previous: str | None, extra: str) -> str:
    if previous and extra not in previous:
        return f"{previous}; {extra}"
    return extra
