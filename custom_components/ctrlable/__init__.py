"""The Ctrlable integration: a Ctrlable Provisioner companion in Home Assistant."""

from __future__ import annotations

from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_API_TOKEN, CONF_URL, Platform
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.device_registry import DeviceEntry
from homeassistant.helpers.typing import ConfigType

from .api import CtrlableClient
from .const import DOMAIN
from .coordinator import (
    CtrlableConfigEntry,
    CtrlableData,
    CtrlableDataUpdateCoordinator,
    CtrlableEventStream,
)
from .devices import async_sync_devices, is_current
from .repairs import async_delete_issues, async_update_issues
from .services import async_setup_services

PLATFORMS: list[Platform] = [
    Platform.BINARY_SENSOR,
    Platform.BUTTON,
    Platform.SENSOR,
    Platform.UPDATE,
]

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the actions (once, for every entry)."""
    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: CtrlableConfigEntry) -> bool:
    """Connect to the companion, poll it, follow its events, set up the platforms."""
    client = CtrlableClient(
        entry.data[CONF_URL], entry.data[CONF_API_TOKEN], async_get_clientsession(hass)
    )
    coordinator = CtrlableDataUpdateCoordinator(hass, entry, client)
    await coordinator.async_config_entry_first_refresh()
    event_stream = CtrlableEventStream(coordinator)
    entry.runtime_data = CtrlableData(
        client=client,
        coordinator=coordinator,
        event_stream=event_stream,
        options=dict(entry.options),
    )

    @callback
    def _async_on_update() -> None:
        async_sync_devices(hass, entry)
        async_update_issues(hass, entry)

    _async_on_update()
    entry.async_on_unload(coordinator.async_add_listener(_async_on_update))
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    entry.async_create_background_task(
        hass, event_stream.async_run(), f"{DOMAIN} event stream {entry.title}"
    )
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    return True


async def _async_update_listener(hass: HomeAssistant, entry: CtrlableConfigEntry) -> None:
    """Reload when the options changed (not when an instance subentry was added)."""
    if dict(entry.options) != dict(entry.runtime_data.options):
        await hass.config_entries.async_reload(entry.entry_id)


async def async_unload_entry(hass: HomeAssistant, entry: CtrlableConfigEntry) -> bool:
    """Unload the platforms; the event stream task is cancelled with the entry."""
    return await hass.config_entries.async_unload_platforms(entry, PLATFORMS)


async def async_remove_entry(hass: HomeAssistant, entry: CtrlableConfigEntry) -> None:
    """Delete this entry's repair issues."""
    async_delete_issues(hass, entry)


async def async_remove_config_entry_device(
    hass: HomeAssistant, entry: CtrlableConfigEntry, device_entry: DeviceEntry
) -> bool:
    """Let the user delete a device unless the companion still reports it."""
    if entry.state is not ConfigEntryState.LOADED:
        return True
    return not is_current(entry, device_entry)
