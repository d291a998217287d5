"""The ctrlable-pro (HAOS VM) deploy flow.

The deploy plane clones the never-booted HAOS template (``name=<hostname>``), configures and
starts it like any guest; :class:`HaosHandler` (the ``vm`` kind handler) then brings the VM's
Home Assistant up as this site's Ctrlable Home Assistant. Each step is recorded in
``haos_flows`` before it runs and is idempotent, so a restarted companion resumes where it
stopped; a failed step makes the deploy plane roll back (``cleanup`` + destroy the VM).

=============  ===================================================================================
step           what
=============  ===================================================================================
address        the QEMU guest agent's ``network-get-interfaces``: the IPv4 of the interface with
               the clone's net0 MAC; fallback ``CTRLABLE_HAOS_ADDRESS``
http           wait until HA core answers ``GET /api/onboarding`` (``CTRLABLE_HAOS_BOOT_TIMEOUT``)
restore        upload the release's base backup through the onboarding backup API
               (agent ``hassio.local`` on HAOS, ``backup.local`` on core), restore it, wait for
               the restart and for ``last_action_event`` = restore completed
owner          onboarding user step with per-site credentials (secret store only)
login          auth code (from ``owner`` or the login flow) -> ``/auth/token``
core_config    WS ``config/core/update`` (location name = site name, locale) + onboarding step
analytics      onboarding step (HA's analytics stay off: no preference is sent)
integration    onboarding step (completes onboarding)
token          a long-lived access token over the WebSocket API (secret store)
wiring         the ``ctrlable`` config entry (HA -> this companion) and the MQTT broker logins of
               the project's apps as HA users (the Mosquitto add-on authenticates against them)
enroll         read ``/api/config``; the ``ha`` facts go into the platform report
done           the instance becomes ``active``
=============  ===================================================================================

See ``docs/haos.md`` for the decisions (address fallback, instance UUID, what "wiring" is).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import secrets
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from .deploy import DeployPlane, Instance, StepFailed, VmHandler
from .haos_client import HaClient, HaError, HaUnavailable
from .logs import REDACTOR
from .proxmox import ProxmoxError, PveAuthError, PveNotFound, PvePermissionDenied
from .state import dumps, utcnow

if TYPE_CHECKING:
    from .services import Services

_LOGGER = logging.getLogger(__name__)

STEPS = (
    "address",
    "http",
    "restore",
    "owner",
    "login",
    "core_config",
    "analytics",
    "integration",
    "token",
    "wiring",
    "enroll",
    "done",
)
OWNER_NAME = "Ctrlable"
OWNER_USERNAME = "ctrlable"
TOKEN_CLIENT_NAME = "Ctrlable companion"  # noqa: S105 - a display name
TOKEN_LIFESPAN_DAYS = 3650
INTEGRATION_DOMAIN = "ctrlable"
MQTT_GROUP = "system-users"
POLL = 1.0
#: Instance states whose event cannot change the broker logins: the assignment that holds an
#: app's login is made after the ``starting`` event, so ``awaiting_firstboot`` is the first
#: state with one (and ``rolling_back`` / ``failed`` / ``removed`` take it away).
LOGINS_UNCHANGED = frozenset({"pending", "cloning", "starting"})
#: What PVE 8.3 checks for ``agent/network-get-interfaces`` (pve-apidoc); PVE 9 renamed it
#: ``VM.GuestAgent.Audit``.
AGENT_PRIVILEGE = "VM.Monitor"

#: Files a base backup must not carry (below the backup's ``data/``): HA users and
#: credentials, the onboarding state, the instance UUID, secrets and cloud logins. Each site's
#: HA makes its own (see docs/haos.md, "Instance UUID").
FORBIDDEN_BASE_FILES = frozenset(
    {
        ".storage/auth",
        ".storage/auth_provider.homeassistant",
        ".storage/onboarding",
        ".storage/core.uuid",
        ".storage/cloud",
        ".uuid",
        ".cloud",
        ".HA_RESTORE",
        "secrets.yaml",
    }
)


def secret_name(instance_id: int, what: str) -> str:
    return f"haos.{instance_id}.{what}"


# --------------------------------------------------------------------------------------------
# Base backups
# --------------------------------------------------------------------------------------------


class BaseBackupError(ValueError):
    """The base backup file is not one the flow may restore."""


@dataclass(frozen=True, slots=True)
class BaseBackup:
    path: Path
    slug: str
    name: str
    ha_version: str
    addons: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def inspect_base_backup(path: Path) -> BaseBackup:
    """Read and check a HA backup file (outer tar with ``./backup.json`` and
    ``homeassistant.tar[.gz]``): unencrypted, and free of every :data:`FORBIDDEN_BASE_FILES`."""
    try:
        outer = tarfile.open(path, "r:")  # noqa: SIM115 - closed below
    except (OSError, tarfile.TarError) as err:
        raise BaseBackupError(f"{path.name}: not a readable tar file ({err})") from None
    with outer:
        meta_file = (
            outer.extractfile("./backup.json") if "./backup.json" in outer.getnames() else None
        )
        if meta_file is None:
            raise BaseBackupError(f"{path.name}: no ./backup.json (not a Home Assistant backup)")
        try:
            meta = json.loads(meta_file.read())
            slug, name = str(meta["slug"]), str(meta["name"])
            ha_version = str(meta["homeassistant"]["version"])
        except (ValueError, KeyError, TypeError):
            raise BaseBackupError(
                f"{path.name}: backup.json lacks slug, name or homeassistant.version"
            ) from None
        if meta.get("protected"):
            raise BaseBackupError(
                f"{path.name}: the base backup is password-protected; a base carries no "
                "secrets and must be unprotected"
            )
        compressed = bool(meta.get("compressed", True))
        inner_name = f"homeassistant.tar{'.gz' if compressed else ''}"
        # HA core looks both names up literally: "./backup.json" and "homeassistant.tar.gz".
        member = next((m for m in outer.getmembers() if m.name == inner_name), None)
        inner_file = None if member is None else outer.extractfile(member)
        if inner_file is None:
            raise BaseBackupError(f"{path.name}: no member named exactly {inner_name!r}")
        try:
            with tarfile.open(
                fileobj=io.BytesIO(inner_file.read()), mode="r:gz" if compressed else "r:"
            ) as inner:
                names = inner.getnames()
        except tarfile.TarError as err:
            raise BaseBackupError(f"{path.name}: {inner_name} is unreadable ({err})") from None
    carried = sorted(
        {
            rel
            for n in names
            if (rel := n.lstrip("./").removeprefix("data/"))
            and any(rel == f or rel.startswith(f + "/") for f in FORBIDDEN_BASE_FILES)
        }
    )
    if carried:
        raise BaseBackupError(
            f"{path.name}: a base backup must not carry {', '.join(carried)} "
            "(users, onboarding state, instance UUID and secrets are made per site)"
        )
    addons = [str(a["slug"]) for a in meta.get("addons") or [] if isinstance(a, dict)]
    folders = [str(f) for f in meta.get("folders") or [] if f != "homeassistant"]
    return BaseBackup(path, slug, name, ha_version, addons, folders)


def make_base_backup(
    source: Path, dest: Path, *, name: str, slug: str, ha_version: str, date: str | None = None
) -> BaseBackup:
    """Write a core-format HA backup of the directory ``source`` (a config dir without users,
    onboarding state or UUID) to ``dest``; used by release engineering and the tests."""
    inner_buf = io.BytesIO()
    with tarfile.open(fileobj=inner_buf, mode="w:gz") as inner:
        for item in sorted(source.rglob("*")):
            rel = item.relative_to(source).as_posix()
            if "__pycache__" in rel.split("/"):
                continue
            inner.add(item, arcname=f"data/{rel}", recursive=False)
    meta = {
        "slug": slug,
        "name": name,
        "date": date or datetime.now(UTC).isoformat(),
        "type": "partial",
        "version": 2,
        "compressed": True,
        "protected": False,
        "homeassistant": {"version": ha_version, "exclude_database": True},
        "folders": [],
        "addons": [],
        "extra": {},
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:") as outer:
        for arcname, payload in (
            ("./backup.json", json.dumps(meta).encode()),
            ("homeassistant.tar.gz", inner_buf.getvalue()),
        ):
            info = tarfile.TarInfo(arcname)
            info.size = len(payload)
            info.mtime = int(datetime.now(UTC).timestamp())
            outer.addfile(info, io.BytesIO(payload))
    return inspect_base_backup(dest)


# --------------------------------------------------------------------------------------------
# Address
# --------------------------------------------------------------------------------------------


def pick_address(interfaces: list[dict[str, Any]], mac: str | None) -> str | None:
    """The first IPv4 (not link-local) of the interface whose hardware address is ``mac``."""
    if not mac:
        return None
    for iface in interfaces:
        if str(iface.get("hardware-address") or "").upper() != mac.upper():
            continue
        for addr in iface.get("ip-addresses") or []:
            ip = str(addr.get("ip-address") or "")
            if addr.get("ip-address-type") == "ipv4" and ip and not ip.startswith("169.254."):
                return ip
    return None


def _agent_for(installation_type: str | None) -> str:
    """Backup agent ids are ``domain.unique_id``: ``hassio.local`` on HA OS / Supervised,
    ``backup.local`` on core and container installs (home-assistant.md §7)."""
    if installation_type and ("OS" in installation_type or "Supervised" in installation_type):
        return "hassio.local"
    return "backup.local"


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


class HaosFlow:
    """Runs (or resumes) the recorded steps for one ctrlable-pro instance."""

    def __init__(
        self, services: Services, instance: Instance, sync_lock: asyncio.Lock | None = None
    ) -> None:
        self.services = services
        self.sync_lock = sync_lock or asyncio.Lock()
        self.settings = services.settings
        self.db = services.db
        self.instance = instance
        self.client_id = _host_of(self.settings.public_url) + "/"
        self.redirect_uri = self.client_id + "ctrlable/auth_callback"
        self._ha: HaClient | None = None
        self._auth_code: str | None = None
        self._access: str | None = None
        self._row: dict[str, Any] = {}

    # -- records ----------------------------------------------------------------------------

    @property
    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = json.loads(self._row.get("facts") or "{}")
        return facts

    async def _load(self) -> None:
        row = await self.db.fetchone(
            "SELECT * FROM haos_flows WHERE instance_id = ?", (self.instance.id,)
        )
        if row is None or row["step"] not in STEPS:
            now = utcnow()
            await self.db.execute(
                "INSERT INTO haos_flows (instance_id, step, created_at, updated_at)"
                " VALUES (?, 'address', ?, ?) ON CONFLICT(instance_id) DO UPDATE SET"
                " step = 'address', address = NULL, port = NULL, facts = '{}', error = NULL,"
                " updated_at = excluded.updated_at",
                (self.instance.id, now, now),
            )
            row = await self.db.fetchone(
                "SELECT * FROM haos_flows WHERE instance_id = ?", (self.instance.id,)
            )
        assert row is not None
        self._row = row

    async def _save(self, **changes: Any) -> None:
        """Update the record; ``facts`` are merged into the stored ones (read and written in
        one transaction: the MQTT login sync writes facts too)."""
        changes["updated_at"] = utcnow()
        async with self.db.transaction() as tx:
            if "facts" in changes:
                row = await tx.fetchone(
                    "SELECT facts FROM haos_flows WHERE instance_id = ?", (self.instance.id,)
                )
                stored = json.loads(row["facts"] or "{}") if row else {}
                changes["facts"] = dumps({**stored, **changes["facts"]})
            sets = ", ".join(f"{k} = ?" for k in changes)
            await tx.execute(
                f"UPDATE haos_flows SET {sets} WHERE instance_id = ?",  # noqa: S608 - fixed names
                (*changes.values(), self.instance.id),
            )
        self._row.update(changes)

    async def _secret(self, what: str) -> str | None:
        value = await self.db.get_secret(secret_name(self.instance.id, what))
        if value:
            REDACTOR.add(value)
        return value

    async def _put_secret(self, what: str, value: str) -> None:
        REDACTOR.add(value)
        await self.db.put_secret(secret_name(self.instance.id, what), value)

    @property
    def ha(self) -> HaClient:
        if self._ha is None:
            address, port = self._row.get("address"), self._row.get("port")
            if not address or not port:
                raise StepFailed("no address recorded for the VM")
            host = f"[{address}]" if ":" in str(address) else str(address)
            self._ha = HaClient(f"http://{host}:{port}", timeout=self.settings.haos_request_timeout)
        return self._ha

    # -- driver -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        await self._load()
        try:
            step = str(self._row["step"])
            if STEPS.index(step) > STEPS.index("http") and step != "done":
                # Resumed: HA may be restarting; give it the restore budget to answer.
                await self._wait_http(self.settings.haos_restore_timeout)
            while step != "done":
                _LOGGER.info("instance %s: HAOS step %s", self.instance.id, step)
                await self.services.events.publish(
                    "haos.step", {"instance_id": self.instance.id, "step": step}
                )
                try:
                    await getattr(self, f"_step_{step}")()
                except HaUnavailable as err:
                    raise StepFailed(f"{step}: Home Assistant unavailable: {err}") from None
                except HaError as err:
                    raise StepFailed(f"{step}: {err}") from None
                step = STEPS[STEPS.index(step) + 1]
                await self._save(step=step, error=None)
            await self.services.events.publish(
                "haos.step", {"instance_id": self.instance.id, "step": "done"}
            )
            return {"needs_binding": False}
        except StepFailed as err:
            with contextlib.suppress(Exception):
                await self._save(error=str(err)[:500])
            raise
        finally:
            if self._ha is not None:
                await self._ha.close()

    # -- steps ------------------------------------------------------------------------------

    async def _step_address(self) -> None:
        instance = self.instance
        if instance.node is None or instance.vmid is None:
            raise StepFailed("the instance has no VM")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.haos_agent_timeout
        last_error = "no answer"
        while True:
            try:
                interfaces = await self.services.pve.agent_interfaces(instance.node, instance.vmid)
            except PvePermissionDenied as err:
                # PVE 8 wants VM.Monitor for guest agent calls (PVE 9: VM.GuestAgent.Audit);
                # waiting will not help: go to the fallback at once.
                last_error = (
                    f"the PVE token lacks {err.privilege or AGENT_PRIVILEGE} on "
                    f"{err.path or f'/vms/{instance.vmid}'} to ask the guest agent"
                )
                break
            except (PveNotFound, PveAuthError):
                raise
            except ProxmoxError as err:
                interfaces, last_error = [], str(err)
            address = pick_address(interfaces, instance.mac)
            if address is not None:
                await self._save(address=address, port=self.settings.haos_port)
                return
            if interfaces:
                last_error = f"no IPv4 on the interface with MAC {instance.mac}"
            if loop.time() >= deadline:
                break
            await asyncio.sleep(POLL)
        if self.settings.haos_address:
            _LOGGER.info(
                "instance %s: guest agent gave no address (%s); using CTRLABLE_HAOS_ADDRESS",
                instance.id,
                last_error,
            )
            await self._save(address=self.settings.haos_address, port=self.settings.haos_port)
            return
        raise StepFailed(
            f"the QEMU guest agent reported no IPv4 address for net0 ({instance.mac}) "
            f"({last_error}); set CTRLABLE_HAOS_ADDRESS (e.g. a DHCP reservation for that MAC) "
            "to use a known address"
        )

    async def _wait_http(self, budget: float) -> dict[str, bool]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while True:
            try:
                return await self.ha.onboarding()
            except HaUnavailable as err:
                if loop.time() >= deadline:
                    raise StepFailed(
                        f"Home Assistant at {self.ha.base_url} did not answer within {budget:g} s"
                        f" ({err})"
                    ) from None
            await asyncio.sleep(POLL)

    async def _step_http(self) -> None:
        await self._wait_http(self.settings.haos_boot_timeout)

    async def _step_restore(self) -> None:
        spec = self._spec()
        filename = getattr(spec, "base_backup", None)
        status = await self.ha.onboarding()
        if any(status.values()):
            if "restored" in self.facts:
                return
            raise StepFailed(
                "Home Assistant's onboarding had already begun before the Ctrlable base was "
                "restored (the template must never have booted)"
            )
        installation_type = await self.ha.installation_type()
        await self._save(facts={"installation_type": installation_type})
        if not filename:
            _LOGGER.warning(
                "instance %s: release %s names no base_backup; onboarding a plain HA",
                self.instance.id,
                self.instance.release,
            )
            await self._save(facts={"restored": False})
            return
        path = self.settings.haos_backups / filename
        if not path.is_file():
            raise StepFailed(
                f"base backup {filename} not found in {self.settings.haos_backups} "
                "(CTRLABLE_HAOS_BACKUP_DIR)"
            )
        try:
            base = await asyncio.to_thread(inspect_base_backup, path)
        except BaseBackupError as err:
            raise StepFailed(str(err)) from None
        agent = _agent_for(installation_type)
        budget = self.settings.haos_restore_timeout
        info = await self.ha.backup_info()
        known = {str(b.get("backup_id")) for b in info.get("backups") or []}
        backup_id = base.slug
        if backup_id not in known:
            backup_id = await self.ha.upload_backup(path, agent, timeout=budget)
        await self._save(facts={"backup_id": backup_id, "agent_id": agent})
        try:
            await self.ha.restore(
                backup_id,
                agent,
                restore_addons=base.addons or None,
                restore_folders=base.folders or None,
            )
        except HaUnavailable:
            _LOGGER.info("instance %s: HA went down answering the restore", self.instance.id)
        except HaError as err:
            raise StepFailed(f"restore refused: {err} ({err.code})") from None
        await self._wait_restored(budget)
        await self._save(facts={"restored": True, "base": base.name})

    async def _wait_restored(self, budget: float) -> None:
        """HA restarts to restore; after the restart ``backup/info`` reports the outcome."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        last = "no answer"
        while loop.time() < deadline:
            await asyncio.sleep(POLL)
            try:
                info = await self.ha.backup_info()
            except HaUnavailable as err:
                last = str(err)
                continue
            except HaError as err:
                if err.status == 401:
                    raise StepFailed(
                        "after the restore Home Assistant is already onboarded: the base backup "
                        "carries onboarding state"
                    ) from None
                raise
            event = info.get("last_action_event") or {}
            if event.get("manager_state") != "restore_backup":
                continue
            state = event.get("state")
            if state == "completed":
                return
            if state == "failed":
                raise StepFailed(f"restore failed: {event.get('reason')}")
            last = f"restore {state}"
        raise StepFailed(f"the restore did not complete within {budget:g} s ({last})")

    async def _step_owner(self) -> None:
        status = await self.ha.onboarding()
        password = await self._secret("owner_password")
        if password is None:
            password = secrets.token_urlsafe(32)
            await self._put_secret("owner_password", password)
        if status.get("user"):
            return  # created before a restart: the login step uses the stored password
        self._auth_code = await self.ha.create_owner(
            name=OWNER_NAME,
            username=OWNER_USERNAME,
            password=password,
            client_id=self.client_id,
            language=self.settings.haos_language,
        )

    async def _step_login(self) -> None:
        await self._login()

    async def _login(self) -> str:
        """An access token from the owner's auth code, or from a login with the stored
        password; keeps the refresh token in the secret store."""
        code = self._auth_code
        if code is None:
            password = await self._secret("owner_password")
            if password is None:
                raise StepFailed("the owner's password is not in the secret store")
            code = await self.ha.login(OWNER_USERNAME, password, self.client_id, self.redirect_uri)
        tokens = await self.ha.token_from_code(code, self.client_id)
        self._auth_code = None
        self._access = tokens.access_token
        REDACTOR.add(tokens.access_token)
        if tokens.refresh_token:
            await self._put_secret("refresh_token", tokens.refresh_token)
        return tokens.access_token

    async def _access_token(self) -> str:
        if self._access is not None:
            return self._access
        refresh = await self._secret("refresh_token")
        if refresh:
            try:
                tokens = await self.ha.refresh(refresh, self.client_id)
            except HaError as err:
                if err.status not in (400, 401, 403):
                    raise
            else:
                self._access = tokens.access_token
                REDACTOR.add(tokens.access_token)
                return self._access
        return await self._login()

    async def _step_core_config(self) -> None:
        token = await self._access_token()
        update: dict[str, Any] = {"location_name": self.settings.site_name}
        if self.settings.haos_time_zone:
            update["time_zone"] = self.settings.haos_time_zone
        if self.settings.haos_country:
            update["country"] = self.settings.haos_country
        async with self.ha.websocket(token) as ws:
            await ws.call("config/core/update", **update)
        await self.ha.onboarding_step("core_config", token)

    async def _step_analytics(self) -> None:
        await self.ha.onboarding_step("analytics", await self._access_token())

    async def _step_integration(self) -> None:
        await self.ha.onboarding_step(
            "integration",
            await self._access_token(),
            {"client_id": self.client_id, "redirect_uri": self.redirect_uri},
        )
        status = await self.ha.onboarding()
        if not all(status.values()):
            raise StepFailed(f"onboarding not complete: {status}")

    async def _step_token(self) -> None:
        existing = await self._secret("token")
        if existing and await self.ha.token_works(existing):
            return
        # HA allows one long-lived token per client name: make each name unique.
        name = f"{TOKEN_CLIENT_NAME} {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')}"
        async with self.ha.websocket(await self._access_token()) as ws:
            token = await ws.call(
                "auth/long_lived_access_token", client_name=name, lifespan=TOKEN_LIFESPAN_DAYS
            )
        if not isinstance(token, str) or not token:
            raise StepFailed("no long-lived token in HA's answer")
        await self._put_secret("token", token)

    async def _long_lived(self) -> str:
        token = await self._secret("token")
        if token is None:
            raise StepFailed("the long-lived token is not in the secret store")
        return token

    async def _step_wiring(self) -> None:
        token = await self._long_lived()
        entry_id = await self._ensure_integration(token)
        await self._save(facts={"config_entry_id": entry_id})
        async with self.sync_lock:
            await sync_mqtt_logins(self.services, self.instance, self.ha, token)

    async def _ensure_integration(self, token: str) -> str | None:
        """The ``ctrlable`` config entry pointing at this companion (idempotent). The flow id is
        recorded before it is used: a flow left open by a stopped companion is aborted first
        (HA would answer ``already_in_progress``)."""
        stale = self.facts.get("config_flow_id")
        if stale:
            await self.ha.abort_flow(str(stale), token)
        try:
            result = await self.ha.start_flow(INTEGRATION_DOMAIN, token)
        except HaError as err:
            if err.status in (400, 404):
                raise StepFailed(
                    "Home Assistant has no 'ctrlable' integration: the base backup must "
                    f"carry custom_components/ctrlable ({err})"
                ) from None
            raise
        if result.get("type") == "abort":
            if result.get("reason") == "already_configured":
                return self.facts.get("config_entry_id")
            raise StepFailed(f"ctrlable config flow aborted: {result.get('reason')}")
        if result.get("type") == "form":
            await self._save(facts={"config_flow_id": result["flow_id"]})
            result = await self.ha.flow_step(
                str(result["flow_id"]),
                {
                    "url": self.settings.public_url,
                    "api_token": self.settings.api_token.get_secret_value(),
                },
                token,
            )
        if result.get("type") == "abort" and result.get("reason") == "already_configured":
            return self.facts.get("config_entry_id")
        if result.get("type") != "create_entry":
            raise StepFailed(
                "ctrlable config flow did not create the entry "
                f"(HA could not use {self.settings.public_url}): "
                f"{result.get('errors') or result.get('reason') or result.get('type')}"
            )
        await self._save(facts={"config_flow_id": None})
        entry = result.get("result")
        return str(entry.get("entry_id")) if isinstance(entry, dict) else None

    async def _step_enroll(self) -> None:
        config = await self.ha.config(await self._long_lived())
        await self._save(
            facts={
                "ha": {
                    "url": self.ha.base_url,
                    "version": config.get("version"),
                    "location_name": config.get("location_name"),
                    "installation_type": self.facts.get("installation_type"),
                    "enrolled_at": utcnow(),
                }
            }
        )
        platform = getattr(self.services, "platform", None)
        if platform is not None:
            platform.notify()

    def _spec(self) -> Any:
        manifest = self.services.catalog.get(self.instance.release)
        if manifest is None or self.instance.type not in manifest.templates:
            raise StepFailed(f"release {self.instance.release} has no {self.instance.type}")
        return manifest.templates[self.instance.type]


