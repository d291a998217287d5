"""Diagnostics, with the token and site-identifying data redacted."""

from __future__ import annotations

from ha_common import TOKEN
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator
from syrupy.assertion import SnapshotAssertion
from syrupy.filters import props


async def test_diagnostics(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    init_integration: MockConfigEntry,
    snapshot: SnapshotAssertion,
) -> None:
    """The entry and the last overview, without the token, URL or MAC addresses."""
    result = await get_diagnostics_for_config_entry(hass, hass_client, init_integration)
    assert result == snapshot(exclude=props("created_at", "modified_at"))
    text = str(result)
    assert TOKEN not in text
    assert "BC:24:11" not in text
    assert "127.0.0.1" not in text
