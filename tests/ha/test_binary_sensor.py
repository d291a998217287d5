"""The binary_sensor platform."""

from __future__ import annotations

import pytest
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry, snapshot_platform
from syrupy.assertion import SnapshotAssertion


@pytest.fixture
def platforms() -> list[str]:
    """Only the binary_sensor platform."""
    return [Platform.BINARY_SENSOR]


@pytest.mark.freeze_time("2026-06-01 12:00:00+00:00")
@pytest.mark.usefixtures("entity_registry_enabled_by_default")
async def test_entities(
    hass: HomeAssistant,
    entity_registry: er.EntityRegistry,
    snapshot: SnapshotAssertion,
    init_integration: MockConfigEntry,
) -> None:
    """Every binary_sensor entity: registry entry and state."""
    await snapshot_platform(hass, entity_registry, snapshot, init_integration.entry_id)
