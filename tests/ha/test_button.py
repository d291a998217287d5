"""The button platform."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
from homeassistant.components.button import DOMAIN as BUTTON_DOMAIN
from homeassistant.components.button import SERVICE_PRESS
from homeassistant.const import ATTR_ENTITY_ID, Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry, snapshot_platform
from syrupy.assertion import SnapshotAssertion

from custom_components.ctrlable.api import (
    CtrlableApiError,
    CtrlableAuthenticationError,
    CtrlableConnectionError,
    CtrlableResponseError,
)
from custom_components.ctrlable.const import DOMAIN


@pytest.fixture
def platforms() -> list[str]:
    """Only the button platform."""
    return [Platform.BUTTON]


@pytest.mark.freeze_time("2026-06-01 12:00:00+00:00")
@pytest.mark.usefixtures("entity_registry_enabled_by_default")
async def test_entities(
    hass: HomeAssistant,
    entity_registry: er.EntityRegistry,
    snapshot: SnapshotAssertion,
    init_integration: MockConfigEntry,
) -> None:
    """Every button entity: registry entry and state."""
    await snapshot_platform(hass, entity_registry, snapshot, init_integration.entry_id)


@pytest.mark.parametrize(
    ("entity_id", "vmid", "action"),
    [
        ("button.zwavejs_1_start", 101, "start"),
        ("button.zwavejs_1_stop", 101, "stop"),
        ("button.zigbee2mqtt_1_shut_down", 102, "shutdown"),
        ("button.ctrlable_pro_reboot", 200, "reboot"),
    ],
)
async def test_press(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    entity_id: str,
    vmid: int,
    action: str,
) -> None:
    """A press runs the power action on the guest, then refreshes the data."""
    polls = mock_client.overview.await_count
    await hass.services.async_call(
        BUTTON_DOMAIN, SERVICE_PRESS, {ATTR_ENTITY_ID: entity_id}, blocking=True
    )
    mock_client.guest_action.assert_awaited_once_with(vmid, action)
    assert mock_client.overview.await_count == polls + 1


@pytest.mark.parametrize(
    ("error", "exception", "key"),
    [
        (CtrlableConnectionError("refused"), HomeAssistantError, "cannot_connect"),
        (CtrlableApiError(409, "busy", "a task runs"), HomeAssistantError, "api_error"),
        (CtrlableApiError(400, "invalid_request", "no"), ServiceValidationError, "invalid_request"),
        (CtrlableResponseError("odd"), HomeAssistantError, "unexpected_response"),
        (CtrlableAuthenticationError("no"), HomeAssistantError, "invalid_auth"),
    ],
)
async def test_press_errors(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    error: Exception,
    exception: type[HomeAssistantError],
    key: str,
) -> None:
    """Companion errors become translated Home Assistant errors; a refused token starts reauth."""
    mock_client.guest_action.side_effect = error
    with pytest.raises(exception) as info:
        await hass.services.async_call(
            BUTTON_DOMAIN,
            SERVICE_PRESS,
            {ATTR_ENTITY_ID: "button.zwavejs_1_reboot"},
            blocking=True,
        )
    assert info.value.translation_domain == DOMAIN
    assert info.value.translation_key == key
    await hass.async_block_till_done()
    flows = hass.config_entries.flow.async_progress()
    assert [flow["context"]["source"] for flow in flows] == (
        ["reauth"] if key == "invalid_auth" else []
    )
