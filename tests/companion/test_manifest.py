"""Release manifests: the shipped one is valid; bad ones fail naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from companion.manifest import ManifestError, ReleaseCatalog, load_manifest, parse_manifest

from .conftest import REPO

SHIPPED = REPO / "releases" / "2026.06.yaml"
TEXT = SHIPPED.read_text()


def test_shipped_manifest_has_the_whole_catalog() -> None:
    manifest = load_manifest(SHIPPED)
    assert set(manifest.templates) == {
        "ctrlable-pro",
        "zwavejs",
        "zigbee2mqtt",
        "docker-portainer",
        "frigate",
        "freepbx",
    }
    assert manifest.templates["ctrlable-pro"].kind == "vm"
    assert {n for n, t in manifest.templates.items() if t.kind == "lxc"} == {
        "zwavejs",
        "zigbee2mqtt",
        "docker-portainer",
        "frigate",
        "freepbx",
    }
    assert manifest.default_stack[0] == "ctrlable-pro"


def test_catalog_knows_available_and_latest() -> None:
    catalog = ReleaseCatalog.load(REPO / "releases")
    assert "2026.06" in catalog.names()
    assert catalog.latest() == catalog.names()[-1]


BAD = [
    # (change to the shipped text, field path named, words in the message)
    (("ram: 2048", "ram: 100"), "templates.zwavejs.resources.ram", "greater than or equal"),
    (("2026-05-29", "main"), "community_scripts_ref", "never a branch"),
    (('"2026-05-29"', "master"), "community_scripts_ref", "never a branch"),
    (("2026-05-29", "v2026.05.3"), "community_scripts_ref", "not pinned"),
    (
        ("builder: ct/zwave-js-ui.sh", "builder: vm/zwave-js-ui.sh"),
        "templates.zwavejs.builder",
        "under ct/",
    ),
    (
        ("builder: vm/haos-vm.sh", "builder: ct/haos-vm.sh"),
        "templates.ctrlable-pro.builder",
        "under vm/",
    ),
    (("vmid_base: 9020", "vmid_base: 9015"), "templates.zigbee2mqtt.vmid_base", "overlap"),
    (
        ("rebrand: true", "rebrand: true\n    colour: red"),
        "templates.ctrlable-pro.colour",
        "unknown key",
    ),
    (
        ("kind: lxc\n    builder: ct/frigate.sh", "kind: container\n    builder: ct/frigate.sh"),
        "templates.frigate",
        "tag",
    ),
    (
        ('app_version: "10.6.1"', 'app_version: "latest"'),
        "templates.zwavejs.app_version",
        "does not parse",
    ),
    (
        ('haos_version: "16.0"', 'haos_version: "stable"'),
        "templates.ctrlable-pro.haos_version",
        "must be exact",
    ),
    (
        ('proxmox_min_version: "8.2"', 'proxmox_min_version: "7.4"'),
        "proxmox_min_version",
        "Proxmox VE 8",
    ),
    (('release: "2026.06"', "release: 2026.06"), "release", "string"),
    (("stack: [ctrlable-pro,", "stack: [nope,"), "stack.0", "not a template"),
    (
        (
            "cpu: 4, ram: 4096, disk: 32 }\n    unprivileged: false",
            "cpu: 4, ram: 4096 }\n    unprivileged: false",
        ),
        "templates.frigate.resources.disk",
        "required",
    ),
    (
        (
            "    unprivileged: true\n    vmid_base: 9010",
            "    unprivileged: yes-please\n    vmid_base: 9010",
        ),
        "templates.zwavejs.unprivileged",
        "boolean",
    ),
    (("portainer: true", "portainer: true\n    portainer: false"), "", "duplicate key"),
    (
        (
            "freepbx:\n    kind: lxc\n    builder: ct/freepbx.sh",
            "freepbx:\n    kind: lxc\n    portainer: true\n    builder: ct/freepbx.sh",
        ),
        "templates.freepbx",
        "only ct/docker.sh",
    ),
    (
        (
            'distro: debian, version: "12" }\n    resources: { cpu: 2, ram: 2048, disk: 8 }\n'
            "    unprivileged: true\n    vmid_base: 9020",
            'distro: windows, version: "12" }\n    resources: { cpu: 2, ram: 2048, disk: 8 }\n'
            "    unprivileged: true\n    vmid_base: 9020",
        ),
        "templates.zigbee2mqtt.os.distro",
        "debian",
    ),
]


@pytest.mark.parametrize(("change", "field", "words"), BAD, ids=[b[1] or b[2] for b in BAD])
def test_bad_manifest_names_the_field(change: tuple[str, str], field: str, words: str) -> None:
    old, new = change
    assert old in TEXT, f"fixture drifted: {old!r}"
    with pytest.raises(ManifestError) as info:
        parse_manifest(TEXT.replace(old, new, 1), "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    if field:
        assert info.value.field == field, message
        assert f": {field}: " in message
    assert words.lower() in message.lower(), message


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ManifestError, match=r"bad.yaml: line \d+"):
        parse_manifest("release: '2026.06'\ntemplates: [\n", "bad.yaml")


def test_file_name_must_match_release(tmp_path: Path) -> None:
    other = tmp_path / "2026.07.yaml"
    other.write_text(TEXT)
    with pytest.raises(ManifestError, match=r"2026.07.yaml: release: '2026.06' does not match"):
        load_manifest(other)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion", "manifest", "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_cli_check_ok_prints_a_summary() -> None:
    result = _cli(str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert "release 2026.06" in result.stdout
    assert "zigbee2mqtt" in result.stdout


def test_cli_check_bad_names_file_and_field_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "2026.06.yaml"
    bad.write_text(TEXT.replace("ram: 2048", "ram: 100", 1))
    result = _cli(str(bad))
    assert result.returncode == 1
    assert f"{bad}: templates.zwavejs.resources.ram:" in result.stderr
    assert "Traceback" not in result.stderr
    missing = _cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr
