"""Seeding: node ``pve``, storages ``local`` and ``local-lvm``, and a release's templates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from companion.sim.model import ClusterState, Kind


@dataclass(frozen=True)
class TemplateSpec:
    """One template to create: ``kind`` is ``qemu``/``lxc`` (``vm`` is accepted for qemu)."""

    name: str
    kind: str
    vmid: int
    node: str = "pve"
    release: str | None = None  # when set, tagged as the build wrapper tags a finished template

    @property
    def pve_kind(self) -> Kind:
        if self.kind in ("qemu", "vm"):
            return "qemu"
        if self.kind == "lxc":
            return "lxc"
        msg = f"template {self.name!r}: kind must be qemu/vm or lxc, got {self.kind!r}"
        raise ValueError(msg)


# The templates of releases/2026.06.yaml (name, kind, vmid_base).
DEFAULT_TEMPLATES: tuple[TemplateSpec, ...] = (
    TemplateSpec("ctrlable-pro", "qemu", 9000),
    TemplateSpec("zwavejs", "lxc", 9010),
    TemplateSpec("zigbee2mqtt", "lxc", 9020),
    TemplateSpec("docker-portainer", "lxc", 9030),
    TemplateSpec("frigate", "lxc", 9040),
    TemplateSpec("freepbx", "lxc", 9050),
)


def templates_from_release(path: Path, node: str = "pve") -> list[TemplateSpec]:
    """Read ``templates: {name: {kind, vmid_base}}`` from a release YAML (no manifest checks)."""
    data: Any = yaml.safe_load(path.read_text("utf-8"))
    templates = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(templates, dict):
        msg = f"{path}: templates: expected a mapping of template name to settings"
        raise ValueError(msg)  # noqa: TRY004 - bad file content, not a caller's type error
    out = []
    for name, spec in templates.items():
        if not isinstance(spec, dict) or "kind" not in spec or "vmid_base" not in spec:
            msg = f"{path}: templates.{name}: needs 'kind' and 'vmid_base'"
            raise ValueError(msg)
        release = str(data["release"]) if data.get("release") is not None else None
        out.append(
            TemplateSpec(str(name), str(spec["kind"]), int(spec["vmid_base"]), node, release)
        )
    return out


def seed_default(state: ClusterState, templates: list[TemplateSpec] | None = None) -> None:
    """Add node(s), ``local`` (dir: iso, vztmpl, backup), ``local-lvm`` (lvmthin: images,
    rootdir) and the templates (stopped, ``template: 1``, ``base-<vmid>-disk-0`` volumes on
    local-lvm)."""
    specs = list(DEFAULT_TEMPLATES if templates is None else templates)
    for node in ["pve", *(s.node for s in specs)]:
        if node not in state.nodes:
            state.add_node(node)
    if "local" not in state.storages:
        state.add_storage(
            "local", type="dir", content=("backup", "iso", "vztmpl"), total=100 * 1024**3,
            used=12 * 1024**3,
        )  # fmt: skip
    if "local-lvm" not in state.storages:
        state.add_storage(
            "local-lvm", type="lvmthin", content=("images", "rootdir"), total=800 * 1024**3,
            used=90 * 1024**3,
        )  # fmt: skip
    for spec in specs:
        # As built: the builders create guests with onboot 1 and ctrlable-build keeps it (so a
        # clone starts with the host without a config write).
        config = {"onboot": "1"}
        if spec.release:
            config["tags"] = f"ctrlable;release-{spec.release};tmpl-{spec.name}"
        state.add_guest(
            spec.pve_kind, spec.vmid, spec.node, spec.name, template=True, config=config
        )
