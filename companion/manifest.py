"""Release manifests: a strict model of ``releases/<release>.yaml`` and the catalog of them.

A manifest pins everything a build needs: the community-scripts ref (a date tag or a commit SHA,
never a branch), each template's builder, app version, OS and resources, and the VMID block its
templates are built into. Loading reports the first problem as ``file: field.path: what is wrong``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

# Each template owns a block of VMIDs: [vmid_base, vmid_base + VMID_BLOCK).
VMID_BLOCK = 10
TEMPLATE_NAME = r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$"
_DATE_TAG = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_VERSION = re.compile(r"^v?\d+(\.(\d+|x))*$")
_RELEASE = re.compile(r"^\d{4}\.(0[1-9]|1[0-2])(\.\d+)?$")


class ManifestError(ValueError):
    """A manifest that cannot be used; ``str()`` names the file and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")
        self.source = source
        self.field = field
        self.message = message


def _version(value: str, what: str) -> str:
    if not _VERSION.match(value):
        msg = f"{what} {value!r} does not parse (expected e.g. '12', '8.2', '9.x', 'v0.17.2')"
        raise ValueError(msg)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    cpu: StrictInt = Field(ge=1, le=64, description="cores")
    ram: StrictInt = Field(ge=256, le=262144, description="MiB")
    disk: StrictInt = Field(ge=2, le=4096, description="GiB")


class OsSpec(_Strict):
    distro: Literal["debian", "ubuntu", "alpine"]
    version: StrictStr

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        return _version(value, "OS version")


class _TemplateBase(_Strict):
    builder: StrictStr
    app_version: StrictStr | None = None
    resources: Resources
    vmid_base: StrictInt = Field(ge=100, le=999_999_000)

    @field_validator("app_version")
    @classmethod
    def _check_app_version(cls, value: str | None) -> str | None:
        return None if value is None else _version(value, "app version")

    @property
    def vmid_range(self) -> range:
        return range(self.vmid_base, self.vmid_base + VMID_BLOCK)