# --------------------------------------------------------------------------------------------
# MQTT broker logins (the project's apps -> HA users the Mosquitto add-on accepts)
# --------------------------------------------------------------------------------------------


async def wanted_mqtt_logins(services: Services, pro: Instance) -> dict[str, str]:
    """username -> password of every live app in ``pro``'s project whose assignment points its
    MQTT at ``pro`` (``companion/wiring.py``: ``ctrlable-<hostname>`` logins)."""
    rows = await services.db.fetchall(
        "SELECT a.instance_id, a.payload FROM assignments a JOIN instances i"
        " ON i.id = a.instance_id WHERE i.project_id = ? AND i.id != ?"
        " AND i.state NOT IN ('failed', 'removed', 'rolling_back') AND a.state != 'revoked'"
        " ORDER BY a.id",
        (pro.project_id, pro.id),
    )
    latest: dict[int, str] = {int(r["instance_id"]): str(r["payload"]) for r in rows}
    wanted: dict[str, str] = {}
    for payload in latest.values():
        try:
            mqtt = json.loads(payload)["guest"]["wiring"].get("mqtt")
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if not isinstance(mqtt, Mapping) or not mqtt.get("user") or not mqtt.get("password"):
            continue
        host = mqtt.get("host") or urlsplit(str(mqtt.get("server") or "")).hostname
        if host == pro.hostname:
            wanted[str(mqtt["user"])] = str(mqtt["password"])
    return wanted


