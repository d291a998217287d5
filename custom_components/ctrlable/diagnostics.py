"""Diagnostics: the entry (token redacted), the last overview and the event stream state."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.const import CONF_API_TOKEN, CONF_URL
from homeassistant.core import HomeAssistant

from .coordinator import CtrlableConfigEntry

# The token grants full control of the companion; MAC addresses and the URL identify a site.
TO_REDACT = {CONF_API_TOKEN, CONF_URL, "mac", "token", "secret", "password"}


def _plain(value: Any) -> Any:
    """Dataclass output with tuples as lists, so that redaction reaches into them."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: CtrlableConfigEntry
) -> dict[str, Any]:
    """Return diagnostics for a config entry."""
    runtime = entry.runtime_data
    coordinator = runtime.coordinator
    return {
        "entry": async_redact_data(entry.as_dict(), TO_REDACT),
        "last_update_success": coordinator.last_update_success,
        "event_stream": {
            "last_event_id": runtime.event_stream.last_event_id,
            "reconnects": runtime.event_stream.reconnects,
        },
        "overview": async_redact_data(_plain(asdict(coordinator.data)), TO_REDACT),
    }
