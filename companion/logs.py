"""Structured logging (one JSON object per line) with secret redaction."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

REDACTED = "**REDACTED**"


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in a record's rendered message."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 6:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("instance_id", "build_id", "vmid", "upid", "release"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


REDACTOR = RedactingFilter()


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> RedactingFilter:
    for secret in secrets:
        REDACTOR.add(secret)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite's DEBUG lines repr every statement with its parameters (secret values included).
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # proxmoxer logs every request at INFO (every task poll) and every answer at DEBUG; the
    # boundary logs what matters (retries, failures) itself.
    logging.getLogger("proxmoxer").setLevel(logging.WARNING)
    return REDACTOR
