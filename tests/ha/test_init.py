"""Entry setup and unload, devices (dynamic, stale), and the companion event stream."""

from __future__ import annotations

from typing import Any
from unittest.mock import MagicMock, call

import pytest
from ha_common import EventFeed, load_json
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry
from syrupy.assertion import SnapshotAssertion

from custom_components.ctrlable import async_remove_config_entry_device
from custom_components.ctrlable.api import (
    CtrlableAuthenticationError,
    CtrlableConnectionError,
    CtrlableEvent,
    CtrlableResponseError,
    Overview,
)
from custom_components.ctrlable.const import DOMAIN

NEW_GUEST = {
    "vmid": 103,
    "node": "pve",
    "type": "lxc",
    "name": "frigate-1",
    "status": "running",
    "template": False,
    "cpu": 0.5,
    "maxcpu": 4,
    "mem": 1073741824,
    "maxmem": 4294967296,
    "uptime": 60,
    "instance_id": None,
}


def _overview(**changes: Any) -> Overview:
    data = load_json("overview.json")
    data.update(changes)
    return Overview.from_dict(data)


async def _refresh(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    await entry.runtime_data.coordinator.async_refresh()
    await hass.async_block_till_done()


def _device(device_registry: dr.DeviceRegistry, identifier: str) -> dr.DeviceEntry | None:
    return device_registry.async_get_device({(DOMAIN, identifier)})


async def test_load_unload(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """The entry loads, follows the event stream from the overview's last event, unloads."""
    entry = init_integration
    assert entry.state is ConfigEntryState.LOADED
    assert mock_client.events.call_args_list == [call(since=42)]
    stream_task = next(iter(entry._background_tasks))

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert stream_task.cancelled()
    assert hass.states.get("sensor.zwavejs_1_status").state == STATE_UNAVAILABLE


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (CtrlableConnectionError("down"), ConfigEntryState.SETUP_RETRY),
        (CtrlableResponseError("odd"), ConfigEntryState.SETUP_RETRY),
        (CtrlableAuthenticationError("no"), ConfigEntryState.SETUP_ERROR),
    ],
)
async def test_setup_failures(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    mock_client: MagicMock,
    error: Exception,
    state: ConfigEntryState,
) -> None:
    """Unreachable: retry later. Token refused: setup error and a reauth flow."""
    mock_client.overview.side_effect = error
    mock_config_entry.add_to_hass(hass)
    await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is state
    flows = hass.config_entries.flow.async_progress()
    assert [flow["context"]["source"] for flow in flows] == (
        ["reauth"] if state is ConfigEntryState.SETUP_ERROR else []
    )


async def test_setup_wrong_site(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, mock_client: MagicMock
) -> None:
    """Another companion answering at the entry's URL is not taken for this one."""
    mock_client.overview.return_value = _overview(
        companion={"version": "0.1.0", "site_id": "site-2", "name": "x"}
    )
    mock_config_entry.add_to_hass(hass)
    await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is ConfigEntryState.SETUP_RETRY
    assert "site-2" in (mock_config_entry.reason or "")


async def test_devices(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
    snapshot: SnapshotAssertion,
) -> None:
    """Companion (service), node via companion, guests via node, project via companion."""
    devices = dr.async_entries_for_config_entry(device_registry, init_integration.entry_id)
    by_id = {device.id: device for device in devices}
    summary = sorted(
        (
            {
                "identifiers": sorted(ident for _, ident in device.identifiers),
                "name": device.name,
                "manufacturer": device.manufacturer,
                "model": device.model,
                "serial_number": device.serial_number,
                "sw_version": device.sw_version,
                "entry_type": device.entry_type,
                "configuration_url": device.configuration_url,
                "via": by_id[device.via_device_id].name if device.via_device_id else None,
            }
            for device in devices
        ),
        key=lambda item: item["identifiers"],
    )
    assert summary == snapshot


