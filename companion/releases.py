"""Which releases this site has: shipped manifests, built templates, and the active release.

"Latest validated" is the release the host's templates were built from: the *active* release.
A release becomes active when every template of its manifest has a recorded template VMID, either
from a build (``build.py``) or adopted from the host, where the build wrapper tags each template
``ctrlable``, ``release-<release>`` and ``tmpl-<name>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .events import EventBus
from .manifest import Manifest, ReleaseCatalog
from .state import Database, Row, utcnow

_LOGGER = logging.getLogger(__name__)

TAG = "ctrlable"


@dataclass(frozen=True, slots=True)
class TemplateRecord:
    release: str
    name: str
    kind: str
    node: str | None
    template_vmid: int | None
    builder_ref: str | None
    app_version: str | None

    @classmethod
    def from_row(cls, row: Row) -> TemplateRecord:
        return cls(
            row["release"],
            row["name"],
            row["kind"],
            row["node"],
            row["template_vmid"],
            row["builder_ref"],
            row["app_version"],
        )


def template_tags(release: str, name: str) -> list[str]:
    """The PVE tags the build wrapper puts on a finished template."""
    return [TAG, f"release-{release}", f"tmpl-{name}"]


class Releases:
    def __init__(self, db: Database, catalog: ReleaseCatalog, events: EventBus) -> None:
        self.db = db
        self.catalog = catalog
        self.events = events
        # Template records by (release, name): only record_template writes them, so a record
        # once read stays right until it does (every deploy step reads one).
        self._templates: dict[tuple[str, str], TemplateRecord] = {}

    async def sync_catalog(self) -> None:
        """Make sure every shipped manifest has a row (state ``available``)."""
        async with self.db.transaction() as tx:
            for name in self.catalog.names():
                shipped = self.catalog.shipped(name)
                assert shipped is not None
                await tx.execute(
                    "INSERT INTO releases (release, state, manifest_sha256, created_at) "
                    "VALUES (?, 'available', ?, ?) ON CONFLICT(release) DO UPDATE SET "
                    "manifest_sha256 = excluded.manifest_sha256",
                    (name, shipped.sha256, utcnow()),
                )

    async def active(self) -> str | None:
        row = await self.db.fetchone(
            "SELECT release FROM releases WHERE state = 'active' ORDER BY activated_at DESC LIMIT 1"
        )
        return None if row is None else str(row["release"])

    async def active_manifest(self) -> Manifest | None:
        release = await self.active()
        return None if release is None else self.catalog.get(release)

    def latest(self) -> str | None:
        return self.catalog.latest()

    async def templates(self, release: str) -> list[TemplateRecord]:
        rows = await self.db.fetchall(
            "SELECT * FROM templates WHERE release = ? ORDER BY name", (release,)
        )
        return [TemplateRecord.from_row(r) for r in rows]

    async def template(self, release: str, name: str) -> TemplateRecord | None:
        cached = self._templates.get((release, name))
        if cached is not None:
            return cached
        row = await self.db.fetchone(
            "SELECT * FROM templates WHERE release = ? AND name = ?", (release, name)
        )
        if row is None:
            return None
        record = self._templates[(release, name)] = TemplateRecord.from_row(row)
        return record

    async def record_template(
        self,
        release: str,
        name: str,
        *,
        node: str | None,
        template_vmid: int,
        builder_ref: str | None,
        app_version: str | None,
    ) -> None:
        manifest = self.catalog.get(release)
        if manifest is None or name not in manifest.templates:
            msg = f"{release}/{name} is not in a shipped manifest"
            raise ValueError(msg)
        kind = manifest.templates[name].kind
        self._templates.pop((release, name), None)
        await self.db.execute(
            "INSERT INTO templates (release, name, kind, node, template_vmid, builder_ref,"
            " app_version, built_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(release, name) DO UPDATE SET node = excluded.node,"
            " template_vmid = excluded.template_vmid, builder_ref = excluded.builder_ref,"
            " app_version = excluded.app_version, built_at = excluded.built_at",
            (release, name, kind, node, template_vmid, builder_ref, app_version, utcnow()),
        )

    async def complete(self, release: str) -> bool:
        """True when every template of the release's manifest has a template VMID."""
        manifest = self.catalog.get(release)
        if manifest is None:
            return False
        have = {t.name for t in await self.templates(release) if t.template_vmid is not None}
        return set(manifest.templates) <= have

    async def set_state(self, release: str, state: str) -> None:
        await self.db.execute("UPDATE releases SET state = ? WHERE release = ?", (state, release))

    async def mark_active(self, release: str) -> None:
        """Make ``release`` the active one; the previous active release is superseded."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE releases SET state = 'superseded' WHERE state = 'active' AND release != ?",
                (release,),
            )
            await tx.execute(
                "UPDATE releases SET state = 'active', activated_at = ? WHERE release = ?",
                (utcnow(), release),
            )
        _LOGGER.info("release %s is now active", release)
        await self.events.publish("release.active", {"release": release})

    async def adopt(self, guests: Iterable[Mapping[str, Any]]) -> list[str]:
        """Record templates found on the host (tagged by the build wrapper); activate complete
        releases newer than the active one. ``guests`` are /cluster/resources-like dicts."""
        found: dict[str, dict[str, tuple[int, str | None]]] = {}
        for guest in guests:
            if not guest.get("template"):
                continue
            tags = set(str(guest.get("tags") or "").replace(",", ";").split(";"))
            if TAG not in tags:
                continue
            release = next((t[8:] for t in tags if t.startswith("release-")), None)
            name = next((t[5:] for t in tags if t.startswith("tmpl-")), None)
            if release is None or name is None:
                continue
            manifest = self.catalog.get(release)
            if manifest is None or name not in manifest.templates:
                continue
            found.setdefault(release, {})[name] = (int(guest["vmid"]), guest.get("node"))
        activated: list[str] = []
        for release, templates in sorted(found.items()):
            manifest = self.catalog.get(release)
            assert manifest is not None
            for name, (vmid, node) in templates.items():
                known = await self.template(release, name)
                if known is None or known.template_vmid != vmid or known.node != node:
                    await self.record_template(
                        release,
                        name,
                        node=node,
                        template_vmid=vmid,
                        builder_ref=manifest.community_scripts_ref,
                        app_version=getattr(manifest.templates[name], "app_version", None),
                    )
            active = await self.active()
            if await self.complete(release) and (active is None or _newer(release, active)):
                await self.mark_active(release)
                activated.append(release)
        return activated

    async def describe(self) -> dict[str, Any]:
        """The ``releases`` block of the API."""
        rows = {
            r["release"]: r for r in await self.db.fetchall("SELECT release, state FROM releases")
        }
        releases = []
        for name in self.catalog.names():
            manifest = self.catalog.get(name)
            assert manifest is not None
            recorded = {t.name: t for t in await self.templates(name)}
            releases.append(
                {
                    "release": name,
                    "state": rows.get(name, {}).get("state", "available"),
                    "notes": manifest.notes,
                    "community_scripts_ref": manifest.community_scripts_ref,
                    "templates": [
                        {
                            "name": tname,
                            "kind": spec.kind,
                            "template_vmid": recorded[tname].template_vmid
                            if tname in recorded
                            else None,
                            "node": recorded[tname].node if tname in recorded else None,
                            "app_version": getattr(spec, "app_version", None)
                            or getattr(spec, "haos_version", None),
                        }
                        for tname, spec in manifest.templates.items()
                    ],
                }
            )
        return {"active": await self.active(), "latest": self.latest(), "releases": releases}


def _newer(a: str, b: str) -> bool:
    return tuple(int(p) for p in a.split(".")) > tuple(int(p) for p in b.split("."))