async def sync_mqtt_logins(services: Services, pro: Instance, ha: HaClient, token: str) -> None:
    """Create / update / delete the HA users that are the apps' broker logins. Only users this
    companion made (recorded in the flow's facts) are ever changed or deleted."""
    row = await services.db.fetchone(
        "SELECT facts FROM haos_flows WHERE instance_id = ?", (pro.id,)
    )
    facts: dict[str, Any] = json.loads(row["facts"]) if row else {}
    managed: dict[str, dict[str, str]] = dict(facts.get("mqtt_users") or {})
    wanted = await wanted_mqtt_logins(services, pro)
    for value in wanted.values():
        REDACTOR.add(value)
    if not wanted and not managed:
        return
    async with ha.websocket(token) as ws:
        users = await ws.call("config/auth/list") or []
        by_name = {str(u["username"]): u for u in users if u.get("username")}
        for username, password in sorted(wanted.items()):
            user = by_name.get(username)
            known = managed.get(username)
            if user is None:
                # A user a stopped sync created without its login yet: give it the login.
                orphan = next((u for u in users if _made_by_us(u, username, bare=True)), None)
                if orphan is not None:
                    user_id = str(orphan["id"])
                    await ws.call(
                        "config/auth_provider/homeassistant/create",
                        user_id=user_id,
                        username=username,
                        password=password,
                    )
                    managed[username] = {"user_id": user_id, "digest": _digest(user_id + password)}
                    continue
                _LOGGER.info("instance %s: creating the MQTT login %s in HA", pro.id, username)
                created = await ws.call(
                    "config/auth/create", name=username, group_ids=[MQTT_GROUP], local_only=True
                )
                user_id = str(created["user"]["id"])
                await ws.call(
                    "config/auth_provider/homeassistant/create",
                    user_id=user_id,
                    username=username,
                    password=password,
                )
            elif known is None and not _made_by_us(user, username):
                # A user of that name exists that we did not make: leave it alone.
                _LOGGER.warning(
                    "instance %s: HA user %s exists and is not ours; not changing it",
                    pro.id,
                    username,
                )
                continue
            else:
                user_id = str(user["id"])
                if known is None or known.get("digest") != _digest(user_id + password):
                    await ws.call(
                        "config/auth_provider/homeassistant/admin_change_password",
                        user_id=user_id,
                        password=password,
                    )
            managed[username] = {"user_id": user_id, "digest": _digest(user_id + password)}
        for username in sorted(set(managed) - set(wanted)):
            user = by_name.get(username)
            if user is not None and str(user["id"]) == managed[username]["user_id"]:
                await ws.call("config/auth/delete", user_id=managed[username]["user_id"])
            del managed[username]
    async with services.db.transaction() as tx:
        row = await tx.fetchone("SELECT facts FROM haos_flows WHERE instance_id = ?", (pro.id,))
        current = json.loads(row["facts"] or "{}") if row else {}
        current["mqtt_users"] = managed
        await tx.execute(
            "UPDATE haos_flows SET facts = ?, updated_at = ? WHERE instance_id = ?",
            (dumps(current), utcnow(), pro.id),
        )
    _LOGGER.info("instance %s: %d MQTT login(s) in sync", pro.id, len(managed))


