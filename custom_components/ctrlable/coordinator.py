"""The data coordinator (one overview poll per entry) and the companion event stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryAuthFailed
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed

from .api import (
    Build,
    CtrlableAuthenticationError,
    CtrlableClient,
    CtrlableError,
    CtrlableEvent,
    CtrlableResponseError,
    Guest,
    Instance,
    Overview,
    Platform,
)
from .const import (
    BUILD_RUNNING_STATES,
    CONF_EXCLUDED_GUESTS,
    CONF_SCAN_INTERVAL,
    DEFAULT_SCAN_INTERVAL,
    DOMAIN,
    EVENT_STREAM_BACKOFF_MAX,
    EVENT_STREAM_BACKOFF_MIN,
    EVENT_STREAM_STABLE_AFTER,
    LOGGER,
)

type CtrlableConfigEntry = ConfigEntry[CtrlableData]


@dataclass(kw_only=True, slots=True)
class CtrlableData:
    """Runtime data of one config entry."""

    client: CtrlableClient
    coordinator: CtrlableDataUpdateCoordinator
    event_stream: CtrlableEventStream
    options: Mapping[str, Any]


class CtrlableDataUpdateCoordinator(DataUpdateCoordinator[Overview]):
    """Polls `GET /api/v1/overview` and applies pushed events in between."""

    config_entry: CtrlableConfigEntry

    def __init__(
        self, hass: HomeAssistant, entry: CtrlableConfigEntry, client: CtrlableClient
    ) -> None:
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=f"{DOMAIN} {entry.title}",
            update_interval=timedelta(
                seconds=entry.options.get(CONF_SCAN_INTERVAL, DEFAULT_SCAN_INTERVAL)
            ),
        )
        self.client = client

    @property
    def site_id(self) -> str:
        """The companion's site id: the entry's unique id, the base of every device id."""
        return self.config_entry.unique_id or self.config_entry.entry_id

    @property
    def inventory_complete(self) -> bool:
        """False while the companion cannot reach Proxmox VE (nodes and guests are then empty)."""
        return not any(problem.code == "pve_unreachable" for problem in self.data.problems)

    def exposed_guests(self) -> list[Guest]:
        """Guests with entities: every non-template guest the user did not exclude."""
        excluded = {str(vmid) for vmid in self.config_entry.options.get(CONF_EXCLUDED_GUESTS, [])}
        return [
            guest
            for guest in self.data.guests
            if not guest.template and str(guest.vmid) not in excluded
        ]

    def visible_instances(self) -> list[Instance]:
        """Instances with entities: every instance that was not removed."""
        return [item for item in self.data.instances if item.state != "removed"]

    async def _async_update_data(self) -> Overview:
        try:
            overview = await self.client.overview()
        except CtrlableAuthenticationError as err:
            raise ConfigEntryAuthFailed(
                translation_domain=DOMAIN, translation_key="invalid_auth"
            ) from err
        except CtrlableError as err:
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key="update_failed",
                translation_placeholders={"error": str(err)},
            ) from err
        expected = self.config_entry.unique_id
        if expected is not None and overview.companion.site_id != expected:
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key="site_mismatch",
                translation_placeholders={
                    "expected": expected,
                    "actual": overview.companion.site_id,
                },
            )
        return overview

    async def async_handle_event(self, event: CtrlableEvent) -> None:
        """Apply one pushed event to the current data and tell the entities.

        Raises `CtrlableResponseError` if a known event carries a malformed payload.
        """
        data = self.data
        payload = event.data
        refresh = False
        new = data
        match event.event:
            case "instance.state":
                new = _with_instance(data, Instance.from_dict(_mapping(payload, event.event)))
                # A new or changed instance usually means guests changed too.
                refresh = True
            case "build.progress" | "build.state":
                new = _with_build(data, Build.from_dict(_mapping(payload, event.event)))
                refresh = event.event == "build.state"
            case "platform.report":
                new = replace(data, platform=Platform.from_dict(_mapping(payload, event.event)))
            case "release.active":
                refresh = True
            case _:
                LOGGER.debug("Ignoring companion event %s", event.event)
        if new is not data:
            self.data = new
            self.async_update_listeners()
        if refresh:
            await self.async_request_refresh()


@callback
def async_apply_build(coordinator: CtrlableDataUpdateCoordinator, build: Build) -> None:
    """Put a build the companion just answered into the data and tell the entities."""
    coordinator.data = _with_build(coordinator.data, build)
    coordinator.async_update_listeners()


@callback
def async_apply_instances(
    coordinator: CtrlableDataUpdateCoordinator, instances: Iterable[Instance]
) -> None:
    """Put instances the companion just answered into the data and tell the entities."""
    data = coordinator.data
    for instance in instances:
        data = _with_instance(data, instance)
    coordinator.data = data
    coordinator.async_update_listeners()


def _with_instance(data: Overview, instance: Instance) -> Overview:
    current = data.instance(instance.id)
    if (
        current is not None
        and current.updated_at is not None
        and instance.updated_at is not None
        and instance.updated_at < current.updated_at
    ):
        return data  # a replayed, older state
    return replace(
        data, instances=_upsert(data.instances, instance, lambda item: item.id == instance.id)
    )


def _with_build(data: Overview, build: Build) -> Overview:
    current = next((item for item in data.builds if item.id == build.id), None)
    if current is not None and (
        (current.state not in BUILD_RUNNING_STATES and build.state in BUILD_RUNNING_STATES)
        or (current.state == build.state and build.percent < current.percent)
    ):
        return data  # a replayed, older state
    return replace(data, builds=_upsert(data.builds, build, lambda item: item.id == build.id))


def _mapping(payload: Any, event: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise CtrlableResponseError(f"invalid event {event}: data must be an object")
    return payload


def _upsert[T](items: tuple[T, ...], new: T, same: Callable[[T], bool]) -> tuple[T, ...]:
    """Replace the item for which `same(item)` is true with `new`, or append `new`."""
    if any(same(item) for item in items):
        return tuple(new if same(item) else item for item in items)
    return (*items, new)


class CtrlableEventStream:
    """Follows the companion's event stream, reconnecting with backoff, until cancelled."""

    def __init__(self, coordinator: CtrlableDataUpdateCoordinator) -> None:
        self._coordinator = coordinator
        self.last_event_id: int | None = None
        self.reconnects = 0
        self._lost = False

    async def async_run(self) -> None:
        """Run forever; the config entry cancels this task on unload."""
        loop = asyncio.get_running_loop()
        backoff = EVENT_STREAM_BACKOFF_MIN
        if self._coordinator.data is not None:
            self.last_event_id = self._coordinator.data.last_event_id
        while True:
            started = loop.time()
            received = False
            error: CtrlableError | None = None
            try:
                async for event in self._coordinator.client.events(since=self.last_event_id):
                    if not received and self._lost:
                        LOGGER.info("Companion event stream restored")
                        self._lost = False
                    received = True
                    if event.id is not None:
                        self.last_event_id = event.id
                    try:
                        await self._coordinator.async_handle_event(event)
                    except CtrlableResponseError as err:
                        LOGGER.warning("Ignoring malformed %s event: %s", event.event, err)
            except CtrlableError as err:
                error = err
            if error is None or received or loop.time() - started >= EVENT_STREAM_STABLE_AFTER:
                backoff = EVENT_STREAM_BACKOFF_MIN
            if error is not None and not self._lost:
                LOGGER.warning("Lost the companion event stream (%s); reconnecting", error)
                self._lost = True
            elif error is not None:
                LOGGER.debug("Companion event stream still down: %s", error)
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, EVENT_STREAM_BACKOFF_MAX)
