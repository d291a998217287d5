"""The actions: deploy_instance, deploy_stack, build_release, guest_action."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest.mock import MagicMock

import pytest
from ha_common import EventFeed, load_json
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import device_registry as dr
from pytest_homeassistant_custom_component.common import MockConfigEntry
from syrupy.assertion import SnapshotAssertion

from custom_components.ctrlable.api import (
    CtrlableApiError,
    CtrlableConnectionError,
    CtrlableEvent,
    Overview,
)
from custom_components.ctrlable.const import DOMAIN


async def _call(hass: HomeAssistant, service: str, data: dict[str, Any]) -> Any:
    return await hass.services.async_call(
        DOMAIN, service, data, blocking=True, return_response=True
    )


async def test_deploy_instance(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    snapshot: SnapshotAssertion,
) -> None:
    """Deploys through the companion and answers with the new instance."""
    response = await _call(
        hass,
        "deploy_instance",
        {"project": "jones-flat", "type": "zwavejs", "hostname": "zwavejs-2"},
    )
    assert response == snapshot
    mock_client.create_instance.assert_awaited_once_with(
        project="jones-flat", instance_type="zwavejs", hostname="zwavejs-2", overrides={}
    )


async def test_deploy_instance_wait(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    event_feed: EventFeed,
) -> None:
    """With wait, the answer comes once the instance is active (pushed by the event stream)."""
    call = asyncio.create_task(
        _call(
            hass,
            "deploy_instance",
            {
                "config_entry_id": init_integration.entry_id,
                "project": "jones-flat",
                "type": "zwavejs",
                "hostname": "zwavejs-2",
                "overrides": {"zwave_port": "tcp://10.0.0.9:3333"},
                "wait": True,
            },
        )
    )
    for _ in range(100):  # until the action waits for the instance (bounded)
        await asyncio.sleep(0)
        if mock_client.create_instance.await_count and mock_client.overview.await_count > 1:
            break
    await asyncio.sleep(0)
    assert not call.done()
    active = load_json("instance_pending.json") | {
        "state": "active",
        "vmid": 104,
        "updated_at": "2026-06-01T12:03:00Z",
    }
    await event_feed.push(CtrlableEvent(id=60, event="instance.state", data=active))
    response = await call
    assert response["instances"][0]["state"] == "active"
    assert response["instances"][0]["vmid"] == 104
    assert mock_client.create_instance.await_args.kwargs["overrides"] == {
        "zwave_port": "tcp://10.0.0.9:3333"
    }


async def test_deploy_instance_wait_timeout(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """A deploy that is not done in time answers with the state it reached."""
    response = await _call(
        hass,
        "deploy_instance",
        {
            "project": "jones-flat",
            "type": "zwavejs",
            "hostname": "zwavejs-2",
            "wait": True,
            "timeout": 1,
        },
    )
    assert response["instances"][0]["state"] == "pending"


async def test_deploy_stack(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    snapshot: SnapshotAssertion,
) -> None:
    """A stack deploy answers with every instance."""
    response = await _call(
        hass,
        "deploy_stack",
        {"project": "jones-flat", "types": ["zwavejs", "zigbee2mqtt"], "hostname_prefix": "jf-"},
    )
    assert response == snapshot
    mock_client.deploy.assert_awaited_once_with(
        project="jones-flat", types=["zwavejs", "zigbee2mqtt"], hostname_prefix="jf-"
    )
    await _call(hass, "deploy_stack", {"project": "other"})
    mock_client.deploy.assert_awaited_with(project="other", types=None, hostname_prefix=None)


async def test_build_release(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """Builds the latest release by default; the answer is the build."""
    response = await _call(hass, "build_release", {})
    assert response == {
        "build": {"id": 2, "release": "2026.06", "state": "queued", "percent": 0, "error": None}
    }
    mock_client.build_release.assert_awaited_once_with("2026.06", None)
    await _call(hass, "build_release", {"release": "2026.05", "templates": ["zwavejs"]})
    mock_client.build_release.assert_awaited_with("2026.05", ["zwavejs"])
    state = hass.states.get("update.ctrlable_companion_release")
    assert state.attributes["in_progress"] is True


async def test_guest_action(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    device_registry: dr.DeviceRegistry,
) -> None:
    """By VM id or by the guest's device."""
    response = await _call(hass, "guest_action", {"vmid": 101, "action": "reboot"})
    assert response == {"vmid": 101, "action": "reboot", "status": "running"}
    mock_client.guest_action.assert_awaited_once_with(101, "reboot")

    device = device_registry.async_get_device({(DOMAIN, "site-1_guest_200")})
    assert device is not None
    await _call(hass, "guest_action", {"device_id": device.id, "action": "stop"})
    mock_client.guest_action.assert_awaited_with(200, "stop")
    await _call(
        hass,
        "guest_action",
        {"device_id": device.id, "action": "start", "config_entry_id": init_integration.entry_id},
    )
    mock_client.guest_action.assert_awaited_with(200, "start")