class VmTemplate(_TemplateBase):
    kind: Literal["vm"]
    haos_version: StrictStr
    rebrand: StrictBool = False
    base_backup: StrictStr | None = None

    @field_validator("builder")
    @classmethod
    def _check_builder(cls, value: str) -> str:
        if not re.fullmatch(r"vm/[a-z0-9][a-z0-9._-]*\.sh", value):
            msg = f"kind 'vm' needs a builder under vm/ (vm/<name>.sh), got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("haos_version")
    @classmethod
    def _check_haos(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", value):
            msg = f"HAOS version {value!r} must be exact, e.g. '16.0'"
            raise ValueError(msg)
        return value

    @field_validator("base_backup")
    @classmethod
    def _check_backup(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+\.tar", value):
            msg = "must be a plain file name ending in .tar"
            raise ValueError(msg)
        return value


class LxcTemplate(_TemplateBase):
    kind: Literal["lxc"]
    os: OsSpec = OsSpec(distro="debian", version="12")
    unprivileged: StrictBool = True
    portainer: StrictBool = False

    @field_validator("builder")
    @classmethod
    def _check_builder(cls, value: str) -> str:
        if not re.fullmatch(r"ct/[a-z0-9][a-z0-9._-]*\.sh", value):
            msg = f"kind 'lxc' needs a builder under ct/ (ct/<name>.sh), got {value!r}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _portainer_only_for_docker(self) -> LxcTemplate:
        if self.portainer and self.builder != "ct/docker.sh":
            msg = "portainer: only ct/docker.sh installs Portainer"
            raise ValueError(msg)
        return self


Template = Annotated[VmTemplate | LxcTemplate, Field(discriminator="kind")]


class Manifest(_Strict):
    release: StrictStr
    community_scripts_ref: StrictStr
    proxmox_min_version: StrictStr
    notes: StrictStr = ""
    stack: list[StrictStr] | None = None
    templates: dict[Annotated[str, Field(pattern=TEMPLATE_NAME)], Template] = Field(min_length=1)

    @field_validator("release")
    @classmethod
    def _check_release(cls, value: str) -> str:
        if not _RELEASE.match(value):
            msg = f"release {value!r} must look like YYYY.MM (e.g. '2026.06')"
            raise ValueError(msg)
        return value

    @field_validator("community_scripts_ref")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        if _SHA.match(value):
            return value
        if _DATE_TAG.match(value):
            return value
        msg = (
            f"{value!r} is not pinned: use a date tag (YYYY-MM-DD) or a 40-hex commit SHA, "
            "never a branch"
        )
        raise ValueError(msg)

    @field_validator("proxmox_min_version")
    @classmethod
    def _check_pve(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+", value):
            msg = f"{value!r} must be MAJOR.MINOR, e.g. '8.2'"
            raise ValueError(msg)
        if int(value.split(".")[0]) < 8:
            msg = f"{value!r}: Proxmox VE 8 or newer is required"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        if self.stack is not None:
            for index, name in enumerate(self.stack):
                if name not in self.templates:
                    msg = f"stack.{index}: {name!r} is not a template of this release"
                    raise ValueError(msg)
        owners: list[tuple[str, range]] = []
        for name, template in self.templates.items():
            for other, block in owners:
                if template.vmid_base in block or block.start in template.vmid_range:
                    msg = (
                        f"templates.{name}.vmid_base: VMIDs {template.vmid_range.start}-"
                        f"{template.vmid_range.stop - 1} overlap those of {other!r}"
                    )
                    raise ValueError(msg)
            owners.append((name, template.vmid_range))
        return self

    @property
    def default_stack(self) -> list[str]:
        return list(self.stack) if self.stack is not None else list(self.templates)

    def lxc_templates(self) -> dict[str, LxcTemplate]:
        return {n: t for n, t in self.templates.items() if isinstance(t, LxcTemplate)}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    # A discriminated union adds the tag ('lxc'/'vm') after the template name: drop it.
    if len(parts) >= 3 and parts[0] == "templates" and parts[2] in ("lxc", "vm"):
        del parts[2]
    return ".".join(parts)


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(source, "", f"{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ManifestError(source, "", "must be a YAML mapping")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = _field_path(tuple(first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "is required"
        if ": " in message and message.split(": ", 1)[0].startswith(("stack.", "templates.")):
            field, message = message.split(": ", 1)
        raise ManifestError(source, field, message) from None


def load_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError(str(path), "", f"cannot read: {err.strerror}") from None
    manifest = parse_manifest(text, str(path))
    if path.stem != manifest.release:
        raise ManifestError(
            str(path), "release", f"{manifest.release!r} does not match the file name {path.name!r}"
        )
    return manifest


@dataclass(frozen=True, slots=True)
class ShippedRelease:
    manifest: Manifest
    path: Path
    sha256: str


class ReleaseCatalog:
    """The release manifests this companion ships (``releases/*.yaml``)."""

    def __init__(self, releases: dict[str, ShippedRelease]) -> None:
        self._releases = releases

    @classmethod
    def load(cls, directory: Path) -> ReleaseCatalog:
        releases: dict[str, ShippedRelease] = {}
        for path in sorted(directory.glob("*.yaml")):
            manifest = load_manifest(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            releases[manifest.release] = ShippedRelease(manifest, path, digest)
        return cls(releases)

    def names(self) -> list[str]:
        return sorted(self._releases, key=_release_key)

    def get(self, release: str) -> Manifest | None:
        shipped = self._releases.get(release)
        return shipped.manifest if shipped else None

    def shipped(self, release: str) -> ShippedRelease | None:
        return self._releases.get(release)

    def latest(self) -> str | None:
        names = self.names()
        return names[-1] if names else None


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


def summary(manifest: Manifest) -> str:
    lines = [
        f"release {manifest.release}: community-scripts@{manifest.community_scripts_ref}, "
        f"PVE >= {manifest.proxmox_min_version}, {len(manifest.templates)} templates"
    ]
    for name, t in manifest.templates.items():
        version = t.haos_version if isinstance(t, VmTemplate) else (t.app_version or "-")
        lines.append(
            f"  {name:<18} {t.kind:<4} {t.builder:<22} {version:<8} "
            f"cpu={t.resources.cpu} ram={t.resources.ram}MiB disk={t.resources.disk}GiB "
            f"vmids={t.vmid_range.start}-{t.vmid_range.stop - 1}"
        )
    return "\n".join(lines)
