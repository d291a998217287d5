"""Shared helpers of the Home Assistant tests (fixtures loading, constants)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from custom_components.ctrlable.api import Overview

FIXTURES = Path(__file__).parent / "fixtures"
URL = "http://127.0.0.1:8580"
TOKEN = "secret-token"
ENTRY_ID = "01JCTRLABLE0000000000000001"


def load_json(name: str) -> Any:
    """A JSON fixture."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def load_overview(**changes: Any) -> Overview:
    """The overview fixture, with top-level keys replaced by `changes`."""
    data = load_json("overview.json")
    data.update(changes)
    return Overview.from_dict(data)
