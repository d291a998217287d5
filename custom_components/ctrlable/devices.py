"""Keep the device registry in line with the companion: rename, re-parent, remove stale."""

from __future__ import annotations

from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import device_registry as dr

from .const import DOMAIN
from .coordinator import CtrlableConfigEntry
from .entity import (
    companion_device_info,
    guest_identifier,
    node_device_info,
    node_identifier,
    project_identifier,
)


def current_identifiers(entry: CtrlableConfigEntry) -> set[str]:
    """Identifiers of every device the current data calls for."""
    coordinator = entry.runtime_data.coordinator
    site_id = coordinator.site_id
    return (
        {site_id}
        | {node_identifier(site_id, node.node) for node in coordinator.data.nodes}
        | {guest_identifier(site_id, guest.vmid) for guest in coordinator.exposed_guests()}
        | {
            project_identifier(site_id, instance.project)
            for instance in coordinator.visible_instances()
        }
    )


def is_current(entry: CtrlableConfigEntry, device: dr.DeviceEntry) -> bool:
    """True if the companion still reports what this device stands for."""
    wanted = current_identifiers(entry)
    return any(domain == DOMAIN and ident in wanted for domain, ident in device.identifiers)


@callback
def async_sync_devices(hass: HomeAssistant, entry: CtrlableConfigEntry) -> None:
    """Create the companion and node devices (the parents of every other device) first, remove
    devices that vanished, and follow guest renames and migrations to another node."""
    coordinator = entry.runtime_data.coordinator
    if not coordinator.last_update_success:
        return
    registry = dr.async_get(hass)
    site_id = coordinator.site_id
    registry.async_get_or_create(
        config_entry_id=entry.entry_id, **companion_device_info(coordinator)
    )
    for name in (item.node for item in coordinator.data.nodes):
        registry.async_get_or_create(
            config_entry_id=entry.entry_id, **node_device_info(site_id, name)
        )
    if not coordinator.inventory_complete:
        return
    wanted = current_identifiers(entry)
    for device in dr.async_entries_for_config_entry(registry, entry.entry_id):
        if not any(domain == DOMAIN and ident in wanted for domain, ident in device.identifiers):
            registry.async_update_device(device.id, remove_config_entry_id=entry.entry_id)
    for guest in coordinator.exposed_guests():
        guest_device = registry.async_get_device({(DOMAIN, guest_identifier(site_id, guest.vmid))})
        if guest_device is None:
            continue
        node = registry.async_get_device({(DOMAIN, node_identifier(site_id, guest.node))})
        via_device_id = node.id if node is not None else guest_device.via_device_id
        if guest_device.name != guest.name or guest_device.via_device_id != via_device_id:
            registry.async_update_device(
                guest_device.id, name=guest.name, via_device_id=via_device_id
            )
