"""Fixtures for the Ctrlable integration tests.

The companion is mocked at the integration's own client boundary: `CtrlableClient` is patched
where it is imported (entry setup and config flow), with autospec, and its answers are parsed
from the JSON fixtures in `fixtures/`.
"""

from __future__ import annotations

from collections.abc import Generator
from unittest.mock import AsyncMock, MagicMock, PropertyMock, patch

import pytest
from ha_common import ENTRY_ID, TOKEN, URL, EventFeed, load_json, load_overview
from homeassistant.const import CONF_API_TOKEN, CONF_URL
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.syrupy import HomeAssistantSnapshotExtension
from syrupy.assertion import SnapshotAssertion

# Import the package at module level: otherwise the `hass` fixture's testing config shadows the
# `custom_components` package and Home Assistant cannot find the integration.
from custom_components.ctrlable import coordinator as ctrlable_coordinator
from custom_components.ctrlable.api import (
    Build,
    GuestActionResult,
    Instance,
    Overview,
)
from custom_components.ctrlable.const import DOMAIN


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load custom_components/ctrlable."""


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    """Snapshots with Home Assistant's serializer (stable ids, readable registry entries)."""
    return snapshot.use_extension(HomeAssistantSnapshotExtension)


@pytest.fixture
def entity_registry_enabled_by_default() -> Generator[None]:
    """Create every entity enabled, also those disabled by default."""
    with patch(
        "homeassistant.helpers.entity.Entity.entity_registry_enabled_default",
        return_value=True,
        new_callable=PropertyMock,
    ):
        yield


@pytest.fixture
def mock_config_entry() -> MockConfigEntry:
    """A config entry for the companion of site-1."""
    return MockConfigEntry(
        domain=DOMAIN,
        title="Ctrlable companion",
        unique_id="site-1",
        entry_id=ENTRY_ID,
        data={CONF_URL: URL, CONF_API_TOKEN: TOKEN},
    )


@pytest.fixture
def mock_setup_entry() -> Generator[AsyncMock]:
    """Flow tests do not set the entry up."""
    with patch("custom_components.ctrlable.async_setup_entry", return_value=True) as mock:
        yield mock


@pytest.fixture
def event_feed() -> EventFeed:
    """The companion's event stream, driven by the test."""
    return EventFeed()


@pytest.fixture
def overview() -> Overview:
    """What the mocked companion answers to `overview()`; tests may replace it."""
    return load_overview()


@pytest.fixture
def mock_client(overview: Overview, event_feed: EventFeed) -> Generator[MagicMock]:
    """The companion client, patched where the integration imports it."""
    with (
        patch("custom_components.ctrlable.CtrlableClient", autospec=True) as client_class,
        patch("custom_components.ctrlable.config_flow.CtrlableClient", new=client_class),
    ):
        client = client_class.return_value
        client.url = URL
        client.overview.return_value = overview
        client.events.side_effect = event_feed.stream
        client.create_instance.return_value = Instance.from_dict(load_json("instance_pending.json"))
        client.deploy.return_value = [
            Instance.from_dict(item) for item in load_json("deploy.json")["instances"]
        ]
        client.build_release.return_value = Build.from_dict(load_json("build_queued.json"))
        client.guest_action.return_value = GuestActionResult.from_dict(
            load_json("guest_action.json")
        )
        yield client


@pytest.fixture
def no_backoff() -> Generator[None]:
    """Reconnect the event stream without waiting."""
    with (
        patch.object(ctrlable_coordinator, "EVENT_STREAM_BACKOFF_MIN", 0),
        patch.object(ctrlable_coordinator, "EVENT_STREAM_BACKOFF_MAX", 0),
    ):
        yield


@pytest.fixture
def platforms() -> list[str] | None:
    """Platforms to set up (None: all); platform tests override this."""
    return None


@pytest.fixture
async def init_integration(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    mock_client: MagicMock,
    platforms: list[str] | None,
) -> MockConfigEntry:
    """The integration, set up with the mocked companion."""
    mock_config_entry.add_to_hass(hass)
    if platforms is None:
        await hass.config_entries.async_setup(mock_config_entry.entry_id)
    else:
        with patch("custom_components.ctrlable.PLATFORMS", platforms):
            await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    return mock_config_entry
