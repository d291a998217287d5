"""Repair issues from the overview: USB radio binding, missing privilege, other problems,
platform unreachable."""

from __future__ import annotations

from typing import Any
from unittest.mock import MagicMock

import pytest
from ha_common import ENTRY_ID, load_json
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry
from syrupy.assertion import SnapshotAssertion

from custom_components.ctrlable.api import CtrlableConnectionError, Overview
from custom_components.ctrlable.const import DOMAIN

PROBLEMS = [
    {
        "code": "missing_privilege",
        "message": "clone needs VM.Allocate",
        "privilege": "VM.Allocate",
        "path": "/vms",
    },
    {"code": "pve_auth_failed", "message": "401 authentication failure"},
]


def _issues(issue_registry: ir.IssueRegistry) -> dict[str, dict[str, Any]]:
    return {
        issue_id: {
            "translation_key": issue.translation_key,
            "severity": issue.severity,
            "is_fixable": issue.is_fixable,
            "placeholders": issue.translation_placeholders,
        }
        for (domain, issue_id), issue in issue_registry.issues.items()
        if domain == DOMAIN
    }


def _problem_overview() -> Overview:
    data = load_json("overview.json")
    data["problems"] = PROBLEMS
    data["platform"]["unreachable_since"] = "2026-06-01T09:00:00Z"
    # A qemu guest that needs binding, and one still without a guest (no issue yet).
    data["instances"].append(
        data["instances"][0]
        | {"id": 8, "type": "ctrlable-pro", "hostname": "pro-1", "vmid": 200, "needs_binding": True}
    )
    data["instances"].append(
        data["instances"][0] | {"id": 9, "hostname": "zw-9", "vmid": None, "needs_binding": True}
    )
    return Overview.from_dict(data)


@pytest.mark.parametrize("overview", [_problem_overview()])
async def test_issues(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    issue_registry: ir.IssueRegistry,
    snapshot: SnapshotAssertion,
) -> None:
    """Each problem the companion reports is one actionable issue."""
    assert _issues(issue_registry) == snapshot


async def test_issues_follow_the_data(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    mock_client: MagicMock,
    issue_registry: ir.IssueRegistry,
) -> None:
    """Issues appear and disappear with the data; a failed poll changes nothing."""
    assert set(_issues(issue_registry)) == {f"{ENTRY_ID}_needs_binding_4"}
    coordinator = init_integration.runtime_data.coordinator

    mock_client.overview.return_value = _problem_overview()
    await coordinator.async_refresh()
    assert len(_issues(issue_registry)) == 5

    mock_client.overview.side_effect = CtrlableConnectionError("down")
    await coordinator.async_refresh()
    assert len(_issues(issue_registry)) == 5

    mock_client.overview.side_effect = None
    data = load_json("overview.json")
    data["instances"][1]["needs_binding"] = False
    mock_client.overview.return_value = Overview.from_dict(data)
    await coordinator.async_refresh()
    assert _issues(issue_registry) == {}


async def test_issues_removed_with_entry(
    hass: HomeAssistant,
    init_integration: MockConfigEntry,
    issue_registry: ir.IssueRegistry,
) -> None:
    """Removing the entry removes its issues."""
    assert _issues(issue_registry)
    await hass.config_entries.async_remove(init_integration.entry_id)
    await hass.async_block_till_done()
    assert _issues(issue_registry) == {}