async def test_unavailable_then_back(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """A failed poll makes entities unavailable; the next good one brings them back."""
    mock_client.overview.side_effect = CtrlableConnectionError("down")
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.pve_cpu_usage").state == STATE_UNAVAILABLE
    assert hass.states.get("update.ctrlable_companion_release").state == STATE_UNAVAILABLE

    mock_client.overview.side_effect = None
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.pve_cpu_usage").state == "12.3"


async def test_auth_failure_while_running(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """A token revoked later starts the reauth flow."""
    mock_client.overview.side_effect = CtrlableAuthenticationError("revoked")
    await _refresh(hass, init_integration)
    flows = hass.config_entries.flow.async_progress()
    assert [flow["context"]["source"] for flow in flows] == ["reauth"]


async def test_dynamic_guests(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
) -> None:
    """New guests get a device and entities without a reload; vanished ones are removed."""
    data = load_json("overview.json")
    data["guests"].append(NEW_GUEST)
    mock_client.overview.return_value = Overview.from_dict(data)
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.frigate_1_status").state == "running"
    assert hass.states.get("button.frigate_1_reboot") is not None
    device = _device(device_registry, "site-1_guest_103")
    assert device is not None
    assert device_registry.async_get(device.via_device_id).name == "pve"

    # Gone: device and entities removed.
    mock_client.overview.return_value = _overview()
    await _refresh(hass, init_integration)
    assert _device(device_registry, "site-1_guest_103") is None
    assert hass.states.get("sensor.frigate_1_status") is None
    assert hass.states.get("button.frigate_1_reboot") is None

    # Back again: created anew.
    mock_client.overview.return_value = Overview.from_dict(data)
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.frigate_1_status").state == "running"


async def test_guest_renamed_and_migrated(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
) -> None:
    """A renamed guest renames its device; a guest moved to another node follows it."""
    data = load_json("overview.json")
    node2 = data["nodes"][0] | {"node": "pve2", "storages": []}
    data["nodes"].append(node2)
    data["guests"][0] |= {"name": "zwave-main", "node": "pve2"}
    mock_client.overview.return_value = Overview.from_dict(data)
    await _refresh(hass, init_integration)
    await _refresh(hass, init_integration)  # the node device exists after the first pass
    device = _device(device_registry, "site-1_guest_101")
    assert device is not None
    assert device.name == "zwave-main"
    assert device_registry.async_get(device.via_device_id).name == "pve2"


async def test_pve_unreachable_keeps_devices(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    """While the companion cannot reach Proxmox VE, nothing is removed; entities go unavailable."""
    entities_before = len(
        er.async_entries_for_config_entry(entity_registry, "01JCTRLABLE0000000000000001")
    )
    mock_client.overview.return_value = _overview(
        nodes=[], guests=[], problems=[{"code": "pve_unreachable", "message": "timeout"}]
    )
    await _refresh(hass, init_integration)
    assert _device(device_registry, "site-1_guest_101") is not None
    assert _device(device_registry, "site-1_node_pve") is not None
    assert hass.states.get("sensor.zwavejs_1_status").state == STATE_UNAVAILABLE
    assert hass.states.get("sensor.pve_storage_local_usage").state == STATE_UNAVAILABLE

    mock_client.overview.return_value = _overview()
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.zwavejs_1_status").state == "running"
    assert hass.states.get("sensor.pve_storage_local_usage").state == "20.0"
    entities_after = len(
        er.async_entries_for_config_entry(entity_registry, init_integration.entry_id)
    )
    assert entities_after == entities_before


async def test_storage_and_instance_removed(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    """A storage that vanished and a removed instance lose their entities; an empty project its
    device."""
    data = load_json("overview.json")
    data["nodes"][0]["storages"] = data["nodes"][0]["storages"][:1]
    data["instances"][1]["state"] = "removed"
    mock_client.overview.return_value = Overview.from_dict(data)
    await _refresh(hass, init_integration)
    assert hass.states.get("sensor.pve_storage_local_usage") is None
    assert entity_registry.async_get("sensor.pve_storage_local_usage") is None
    assert hass.states.get("sensor.smith_house_zigbee2mqtt_1_state") is None
    assert hass.states.get("sensor.smith_house_zwavejs_1_state").state == "active"

    data["instances"] = []
    mock_client.overview.return_value = Overview.from_dict(data)
    await _refresh(hass, init_integration)
    assert _device(device_registry, "site-1_project_smith-house") is None
    assert hass.states.get("sensor.smith_house_zwavejs_1_state") is None


async def test_stale_devices_removed_at_setup(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
) -> None:
    """A device left from an earlier run whose guest is gone is removed when the entry loads."""
    mock_config_entry.add_to_hass(hass)
    device_registry.async_get_or_create(
        config_entry_id=mock_config_entry.entry_id,
        identifiers={(DOMAIN, "site-1_guest_555")},
        name="old",
    )
    await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert _device(device_registry, "site-1_guest_555") is None


async def test_remove_config_entry_device(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """The user may delete a device only when the companion no longer reports it."""
    live = _device(device_registry, "site-1_guest_101")
    assert live is not None
    assert not await async_remove_config_entry_device(hass, init_integration, live)
    stale = device_registry.async_get_or_create(
        config_entry_id=init_integration.entry_id,
        identifiers={(DOMAIN, "site-1_guest_777")},
    )
    assert await async_remove_config_entry_device(hass, init_integration, stale)

    await hass.config_entries.async_unload(init_integration.entry_id)
    assert await async_remove_config_entry_device(hass, init_integration, live)


async def test_events_update_entities(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    event_feed: EventFeed,
) -> None:
    """Instance and platform events show at once; state changes ask for a refresh."""
    polls = mock_client.overview.await_count
    pending = load_json("instance_pending.json")
    data = load_json("overview.json")
    data["instances"].append(pending)
    mock_client.overview.return_value = Overview.from_dict(data)
    await event_feed.push(CtrlableEvent(id=43, event="instance.state", data=pending))
    await hass.async_block_till_done()
    assert hass.states.get("sensor.jones_flat_zwavejs_2_state").state == "pending"
    assert mock_client.overview.await_count == polls + 1

    cloning = pending | {"state": "cloning", "updated_at": "2026-06-01T12:00:05Z"}
    await event_feed.push(CtrlableEvent(id=44, event="instance.state", data=cloning))
    # A replayed older state does not win.
    await event_feed.push(CtrlableEvent(id=45, event="instance.state", data=pending))
    await hass.async_block_till_done()
    # The next refresh is debounced, so the pushed state stands.
    state = init_integration.runtime_data.coordinator.data.instance(5)
    assert state is not None
    assert state.state == "cloning"

    platform = {
        "last_success": "2026-06-01T12:30:00Z",
        "outbox_depth": 0,
        "unreachable_since": None,
    }
    await event_feed.push(CtrlableEvent(id=46, event="platform.report", data=platform))
    await hass.async_block_till_done()
    assert hass.states.get("sensor.ctrlable_companion_platform_outbox").state == "0"
    assert init_integration.runtime_data.event_stream.last_event_id == 46


async def test_events_ignored_or_malformed(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    event_feed: EventFeed,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unknown events are ignored, malformed ones logged; the stream goes on."""
    coordinator = init_integration.runtime_data.coordinator
    before = coordinator.data
    await event_feed.push(
        CtrlableEvent(id=43, event="something.new", data={}),
        CtrlableEvent(id=44, event="instance.state", data="not an object"),
        CtrlableEvent(id=45, event="build.progress", data={"id": "x"}),
    )
    assert coordinator.data is before
    assert "Ignoring malformed instance.state event" in caplog.text
    assert "Ignoring malformed build.progress event" in caplog.text
    assert init_integration.runtime_data.event_stream.last_event_id == 45

    await event_feed.push(CtrlableEvent(id=46, event="release.active", data={"release": "x"}))
    await hass.async_block_till_done()
    assert mock_client.overview.await_count >= 2


@pytest.mark.usefixtures("no_backoff")
async def test_event_stream_reconnects(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    event_feed: EventFeed,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream resumes after the last event seen; a loss is logged once, the return too."""
    await event_feed.push(CtrlableEvent(id=50, event="something", data={}))
    await event_feed.push(None)  # the companion closed the stream
    await event_feed.push(CtrlableConnectionError("reset"))
    await event_feed.push(CtrlableConnectionError("refused"))
    await event_feed.push(CtrlableAuthenticationError("no"))
    assert caplog.text.count("Lost the companion event stream") == 1
    await event_feed.push(CtrlableEvent(id=51, event="something", data={}))
    assert "Companion event stream restored" in caplog.text
    assert mock_client.events.call_args_list == [
        call(since=42),
        call(since=50),
        call(since=50),
        call(since=50),
        call(since=50),
    ]
    stream = init_integration.runtime_data.event_stream
    assert stream.reconnects == 4
    assert stream.last_event_id == 51