@pytest.mark.parametrize(
    ("service", "data", "key"),
    [
        ("deploy_instance", {"type": "frigate", "hostname": "f-1"}, "unknown_type"),
        ("deploy_instance", {"type": "zwavejs", "hostname": "Bad_Name"}, "invalid_hostname"),
        ("deploy_instance", {"type": "zwavejs", "hostname": "zwavejs-1"}, "hostname_in_use"),
        ("deploy_stack", {"types": ["zwavejs", "nope"]}, "unknown_type"),
        ("deploy_stack", {"hostname_prefix": "-x"}, "invalid_hostname_prefix"),
        ("build_release", {"release": "1999.01"}, "unknown_release"),
        ("build_release", {"templates": ["nope"]}, "unknown_template"),
        ("guest_action", {"vmid": 999, "action": "start"}, "unknown_guest"),
        ("guest_action", {"vmid": 9001, "action": "start"}, "unknown_guest"),
        ("guest_action", {"device_id": "nope", "action": "start"}, "invalid_device"),
        (
            "guest_action",
            {"device_id": "nope", "action": "start", "config_entry_id": "nope"},
            "entry_not_found",
        ),
    ],
)
async def test_bad_input(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    service: str,
    data: dict[str, Any],
    key: str,
) -> None:
    """Bad input is a translated ServiceValidationError; nothing reaches the companion."""
    if service.startswith("deploy"):
        data = {"project": "p", **data}
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, service, data)
    assert info.value.translation_domain == DOMAIN
    assert info.value.translation_key == key
    mock_client.create_instance.assert_not_awaited()
    mock_client.deploy.assert_not_awaited()
    mock_client.build_release.assert_not_awaited()
    mock_client.guest_action.assert_not_awaited()


async def test_device_of_other_kind(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """A node device is not a guest."""
    node = device_registry.async_get_device({(DOMAIN, "site-1_node_pve")})
    assert node is not None
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "guest_action", {"device_id": node.id, "action": "start"})
    assert info.value.translation_key == "invalid_device"


async def test_device_of_unloaded_entry(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """A guest device whose companion is not loaded."""
    device = device_registry.async_get_device({(DOMAIN, "site-1_guest_101")})
    assert device is not None
    await hass.config_entries.async_unload(init_integration.entry_id)
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "guest_action", {"device_id": device.id, "action": "start"})
    assert info.value.translation_key == "entry_not_loaded"


@pytest.mark.parametrize(
    "overview",
    [
        Overview.from_dict(
            load_json("overview.json")
            | {"releases": {"active": None, "latest": None, "releases": []}}
        )
    ],
)
async def test_nothing_to_deploy_or_build(
    hass: HomeAssistant, init_integration: MockConfigEntry
) -> None:
    """Without an active release nothing can be deployed; without releases nothing built."""
    data = {"project": "p", "type": "zwavejs", "hostname": "z-1"}
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "deploy_instance", data)
    assert info.value.translation_key == "no_active_release"
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "build_release", {})
    assert info.value.translation_key == "no_release"


async def test_entry_selection(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
) -> None:
    """Without config_entry_id exactly one loaded entry is needed; a named one must be loaded."""
    data = {"project": "p", "type": "zwavejs", "hostname": "z-1"}
    other = MockConfigEntry(domain=DOMAIN, title="Other", unique_id="site-2")
    other.add_to_hass(hass)
    other.mock_state(hass, ConfigEntryState.LOADED)
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "deploy_instance", data)
    assert info.value.translation_key == "multiple_entries"

    other.mock_state(hass, ConfigEntryState.SETUP_RETRY)
    await hass.config_entries.async_unload(init_integration.entry_id)
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "deploy_instance", data)
    assert info.value.translation_key == "no_loaded_entries"
    with pytest.raises(ServiceValidationError) as info:
        await _call(hass, "deploy_instance", {**data, "config_entry_id": other.entry_id})
    assert info.value.translation_key == "entry_not_loaded"
    mock_client.create_instance.assert_not_awaited()


@pytest.mark.parametrize(
    ("error", "exception", "key"),
    [
        (CtrlableConnectionError("down"), HomeAssistantError, "cannot_connect"),
        (CtrlableApiError(503, "build_not_configured", "no ssh"), HomeAssistantError, "api_error"),
        (
            CtrlableApiError(
                400, "invalid_request", "bad", [{"field": "project", "message": "too long"}]
            ),
            ServiceValidationError,
            "invalid_request",
        ),
    ],
)
async def test_companion_failures(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    error: Exception,
    exception: type[HomeAssistantError],
    key: str,
) -> None:
    """Companion failures are HomeAssistantErrors; its own input refusals stay validation errors."""
    mock_client.create_instance.side_effect = error
    with pytest.raises(exception) as info:
        await _call(hass, "deploy_instance", {"project": "p", "type": "zwavejs", "hostname": "z-1"})
    assert info.value.translation_key == key
    if key == "invalid_request":
        assert info.value.translation_placeholders == {"message": "bad (project: too long)"}
