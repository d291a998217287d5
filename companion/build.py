"""The build plane: the PVE host's ``ctrlable-build`` builds a release's templates over SSH.

The host runs the wrapper through a ``command=``-restricted SSH key; the companion connects with
asyncssh, checks the host key against a pinned known_hosts file (no trust on first use), sends
``build <release> [template...]`` and reads the wrapper's JSON lines (``start``, ``progress``,
``result``, ``done``). Each line updates the ``builds`` row and is published on the event bus
(``build.progress``; ``build.state`` when the build's state changes). A finished template is
recorded in ``templates``; the release becomes active once all of its templates are built.

One build at a time (a second request is a 409). A dropped SSH connection fails the build (the
wrapper sees its stdin close and destroys the half-built guest). A companion restart finds an
unfinished build and marks it failed: its SSH session died with the old process, and with it the
host's build (see SPEC.md, "Build plane").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import asyncssh

from .errors import Conflict, InvalidRequest, NotFound, Unavailable
from .events import EventBus
from .manifest import ReleaseCatalog
from .releases import Releases
from .settings import Settings
from .state import Database, Row, dumps, utcnow

_LOGGER = logging.getLogger(__name__)

PROTOCOL = 1
LOG_TAIL = 60
STDERR_TAIL = 20
CANCEL_TIMEOUT = 150.0
_HOST_BUILD_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9]+$")
RESTART_ERROR = (
    "the companion restarted during the build; the SSH session ended with it, so the host's "
    "ctrlable-build stopped and destroyed the half-built guest. Start the build again."
)


@dataclass
class _Running:
    """The build in progress (in memory; the DB row is its durable copy)."""

    id: int
    release: str
    requested: list[str]
    templates: dict[str, dict[str, Any]]
    release_state_before: str | None
    host_build_id: str | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL))
    done: dict[str, Any] | None = None
    cancel_requested: bool = False
    process: asyncssh.SSHClientProcess[str] | None = None
    task: asyncio.Task[None] | None = None
    cancel_task: asyncio.Task[None] | None = None
    message: str = ""


def build_dict(row: Row) -> dict[str, Any]:
    """The API shape of a ``builds`` row (docs/api.md, Build)."""
    return {
        "id": int(row["id"]),
        "release": row["release"],
        "state": row["state"],
        "percent": int(row["percent"]),
        "templates": json.loads(row["templates"]),
        "requested": json.loads(row["requested"]),
        "error": row["error"],
        "log_tail": json.loads(row["log_tail"]),
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


def overall_percent(templates: dict[str, dict[str, Any]]) -> int:
    """Mean of the templates' progress; a finished template (either way) counts as 100."""
    if not templates:
        return 0
    total = 0
    for item in templates.values():
        finished = item["state"] in ("succeeded", "failed", "cancelled")
        total += 100 if finished else int(item.get("percent") or 0)
    return min(100, total // len(templates))


class BuildPlane:
    """Builds over SSH; a Component of the app (``services.build``)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        events: EventBus,
        catalog: ReleaseCatalog,
        releases: Releases,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.catalog = catalog
        self.releases = releases
        self._running: _Running | None = None
        self._start_lock = asyncio.Lock()

    # Component ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Builds left unfinished by a previous process are failed (no re-attach)."""
        rows = await self.db.fetchall(
            "SELECT * FROM builds WHERE state NOT IN ('succeeded', 'failed', 'cancelled')"
        )
        for row in rows:
            _LOGGER.warning("build %s was interrupted by a restart: marking it failed", row["id"])
            templates = json.loads(row["templates"])
            for item in templates.values():
                if item["state"] in ("pending", "running"):
                    item["state"] = "failed"
                    item["error"] = "interrupted by a companion restart"
            await self.db.execute(
                "UPDATE builds SET state = 'failed', error = ?, templates = ?, finished_at = ?"
                " WHERE id = ?",
                (RESTART_ERROR, dumps(templates), utcnow(), row["id"]),
            )
            built = await self.get(int(row["id"]))
            await self.events.publish("build.state", built)
        await self.db.execute(
            "UPDATE releases SET state = 'available' WHERE state = 'building'", ()
        )

    async def stop(self) -> None:
        running = self._running
        if running is None or running.task is None:
            return
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task

    # Queries -----------------------------------------------------------------------------

    def current(self) -> dict[str, Any] | None:
        """The running build as a small summary, or None."""
        running = self._running
        if running is None:
            return None
        return {
            "id": running.id,
            "release": running.release,
            "percent": overall_percent(running.templates),
            "host_build_id": running.host_build_id,
        }

    async def get(self, build_id: int) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM builds WHERE id = ?", (build_id,))
        if row is None:
            raise NotFound(f"no build {build_id}")
        return build_dict(row)

    async def recent(self, limit: int = 5) -> list[dict[str, Any]]:
        rows = await self.db.fetchall("SELECT * FROM builds ORDER BY id DESC LIMIT ?", (limit,))
        return [build_dict(r) for r in rows]

    # Commands ----------------------------------------------------------------------------

    def _check_configured(self) -> None:
        s = self.settings
        missing = [
            name
            for name, value in (
                ("CTRLABLE_BUILD_SSH_HOST", s.build_ssh_host),
                ("CTRLABLE_BUILD_SSH_KEY_FILE", s.build_ssh_key_file),
                ("CTRLABLE_BUILD_SSH_KNOWN_HOSTS", s.build_ssh_known_hosts),
            )
            if not value
        ]
        if missing:
            raise Unavailable(
                f"builds are not configured: set {', '.join(missing)} "
                "(the known_hosts file pins the PVE host key; there is no trust on first use)",
                code="build_not_configured",
            )

    async def start_build(self, release: str, templates: list[str] | None = None) -> dict[str, Any]:
        """Start building ``templates`` (default: all) of ``release``; answers the Build."""
        manifest = self.catalog.get(release)
        if manifest is None:
            raise NotFound(f"release {release!r} is not shipped with this companion")
        names = list(manifest.templates) if not templates else list(templates)
        for index, name in enumerate(names):
            if name not in manifest.templates:
                raise InvalidRequest.field(
                    f"templates.{index}", f"{name!r} is not a template of release {release}"
                )
        if len(set(names)) != len(names):
            raise InvalidRequest.field("templates", "names a template twice")
        self._check_configured()
        async with self._start_lock:
            if self._running is not None:
                raise Conflict(
                    f"build {self._running.id} of release {self._running.release} is running",
                    details={"build_id": self._running.id},
                )
            row = await self.db.fetchone("SELECT state FROM releases WHERE release = ?", (release,))
            before = None if row is None else str(row["state"])
            progress = {n: {"state": "pending", "percent": 0} for n in names}
            async with self.db.transaction() as tx:
                build_id = await tx.execute(
                    "INSERT INTO builds (release, state, percent, templates, requested, started_at)"
                    " VALUES (?, 'running', 0, ?, ?, ?)",
                    (release, dumps(progress), dumps(list(templates or [])), utcnow()),
                )
                if before in ("available", "superseded"):
                    await tx.execute(
                        "UPDATE releases SET state = 'building' WHERE release = ?", (release,)
                    )
            running = _Running(build_id, release, list(templates or []), progress, before)
            self._running = running
            running.task = asyncio.create_task(self._run(running), name=f"build-{build_id}")
        built = await self.get(build_id)
        await self.events.publish("build.state", built)
        return built

    async def cancel(self, build_id: int) -> dict[str, Any]:
        """Ask the host to stop the running build; it ends as ``cancelled``."""
        built = await self.get(build_id)
        running = self._running
        if running is None or running.id != build_id:
            raise Conflict(f"build {build_id} is not running (state {built['state']})")
        if not running.cancel_requested:
            running.cancel_requested = True
            running.log.append("cancel requested")
            running.cancel_task = asyncio.create_task(
                self._cancel_on_host(running), name=f"build-{build_id}-cancel"
            )
        return built

    # The SSH session ---------------------------------------------------------------------

    async def _connect(self) -> asyncssh.SSHClientConnection:
        s = self.settings
        assert s.build_ssh_key_file is not None
        assert s.build_ssh_known_hosts is not None
        return await asyncssh.connect(
            s.build_ssh_host,
            port=s.build_ssh_port,
            username=s.build_ssh_user,
            client_keys=[str(s.build_ssh_key_file)],
            known_hosts=str(s.build_ssh_known_hosts),
            agent_path=None,
            config=None,
            connect_timeout=20,
            keepalive_interval=15,
            keepalive_count_max=4,
        )

    async def _cancel_on_host(self, running: _Running) -> None:
        try:
            if running.host_build_id is not None:
                async with await self._connect() as conn:
                    result = await asyncio.wait_for(
                        conn.run(f"cancel {running.host_build_id}", check=False), CANCEL_TIMEOUT
                    )
                    if result.exit_status == 0:
                        return
                    _LOGGER.warning("host cancel failed: %s", str(result.stderr).strip())
        except (OSError, asyncssh.Error, TimeoutError) as err:
            _LOGGER.warning("cannot reach the host to cancel: %s", err)
        # No host build id yet, or the cancel command failed: closing the session makes the
        # wrapper see EOF on stdin, which it treats as a hang-up (it cleans up the same way).
        if running.process is not None:
            running.process.close()

    async def _run(self, running: _Running) -> None:
        command = " ".join(["build", running.release, *running.requested])
        exit_status: int | None = None
        error: str | None = None
        try:
            async with await self._connect() as conn:
                # AnyStr is only bound by ``input=``; with an encoding the streams are str.
                process = cast(
                    "asyncssh.SSHClientProcess[str]",
                    await conn.create_process(command, encoding="utf-8"),
                )
                running.process = process
                drain = asyncio.create_task(self._drain_stderr(running, process))
                try:
                    async for line in process.stdout:
                        await self._handle_line(running, line)
                    await process.wait(check=False)
                    exit_status = process.exit_status
                finally:
                    process.close()
                    drain.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await drain
        except asyncio.CancelledError:
            error = "the companion stopped during the build (the host cleans up on hang-up)"
            await self._finish(running, exit_status, error)
            raise
        except asyncssh.HostKeyNotVerifiable as err:
            error = (
                f"the host key of {self.settings.build_ssh_host} does not match "
                f"CTRLABLE_BUILD_SSH_KNOWN_HOSTS: {err.reason}"
            )
        except asyncssh.PermissionDenied:
            error = (
                f"{self.settings.build_ssh_user}@{self.settings.build_ssh_host} refused the "
                "companion's key (is it in authorized_keys with the command= restriction?)"
            )
        except (OSError, asyncssh.Error) as err:
            error = f"SSH connection to {self.settings.build_ssh_host} failed: {err}"
        except Exception as err:
            _LOGGER.exception("build %s crashed", running.id)
            error = f"internal error: {err}"
        await self._finish(running, exit_status, error)

    async def _drain_stderr(
        self, running: _Running, process: asyncssh.SSHClientProcess[str]
    ) -> None:
        async for line in process.stderr:
            text = line.rstrip()
            if text:
                running.stderr.append(text)
                running.log.append(text)

    # JSON lines --------------------------------------------------------------------------

    async def _handle_line(self, running: _Running, line: str) -> None:
        text = line.strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            running.log.append(text[:300])
            return
        if not isinstance(event, dict):
            running.log.append(text[:300])
            return
        kind = event.get("event")
        template = event.get("template")
        if kind == "start":
            host_id = str(event.get("build_id") or "")
            if _HOST_BUILD_ID.match(host_id):
                running.host_build_id = host_id
            if event.get("protocol") != PROTOCOL:
                running.log.append(f"host speaks protocol {event.get('protocol')}, we {PROTOCOL}")
            running.log.append(f"host build {host_id} started")
        elif kind == "progress":
            message = str(event.get("message") or "")
            step = str(event.get("step") or "")
            if isinstance(template, str) and template in running.templates:
                item = running.templates[template]
                if item["state"] == "pending":
                    item["state"] = "running"
                item["percent"] = _percent(event.get("percent"), item.get("percent", 0))
                item["step"] = step
                item["message"] = message
                running.log.append(f"[{template}] {step}: {message}")
            else:
                running.log.append(f"{step}: {message}")
            running.message = message
        elif kind == "result" and isinstance(template, str) and template in running.templates:
            await self._handle_result(running, template, event)
        elif kind == "done":
            running.done = event
            if event.get("error"):
                running.log.append(f"host: {event['error']}")
        else:
            running.log.append(text[:300])
        await self._save(running, "build.progress")

    async def _handle_result(self, running: _Running, template: str, event: dict[str, Any]) -> None:
        item = running.templates[template]
        if event.get("ok") is True:
            vmid = event.get("template_vmid")
            if not isinstance(vmid, int):
                item.update(state="failed", error="the host reported no template_vmid")
                return
            builder_ref = _opt_str(event.get("builder_ref"))
            app_version = _opt_str(event.get("app_version"))
            item.update(
                state="succeeded",
                percent=100,
                template_vmid=vmid,
                node=_opt_str(event.get("node")),
                builder_ref=builder_ref,
                builder_sha=_opt_str(event.get("builder_sha")),
                app_version=app_version,
                step="done",
            )
            await self.releases.record_template(
                running.release,
                template,
                node=_opt_str(event.get("node")),
                template_vmid=vmid,
                builder_ref=builder_ref,
                app_version=app_version,
            )
            running.log.append(f"[{template}] built as template {vmid}")
        else:
            error = _opt_str(event.get("error")) or "failed"
            item.update(state="failed", percent=100, error=error, step="failed")
            destroyed = event.get("destroyed") or []
            running.log.append(f"[{template}] failed: {error}")
            if destroyed:
                running.log.append(f"[{template}] destroyed {destroyed}")
            for tail in event.get("log_tail") or []:
                running.log.append(f"[{template}] | {str(tail)[:200]}")

    async def _save(
        self,
        running: _Running,
        event_type: str,
        *,
        state: str = "running",
        error: str | None = None,
        finished: bool = False,
    ) -> dict[str, Any]:
        await self.db.execute(
            "UPDATE builds SET state = ?, percent = ?, templates = ?, log_tail = ?, error = ?,"
            " finished_at = ? WHERE id = ?",
            (
                state,
                100 if state == "succeeded" else overall_percent(running.templates),
                dumps(running.templates),
                dumps(list(running.log)),
                error,
                utcnow() if finished else None,
                running.id,
            ),
        )
        built = await self.get(running.id)
        await self.events.publish(event_type, built)
        return built

    async def _finish(self, running: _Running, exit_status: int | None, error: str | None) -> None:
        done = running.done
        failed = [n for n, t in running.templates.items() if t["state"] == "failed"]
        unfinished = [
            n for n, t in running.templates.items() if t["state"] in ("pending", "running")
        ]
        if error is None and done is None:
            stderr = " / ".join(running.stderr) or "no output"
            error = (
                f"the host's ctrlable-build ended without finishing (exit status {exit_status}): "
                f"{stderr[:500]}"
                if exit_status is not None
                else "the SSH connection dropped before the build finished"
            )
        elif error is None and done is not None and not done.get("ok"):
            error = _opt_str(done.get("error")) or (
                f"{len(failed)} of {len(running.templates)} templates failed: {', '.join(failed)}"
            )
        elif error is None and (failed or unfinished):
            error = f"templates not built: {', '.join(failed + unfinished)}"
        if running.cancel_requested:
            state = "cancelled"
            error = "cancelled" if error is None else f"cancelled: {error}"
        else:
            state = "failed" if error else "succeeded"
        for name in unfinished:
            running.templates[name].update(
                state="cancelled" if state == "cancelled" else "failed",
                error=error,
            )
        if error:
            running.log.append(error)
        self._running = None
        try:
            await self._save(running, "build.state", state=state, error=error, finished=True)
            if await self.releases.complete(running.release):
                await self.releases.mark_active(running.release)
            else:
                await self.db.execute(
                    "UPDATE releases SET state = ? WHERE release = ? AND state = 'building'",
                    (running.release_state_before or "available", running.release),
                )
        except Exception:
            _LOGGER.exception("cannot record the end of build %s", running.id)
        _LOGGER.info("build %s of %s ended: %s", running.id, running.release, error or state)


def _percent(value: Any, previous: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, min(100, value))
    return int(previous or 0)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["BuildPlane", "build_dict", "overall_percent"]
