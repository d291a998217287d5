"""Config flow, options flow and the "instance" (deploy) subentry flow."""

from __future__ import annotations

from ipaddress import ip_address
from unittest.mock import AsyncMock, MagicMock

import pytest
from ha_common import TOKEN, URL, load_json, load_overview
from homeassistant.config_entries import SOURCE_USER, SOURCE_ZEROCONF, ConfigEntryState
from homeassistant.const import CONF_API_TOKEN, CONF_URL
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.ctrlable.api import (
    CtrlableApiError,
    CtrlableAuthenticationError,
    CtrlableConnectionError,
    CtrlableResponseError,
    Overview,
)
from custom_components.ctrlable.config_flow import InvalidUrl, normalize_url
from custom_components.ctrlable.const import (
    CONF_EXCLUDED_GUESTS,
    CONF_EXPOSED_GUESTS,
    CONF_SCAN_INTERVAL,
    DOMAIN,
    SUBENTRY_TYPE_INSTANCE,
)

FLOW_ERRORS = [
    (CtrlableConnectionError("down"), "cannot_connect"),
    (CtrlableAuthenticationError("no"), "invalid_auth"),
    (CtrlableResponseError("odd"), "invalid_response"),
    (RuntimeError("boom"), "unknown"),
]


def _zeroconf(
    address: str = "127.0.0.1", site_id: str | None = "site-1", scheme: str | None = None
) -> ZeroconfServiceInfo:
    properties = {"version": "0.1.0", "path": "/api/v1"}
    if site_id is not None:
        properties["site_id"] = site_id
    if scheme is not None:
        properties["scheme"] = scheme
    return ZeroconfServiceInfo(
        ip_address=ip_address(address),
        ip_addresses=[ip_address(address)],
        port=8580,
        hostname="ctrlable-site-1.local.",
        type="_ctrlable._tcp.local.",
        name="Ctrlable site-1._ctrlable._tcp.local.",
        properties=properties,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("192.168.1.20", "http://192.168.1.20:8580"),
        ("http://companion.lan:8000/", "http://companion.lan:8000"),
        (" https://companion.lan ", "https://companion.lan:8580"),
        ("http://companion.lan:8580/base/", "http://companion.lan:8580/base"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    """Bare hosts get http and port 8580; trailing slashes go."""
    assert normalize_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://companion.lan", "http://", "http://[::1"])
def test_normalize_url_invalid(url: str) -> None:
    """Only http(s) URLs with a host are accepted."""
    with pytest.raises(InvalidUrl):
        normalize_url(url)


async def test_user_flow(
    hass: HomeAssistant, mock_client: MagicMock, mock_setup_entry: AsyncMock
) -> None:
    """URL and token are tested, the site id becomes the unique id."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "127.0.0.1", CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Ctrlable companion"
    assert result["data"] == {CONF_URL: URL, CONF_API_TOKEN: TOKEN}
    assert result["result"].unique_id == "site-1"
    assert len(mock_setup_entry.mock_calls) == 1
    mock_client.overview.assert_awaited_once()


@pytest.mark.parametrize(("error", "key"), FLOW_ERRORS)
async def test_user_flow_errors_then_recovery(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    error: Exception,
    key: str,
) -> None:
    """Each connection error shows on the form; fixing it finishes the flow."""
    mock_client.overview.side_effect = error
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: URL, CONF_API_TOKEN: "wrong"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": key}

    mock_client.overview.side_effect = None
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: URL, CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_flow_invalid_url(
    hass: HomeAssistant, mock_client: MagicMock, mock_setup_entry: AsyncMock
) -> None:
    """A URL that is not http(s) is refused before any request."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "ftp://companion", CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_URL: "invalid_url"}
    mock_client.overview.assert_not_awaited()

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: URL, CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_flow_already_configured(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    mock_config_entry: MockConfigEntry,
) -> None:
    """The same companion (site id) cannot be added twice, even under another address."""
    mock_config_entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "http://10.0.0.5:8580", CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert mock_config_entry.data[CONF_URL] == URL


async def test_zeroconf_flow(
    hass: HomeAssistant, mock_client: MagicMock, mock_setup_entry: AsyncMock
) -> None:
    """A discovered companion asks for its token, then is added."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_zeroconf()
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"] == {"name": "site-1", "url": URL}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == {CONF_URL: URL, CONF_API_TOKEN: TOKEN}
    assert result["result"].unique_id == "site-1"


@pytest.mark.parametrize(("error", "key"), FLOW_ERRORS)
async def test_zeroconf_flow_errors_then_recovery(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    error: Exception,
    key: str,
) -> None:
    """A wrong token (or an unreachable companion) shows on the confirm form."""
    mock_client.overview.side_effect = error
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_zeroconf()
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: "wrong"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": key}

    mock_client.overview.side_effect = None
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_zeroconf_ipv6_https(
    hass: HomeAssistant, mock_client: MagicMock, mock_setup_entry: AsyncMock
) -> None:
    """IPv6 addresses are bracketed; the TXT scheme is honoured."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf("fd00::5", scheme="https"),
    )
    assert result["description_placeholders"]["url"] == "https://[fd00::5]:8580"


async def test_zeroconf_updates_known_companion(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    mock_config_entry: MockConfigEntry,
) -> None:
    """A known companion at a new address: the entry follows it."""
    mock_config_entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_zeroconf("127.0.0.2")
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert mock_config_entry.data[CONF_URL] == "http://127.0.0.2:8580"
    assert mock_config_entry.data[CONF_API_TOKEN] == TOKEN


async def test_zeroconf_without_site_id(hass: HomeAssistant, mock_client: MagicMock) -> None:
    """An announcement without a site id cannot be matched to an entry."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_zeroconf(site_id=None)
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "invalid_discovery_info"


async def test_zeroconf_wrong_companion(
    hass: HomeAssistant, mock_client: MagicMock, overview: Overview
) -> None:
    """The address answers with another site id than it announced."""
    mock_client.overview.return_value = load_overview(
        companion={"version": "0.1.0", "site_id": "site-2", "name": "Other"}
    )
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_zeroconf()
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: TOKEN}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_companion"


async def test_reauth_flow(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    mock_config_entry: MockConfigEntry,
) -> None:
    """A refused token is replaced; errors show and can be fixed."""
    mock_config_entry.add_to_hass(hass)
    result = await mock_config_entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    assert result["description_placeholders"] == {"name": "Ctrlable companion", "url": URL}

    mock_client.overview.side_effect = CtrlableAuthenticationError("no")
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: "still-wrong"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}

    mock_client.overview.side_effect = None
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: "new-token"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert mock_config_entry.data == {CONF_URL: URL, CONF_API_TOKEN: "new-token"}


async def test_reauth_wrong_companion(
    hass: HomeAssistant, mock_client: MagicMock, mock_config_entry: MockConfigEntry
) -> None:
    """A token that works, but for another site, is refused."""
    mock_config_entry.add_to_hass(hass)
    mock_client.overview.return_value = load_overview(
        companion={"version": "0.1.0", "site_id": "site-2", "name": "Other"}
    )
    result = await mock_config_entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_API_TOKEN: "other-token"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_companion"
    assert mock_config_entry.data[CONF_API_TOKEN] == TOKEN


async def test_reconfigure_flow(
    hass: HomeAssistant,
    mock_client: MagicMock,
    mock_setup_entry: AsyncMock,
    mock_config_entry: MockConfigEntry,
) -> None:
    """A new address keeps the token unless a new one is given; bad input shows errors."""
    mock_config_entry.add_to_hass(hass)
    result = await mock_config_entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "gopher://x"}
    )
    assert result["errors"] == {CONF_URL: "invalid_url"}

    mock_client.overview.side_effect = CtrlableConnectionError("down")
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "10.0.0.9"}
    )
    assert result["errors"] == {"base": "cannot_connect"}

    mock_client.overview.side_effect = None
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "10.0.0.9"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data == {CONF_URL: "http://10.0.0.9:8580", CONF_API_TOKEN: TOKEN}

    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "10.0.0.10:8000", CONF_API_TOKEN: "rotated"}
    )
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data == {
        CONF_URL: "http://10.0.0.10:8000",
        CONF_API_TOKEN: "rotated",
    }


async def test_reconfigure_wrong_companion(
    hass: HomeAssistant, mock_client: MagicMock, mock_config_entry: MockConfigEntry
) -> None:
    """Pointing the entry at another companion is refused."""
    mock_config_entry.add_to_hass(hass)
    mock_client.overview.return_value = load_overview(
        companion={"version": "0.1.0", "site_id": "site-2", "name": "Other"}
    )
    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: "10.0.0.9"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_companion"
    assert mock_config_entry.data[CONF_URL] == URL


async def test_options_flow(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """Unticked guests are excluded (new ones stay shown); the entry reloads."""
    entry = init_integration
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.FORM
    schema = result["data_schema"].schema
    assert {str(key) for key in schema} == {CONF_SCAN_INTERVAL, CONF_EXPOSED_GUESTS}

    calls = mock_client.overview.await_count
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_SCAN_INTERVAL: 60, CONF_EXPOSED_GUESTS: ["101", "200"]}
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {CONF_SCAN_INTERVAL: 60, CONF_EXCLUDED_GUESTS: ["102"]}
    assert mock_client.overview.await_count == calls + 1  # reloaded
    assert entry.state is ConfigEntryState.LOADED
    assert hass.states.get("sensor.zigbee2mqtt_1_status") is None
    assert hass.states.get("sensor.zwavejs_1_status") is not None

    # A guest excluded earlier but absent now keeps its choice.
    hass.config_entries.async_update_entry(
        entry, options={CONF_SCAN_INTERVAL: 60, CONF_EXCLUDED_GUESTS: ["102", "555"]}
    )
    await hass.async_block_till_done()
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_SCAN_INTERVAL: 60, CONF_EXPOSED_GUESTS: ["101", "102", "200"]}
    )
    assert entry.options[CONF_EXCLUDED_GUESTS] == ["555"]
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED


async def test_options_flow_not_loaded(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry
) -> None:
    """Without a connection only the scan interval can be changed."""
    mock_config_entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(
        mock_config_entry, options={CONF_EXCLUDED_GUESTS: ["102"]}
    )
    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    assert [str(key) for key in result["data_schema"].schema] == [CONF_SCAN_INTERVAL]
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_SCAN_INTERVAL: 120}
    )
    assert mock_config_entry.options == {
        CONF_SCAN_INTERVAL: 120,
        CONF_EXCLUDED_GUESTS: ["102"],
    }


async def _start_subentry(hass: HomeAssistant, entry: MockConfigEntry) -> dict:
    return await hass.config_entries.subentries.async_init(
        (entry.entry_id, SUBENTRY_TYPE_INSTANCE), context={"source": SOURCE_USER}
    )


async def test_subentry_deploy(
    hass: HomeAssistant, init_integration: MockConfigEntry, mock_client: MagicMock
) -> None:
    """The deploy wizard deploys, records the instance and says what happened."""
    entry = init_integration
    result = await _start_subentry(hass, entry)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["description_placeholders"] == {"release": "2026.05", "message": ""}
    type_selector = result["data_schema"].schema["type"]
    assert [option["value"] for option in type_selector.config["options"]] == [
        "zwavejs",
        "zigbee2mqtt",
        "ctrlable-pro",
    ]
    assert result["data_schema"].schema["project"].config["options"] == ["smith-house"]

    calls = mock_client.overview.await_count
    data = load_json("overview.json")
    data["instances"].append(load_json("instance_pending.json"))
    mock_client.overview.return_value = Overview.from_dict(data)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        {"project": " jones-flat ", "type": "zwavejs", "hostname": "ZWaveJS-2"},
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "zwavejs-2"
    assert result["description"] == "deployed"
    assert result["description_placeholders"] == {
        "hostname": "zwavejs-2",
        "project": "jones-flat",
        "id": "5",
        "state": "pending",
    }
    mock_client.create_instance.assert_awaited_once_with(
        project="jones-flat", instance_type="zwavejs", hostname="zwavejs-2"
    )
    subentry = next(iter(entry.subentries.values()))
    assert subentry.subentry_type == SUBENTRY_TYPE_INSTANCE
    assert subentry.unique_id == "instance_5"
    assert dict(subentry.data) == {
        "project": "jones-flat",
        "type": "zwavejs",
        "hostname": "zwavejs-2",
        "instance_id": 5,
    }
    # The new instance shows at once; adding a subentry does not reload the entry.
    assert hass.states.get("sensor.jones_flat_zwavejs_2_state").state == "pending"
    assert entry.state is ConfigEntryState.LOADED
    assert mock_client.overview.await_count == calls + 1  # one refresh, no reload


@pytest.mark.parametrize(
    ("user_input", "errors"),
    [
        (
            {"project": "p", "type": "zwavejs", "hostname": "-bad-"},
            {"hostname": "invalid_hostname"},
        ),
        (
            {"project": "p", "type": "zwavejs", "hostname": "zwavejs-1"},
            {"hostname": "hostname_in_use"},
        ),
        (
            {"project": "  ", "type": "zwavejs", "hostname": "zwavejs-9"},
            {"project": "invalid_project"},
        ),
    ],
)
async def test_subentry_validation_then_recovery(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    user_input: dict[str, str],
    errors: dict[str, str],
) -> None:
    """Bad input is refused on the form, before anything is deployed."""
    result = await _start_subentry(hass, init_integration)
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], user_input)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == errors
    mock_client.create_instance.assert_not_awaited()

    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {"project": "p", "type": "zwavejs", "hostname": "zwavejs-2"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY


@pytest.mark.parametrize(
    ("error", "key", "message"),
    [
        (CtrlableConnectionError("down"), "cannot_connect", ""),
        (CtrlableAuthenticationError("no"), "invalid_auth", ""),
        (
            CtrlableApiError(400, "invalid_request", "project name too long"),
            "deploy_rejected",
            "project name too long",
        ),
        (CtrlableResponseError("odd"), "deploy_failed", "odd"),
    ],
)
async def test_subentry_companion_errors(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    error: Exception,
    key: str,
    message: str,
) -> None:
    """Companion failures show on the form with its message; a retry can succeed."""
    mock_client.create_instance.side_effect = error
    result = await _start_subentry(hass, init_integration)
    user_input = {"project": "p", "type": "zwavejs", "hostname": "zwavejs-2"}
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], user_input)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": key}
    assert result["description_placeholders"]["message"] == message
    await hass.async_block_till_done()
    reauth = [
        flow
        for flow in hass.config_entries.flow.async_progress()
        if flow["context"]["source"] == "reauth"
    ]
    assert bool(reauth) is (key == "invalid_auth")

    mock_client.create_instance.side_effect = None
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], user_input)
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_subentry_needs_loaded_entry(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry
) -> None:
    """Nothing can be deployed while the companion is not connected."""
    mock_config_entry.add_to_hass(hass)
    result = await _start_subentry(hass, mock_config_entry)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "entry_not_loaded"


@pytest.mark.parametrize(
    "overview", [load_overview(releases={"active": None, "latest": None, "releases": []})]
)
async def test_subentry_needs_active_release(
    hass: HomeAssistant, init_integration: MockConfigEntry
) -> None:
    """Without an active release there is nothing to deploy."""
    result = await _start_subentry(hass, init_integration)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "no_active_release"
