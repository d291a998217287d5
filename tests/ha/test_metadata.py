"""The integration's static files agree with its code (what hassfest and HACS would check)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from custom_components.ctrlable import binary_sensor, button, sensor, update
from custom_components.ctrlable.const import GUEST_ACTIONS, INSTANCE_STATES
from custom_components.ctrlable.services import SERVICES

ROOT = Path(__file__).parents[2]
INTEGRATION = ROOT / "custom_components" / "ctrlable"
EN = json.loads((INTEGRATION / "translations" / "en.json").read_text(encoding="utf-8"))
ICONS = json.loads((INTEGRATION / "icons.json").read_text(encoding="utf-8"))

RULES = {
    # bronze
    "action-setup", "appropriate-polling", "brands", "common-modules",
    "config-flow-test-coverage", "config-flow", "dependency-transparency", "docs-actions",
    "docs-high-level-description", "docs-installation-instructions",
    "docs-removal-instructions", "entity-event-setup", "entity-unique-id", "has-entity-name",
    "runtime-data", "test-before-configure", "test-before-setup", "unique-config-entry",
    # silver
    "action-exceptions", "config-entry-unloading", "docs-configuration-parameters",
    "docs-installation-parameters", "entity-unavailable", "integration-owner",
    "log-when-unavailable", "parallel-updates", "reauthentication-flow", "test-coverage",
    # gold
    "devices", "diagnostics", "discovery-update-info", "discovery", "docs-data-update",
    "docs-examples", "docs-known-limitations", "docs-supported-devices",
    "docs-supported-functions", "docs-troubleshooting", "docs-use-cases", "dynamic-devices",
    "entity-category", "entity-device-class", "entity-disabled-by-default",
    "entity-translations", "exception-translations", "icon-translations",
    "reconfiguration-flow", "repair-issues", "stale-devices",
    # platinum
    "async-dependency", "inject-websession", "strict-typing",
}  # fmt: skip


def _code() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in INTEGRATION.glob("*.py"))


def test_manifest() -> None:
    """The keys HACS and Home Assistant require for a custom integration."""
    manifest = json.loads((INTEGRATION / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["domain"] == "ctrlable"
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])
    assert manifest["config_flow"] is True
    assert manifest["iot_class"] == "local_polling"
    assert manifest["integration_type"] == "hub"
    assert manifest["requirements"] == []
    assert manifest["zeroconf"] == ["_ctrlable._tcp.local."]
    for key in ("name", "documentation", "issue_tracker", "codeowners"):
        assert manifest[key]


def test_hacs_json() -> None:
    """Only keys HACS accepts; the minimum Home Assistant version we test against."""
    hacs = json.loads((ROOT / "hacs.json").read_text(encoding="utf-8"))
    allowed = {
        "name", "content_in_root", "zip_release", "filename", "render_readme",
        "hide_default_branch", "country", "homeassistant", "hacs", "persistent_directory",
    }  # fmt: skip
    assert set(hacs) <= allowed
    assert hacs["homeassistant"] == "2025.4.0"


def test_quality_scale() -> None:
    """Every rule is done or exempt, exemptions with a reason."""
    rules = yaml.safe_load((INTEGRATION / "quality_scale.yaml").read_text(encoding="utf-8"))
    rules = rules["rules"]
    assert set(rules) == RULES
    for name, rule in rules.items():
        status = rule if isinstance(rule, str) else rule["status"]
        assert status in ("done", "exempt"), name
        if status == "exempt":
            assert rule["comment"], name


def test_entity_translations_and_icons() -> None:
    """Every entity translation key has a name and an icon."""
    descriptions: dict[str, list[Any]] = {
        "sensor": [
            *sensor.COMPANION_SENSORS,
            *sensor.NODE_SENSORS,
            *sensor.GUEST_SENSORS,
            *sensor.INSTANCE_SENSORS,
            sensor.STORAGE_SENSOR,
        ],
        "binary_sensor": [
            *binary_sensor.COMPANION_BINARY_SENSORS,
            *binary_sensor.NODE_BINARY_SENSORS,
        ],
        "button": list(button.GUEST_BUTTONS),
        "update": [update.RELEASE_UPDATE],
    }
    for platform, items in descriptions.items():
        keys = {item.translation_key for item in items}
        assert keys == set(EN["entity"][platform]), platform
        assert keys == set(ICONS["entity"][platform]), platform
    assert set(EN["entity"]["sensor"]["instance_state"]["state"]) == set(INSTANCE_STATES)
    assert {item.key for item in button.GUEST_BUTTONS} == set(GUEST_ACTIONS)


def test_exception_and_issue_translations() -> None:
    """Every translation key raised or used for an issue exists in en.json."""
    code = _code()
    exception_keys = set(
        re.findall(r'translation_domain=DOMAIN,\s*translation_key="([a-z_]+)"', code)
    )
    exception_keys |= set(re.findall(r'_invalid\(\s*"([a-z_]+)"', code))
    assert exception_keys == set(EN["exceptions"])
    issue_keys = set(re.findall(r'^\s+"([a-z_]+)",\n\s+ir\.IssueSeverity', code, re.MULTILINE))
    assert issue_keys == set(EN["issues"])


def test_services_yaml() -> None:
    """services.yaml, the translations and the icons describe the same actions and fields."""
    services = yaml.safe_load((INTEGRATION / "services.yaml").read_text(encoding="utf-8"))
    names = {name for name, _, _ in SERVICES}
    assert set(services) == names
    assert set(EN["services"]) == names
    assert set(ICONS["services"]) == names
    for name, spec in services.items():
        assert set(spec["fields"]) == set(EN["services"][name]["fields"]), name


def test_brand_images() -> None:
    """Icons are square 256/512 px, logos 128/256 px high."""
    sizes = {"icon.png": (256, 256), "icon@2x.png": (512, 512)}
    for prefix in ("", "dark_"):
        for name, size in sizes.items():
            with Image.open(INTEGRATION / "brand" / f"{prefix}{name}") as image:
                assert image.size == size
        for name, height in (("logo.png", 128), ("logo@2x.png", 256)):
            with Image.open(INTEGRATION / "brand" / f"{prefix}{name}") as image:
                assert image.size[1] == height
