"""Constants for the Ctrlable integration."""

from __future__ import annotations

import logging
from typing import Final

DOMAIN: Final = "ctrlable"
LOGGER = logging.getLogger(__package__)

MANUFACTURER: Final = "Ctrlable"

CONF_SCAN_INTERVAL: Final = "scan_interval"
CONF_EXPOSED_GUESTS: Final = "exposed_guests"
CONF_EXCLUDED_GUESTS: Final = "excluded_guests"

DEFAULT_SCAN_INTERVAL: Final = 30
MIN_SCAN_INTERVAL: Final = 10
MAX_SCAN_INTERVAL: Final = 3600

SUBENTRY_TYPE_INSTANCE: Final = "instance"

# Event stream reconnect backoff, in seconds.
EVENT_STREAM_BACKOFF_MIN: Final = 1.0
EVENT_STREAM_BACKOFF_MAX: Final = 60.0
# A connection that stayed up this long resets the backoff.
EVENT_STREAM_STABLE_AFTER: Final = 60.0

# Deploy actions with `wait: true` give up waiting after this many seconds by default.
DEFAULT_DEPLOY_WAIT_TIMEOUT: Final = 600

GUEST_ACTIONS: Final = ("start", "stop", "shutdown", "reboot")

INSTANCE_STATES: Final = (
    "pending",
    "cloning",
    "starting",
    "awaiting_firstboot",
    "active",
    "rolling_back",
    "failed",
    "removed",
)
INSTANCE_FINAL_STATES: Final = frozenset({"active", "failed", "removed"})
BUILD_RUNNING_STATES: Final = frozenset({"queued", "running"})
GUEST_STATUSES: Final = ("running", "stopped", "paused", "unknown")