def _made_by_us(user: Mapping[str, Any], username: str, *, bare: bool = False) -> bool:
    """A user as :func:`sync_mqtt_logins` makes them: named after its login, local only, in
    ``system-users``, not the owner (``bare``: and still without credentials). Such a user
    without a record is one a stopped sync made; it is adopted."""
    shape = (
        user.get("name") == username
        and bool(user.get("local_only"))
        and list(user.get("group_ids") or []) == [MQTT_GROUP]
        and not user.get("is_owner")
        and not user.get("system_generated")
    )
    if bare:
        return shape and not user.get("credentials")
    return shape and user.get("username") == username


# --------------------------------------------------------------------------------------------
# The kind handler (also a Component: keeps the broker logins in sync)
# --------------------------------------------------------------------------------------------


class HaosHandler(VmHandler):
    """The ``vm`` kind: ctrlable-pro. Registered with ``services.deploy.register_kind`` and
    appended to ``services.components`` (it watches the event bus for app changes)."""

    manifest_kind: ClassVar[str] = "vm"

    def __init__(self, services: Services) -> None:
        self.services = services
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()

    # deploy hooks ------------------------------------------------------------------------

    async def prepare(self, plane: DeployPlane, instance: Instance) -> None:
        """Before the start: a fresh flow record (the clone has never booted)."""
        now = utcnow()
        await self.services.db.execute(
            "INSERT INTO haos_flows (instance_id, step, created_at, updated_at)"
            " VALUES (?, 'address', ?, ?) ON CONFLICT(instance_id) DO UPDATE SET"
            " step = 'address', address = NULL, port = NULL, facts = '{}', error = NULL,"
            " updated_at = excluded.updated_at",
            (instance.id, now, now),
        )

    async def finish(
        self, plane: DeployPlane, instance: Instance, remaining: float
    ) -> dict[str, Any]:
        """The flow, with its own time budgets (``CTRLABLE_HAOS_*_TIMEOUT``): a HAOS first boot
        plus a restore takes far longer than an LXC's first-boot callback."""
        return await HaosFlow(self.services, instance, self._sync_lock).run()

    async def cleanup(self, plane: DeployPlane, instance: Instance) -> None:
        """Rollback/removal: the VM and its HA go away, so do its credentials."""
        async with self.services.db.transaction() as tx:
            await tx.execute("DELETE FROM secrets WHERE name LIKE ?", (f"haos.{instance.id}.%",))
            await tx.execute(
                "UPDATE haos_flows SET step = 'rolled_back', updated_at = ? WHERE instance_id = ?",
                (utcnow(), instance.id),
            )

    # platform report ----------------------------------------------------------------------

    async def report_extras(self) -> dict[int, dict[str, Any]]:
        rows = await self.services.db.fetchall(
            "SELECT instance_id, facts FROM haos_flows WHERE step = 'done'"
        )
        extras: dict[int, dict[str, Any]] = {}
        for row in rows:
            ha = json.loads(row["facts"] or "{}").get("ha")
            if isinstance(ha, dict):
                extras[int(row["instance_id"])] = {"ha": ha}
        return extras

    # component ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="haos-mqtt-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):
            await self.sync_all()
        while True:
            async with self.services.events.subscribe() as queue:
                while True:
                    event = await queue.get()
                    if event is None:
                        break
                    if (
                        event.type == "instance.state"
                        and event.data.get("type") != "ctrlable-pro"
                        and event.data.get("state") not in LOGINS_UNCHANGED
                    ):
                        try:
                            await self.sync_all(project=event.data.get("project"))
                        except Exception as err:  # the next change retries
                            _LOGGER.warning("MQTT login sync failed: %s", err)
            await asyncio.sleep(1.0)

    async def sync_all(self, project: str | None = None) -> None:
        """Bring the broker logins of every enrolled ctrlable-pro (of ``project``) in line."""
        deploy = self.services.deploy
        rows = await self.services.db.fetchall(
            "SELECT f.instance_id, f.address, f.port FROM haos_flows f"
            " JOIN instances i ON i.id = f.instance_id WHERE f.step = 'done'"
            " AND i.state = 'active'"
        )
        async with self._sync_lock:
            for row in rows:
                pro = await deploy.get(int(row["instance_id"]))
                if project is not None and pro.project != project:
                    continue
                token = await self.services.db.get_secret(secret_name(pro.id, "token"))
                if not token:
                    continue
                host = row["address"]
                async with HaClient(
                    f"http://{host}:{row['port']}",
                    timeout=self.services.settings.haos_request_timeout,
                ) as ha:
                    await sync_mqtt_logins(self.services, pro, ha, token)
