"""The "Ctrlable release" update entity: active release vs the latest validated one."""

from __future__ import annotations

from typing import Any

from homeassistant.components.update import (
    UpdateEntity,
    UpdateEntityDescription,
    UpdateEntityFeature,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import Build, Release
from .const import BUILD_RUNNING_STATES
from .coordinator import CtrlableConfigEntry, async_apply_build
from .entity import CtrlableCompanionEntity
from .helpers import companion_errors

# Installing builds templates on the host; one at a time.
PARALLEL_UPDATES = 1

# Shown as the installed version while no release has been built on this host yet, so that the
# latest release shows up as an update to install.
NO_RELEASE = "none"

RELEASE_UPDATE = UpdateEntityDescription(key="release", translation_key="release")


async def async_setup_entry(
    hass: HomeAssistant,
    entry: CtrlableConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Set up the release update entity."""
    async_add_entities([CtrlableReleaseUpdate(entry.runtime_data.coordinator, RELEASE_UPDATE)])


def _release_notes(release: Release) -> str:
    lines = [release.notes.strip()] if release.notes.strip() else []
    if release.templates:
        lines.append("")
        lines.append(f"Templates in {release.release}:")
        lines.extend(
            f"- {template.name} ({template.kind})"
            + (f": {template.app_version}" if template.app_version else "")
            for template in release.templates
        )
    return "\n".join(lines).strip()


class CtrlableReleaseUpdate(CtrlableCompanionEntity, UpdateEntity):
    """Install = build the latest validated release's templates on the Proxmox host."""

    _attr_supported_features = (
        UpdateEntityFeature.INSTALL
        | UpdateEntityFeature.PROGRESS
        | UpdateEntityFeature.RELEASE_NOTES
    )
    _attr_title = "Ctrlable release"

    @property
    def installed_version(self) -> str | None:
        """The active release (the one the templates on this host come from)."""
        return self.coordinator.data.releases.active or NO_RELEASE

    @property
    def latest_version(self) -> str | None:
        """The latest validated release the companion knows."""
        return self.coordinator.data.releases.latest

    @property
    def _running_build(self) -> Build | None:
        running = [b for b in self.coordinator.data.builds if b.state in BUILD_RUNNING_STATES]
        return max(running, key=lambda build: build.id) if running else None

    @property
    def in_progress(self) -> bool:
        """True while a build runs on the host."""
        return self._running_build is not None

    @property
    def update_percentage(self) -> int | None:
        """Progress of the running build."""
        if (build := self._running_build) is None:
            return None
        return build.percent

    async def async_install(self, version: str | None, backup: bool, **kwargs: Any) -> None:
        """Start building the latest release; progress arrives through the event stream."""
        release = self.latest_version
        if release is None:  # pragma: no cover - Home Assistant refuses the call before
            return
        with companion_errors(self.coordinator.config_entry):
            build = await self.coordinator.client.build_release(release)
        async_apply_build(self.coordinator, build)

    async def async_release_notes(self) -> str | None:
        """The latest release's notes and template versions (markdown)."""
        releases = self.coordinator.data.releases
        if (release := releases.get(releases.latest)) is None:
            return None
        return _release_notes(release)
