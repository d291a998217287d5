"""The update platform."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
from ha_common import EventFeed, load_json, load_overview
from homeassistant.components.update import (
    ATTR_IN_PROGRESS,
    ATTR_INSTALLED_VERSION,
    ATTR_UPDATE_PERCENTAGE,
    SERVICE_INSTALL,
)
from homeassistant.components.update import DOMAIN as UPDATE_DOMAIN
from homeassistant.const import ATTR_ENTITY_ID, STATE_OFF, STATE_ON, STATE_UNKNOWN, Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry, snapshot_platform
from pytest_homeassistant_custom_component.typing import WebSocketGenerator
from syrupy.assertion import SnapshotAssertion

from custom_components.ctrlable.api import CtrlableApiError, CtrlableEvent, Overview


@pytest.fixture
def platforms() -> list[str]:
    """Only the update platform."""
    return [Platform.UPDATE]


@pytest.mark.freeze_time("2026-06-01 12:00:00+00:00")
@pytest.mark.usefixtures("entity_registry_enabled_by_default")
async def test_entities(
    hass: HomeAssistant,
    entity_registry: er.EntityRegistry,
    snapshot: SnapshotAssertion,
    init_integration: MockConfigEntry,
) -> None:
    """Every update entity: registry entry and state."""
    await snapshot_platform(hass, entity_registry, snapshot, init_integration.entry_id)


def _build_event(event: str, state: str, percent: int) -> CtrlableEvent:
    data = load_json("build_queued.json") | {"state": state, "percent": percent}
    return CtrlableEvent(id=50 + percent, event=event, data=data)


async def test_install_with_progress(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    event_feed: EventFeed,
) -> None:
    """Install builds the latest release; progress follows the companion's build events."""
    entity_id = "update.ctrlable_companion_release"
    assert hass.states.get(entity_id).state == STATE_ON

    await hass.services.async_call(
        UPDATE_DOMAIN, SERVICE_INSTALL, {ATTR_ENTITY_ID: entity_id}, blocking=True
    )
    mock_client.build_release.assert_awaited_once_with("2026.06")
    state = hass.states.get(entity_id)
    assert state.attributes[ATTR_IN_PROGRESS] is True
    assert state.attributes[ATTR_UPDATE_PERCENTAGE] == 0

    # A second install while the build runs is refused by Home Assistant.
    with pytest.raises(HomeAssistantError, match="already in progress"):
        await hass.services.async_call(
            UPDATE_DOMAIN, SERVICE_INSTALL, {ATTR_ENTITY_ID: entity_id}, blocking=True
        )

    await event_feed.push(_build_event("build.progress", "running", 40))
    await hass.async_block_till_done()
    assert hass.states.get(entity_id).attributes[ATTR_UPDATE_PERCENTAGE] == 40

    # A replayed, older progress event does not move the bar back.
    await event_feed.push(_build_event("build.progress", "running", 30))
    await hass.async_block_till_done()
    assert hass.states.get(entity_id).attributes[ATTR_UPDATE_PERCENTAGE] == 40

    done = load_json("overview.json")
    done["releases"]["active"] = "2026.06"
    done["builds"].append(load_json("build_queued.json") | {"state": "succeeded", "percent": 100})
    mock_client.overview.return_value = Overview.from_dict(done)
    await event_feed.push(_build_event("build.state", "succeeded", 100))
    await hass.async_block_till_done()
    state = hass.states.get(entity_id)
    assert state.state == STATE_OFF
    assert state.attributes[ATTR_IN_PROGRESS] is False
    assert state.attributes[ATTR_UPDATE_PERCENTAGE] is None
    assert state.attributes[ATTR_INSTALLED_VERSION] == "2026.06"


async def test_install_refused(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """The companion refusing the build (e.g. one already running) is a translated error."""
    mock_client.build_release.side_effect = CtrlableApiError(409, "build_running", "busy")
    with pytest.raises(HomeAssistantError) as info:
        await hass.services.async_call(
            UPDATE_DOMAIN,
            SERVICE_INSTALL,
            {ATTR_ENTITY_ID: "update.ctrlable_companion_release"},
            blocking=True,
        )
    assert info.value.translation_key == "api_error"
    assert info.value.translation_placeholders == {"code": "build_running", "message": "busy"}
    state = hass.states.get("update.ctrlable_companion_release")
    assert state.attributes[ATTR_IN_PROGRESS] is False


async def test_release_notes(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    hass_ws_client: WebSocketGenerator,
) -> None:
    """The notes of the latest release, with its template versions."""
    client = await hass_ws_client(hass)
    await client.send_json(
        {"id": 1, "type": "update/release_notes", "entity_id": "update.ctrlable_companion_release"}
    )
    result = await client.receive_json()
    assert result["result"] == (
        "## 2026.06\n\n- Z-Wave JS UI 9.x\n- Frigate 0.14\n\n"
        "Templates in 2026.06:\n"
        "- zwavejs (lxc): 9.x\n- zigbee2mqtt (lxc): 1.x\n- frigate (lxc): 0.14.x"
    )


@pytest.mark.parametrize(
    "overview",
    [
        load_overview(
            releases={
                "active": None,
                "latest": "2026.06",
                "releases": [
                    {"release": "2026.06", "state": "available", "notes": "", "templates": []}
                ],
            }
        )
    ],
)
async def test_first_release(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    hass_ws_client: WebSocketGenerator,
) -> None:
    """On a fresh host nothing is installed yet: the latest release is offered."""
    state = hass.states.get("update.ctrlable_companion_release")
    assert state.state == STATE_ON
    assert state.attributes[ATTR_INSTALLED_VERSION] == "none"
    client = await hass_ws_client(hass)
    await client.send_json(
        {"id": 1, "type": "update/release_notes", "entity_id": "update.ctrlable_companion_release"}
    )
    assert (await client.receive_json())["result"] == ""


@pytest.mark.parametrize(
    "overview", [load_overview(releases={"active": None, "latest": None, "releases": []})]
)
async def test_no_release(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    hass_ws_client: WebSocketGenerator,
) -> None:
    """No release known at all: unknown state, no notes."""
    assert hass.states.get("update.ctrlable_companion_release").state == STATE_UNKNOWN
    client = await hass_ws_client(hass)
    await client.send_json(
        {"id": 1, "type": "update/release_notes", "entity_id": "update.ctrlable_companion_release"}
    )
    assert (await client.receive_json())["result"] is None
