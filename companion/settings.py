"""Companion settings: read from the environment and an optional `.env` file.

Every field is read from ``CTRLABLE_<FIELD NAME IN UPPER CASE>``; the environment wins over
the file.
Each key is documented in ``.env.example`` at the repository root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "CTRLABLE_"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_releases_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "data" / "releases"
    repo = REPO_ROOT / "releases"
    return repo if repo.is_dir() else packaged


class SettingsError(ValueError):
    """Raised when the settings are invalid; the message names the variable."""


class Settings(BaseModel):
    """Everything the companion needs to run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # HTTP service
    api_token: SecretStr = Field(description="Bearer token HA (and the CLI) use for /api/v1")
    listen_host: str = Field("127.0.0.1", description="Address the HTTP service binds")
    listen_port: int = Field(8580, ge=1, le=65535, description="Port the HTTP service binds")
    public_url: str = Field(
        "http://127.0.0.1:8580", description="URL guests and the host use to reach the companion"
    )
    data_dir: Path = Field(Path("var"), description="Directory for the SQLite DB and secrets")
    releases_dir: Path = Field(
        default_factory=_default_releases_dir, description="Release manifests"
    )
    site_id: str = Field("site-1", min_length=1, max_length=64, description="This site's id")
    site_name: str = Field("Ctrlable companion", description="Human name of this site")
    log_level: str = Field("INFO", description="Python log level")
    mdns: bool = Field(False, description="Advertise _ctrlable._tcp over mDNS")

    # Proxmox API
    pve_url: str = Field("https://127.0.0.1:8006", description="PVE API base URL")
    pve_token_id: str = Field("ctrlable@pve!provisioner", description="USER@REALM!TOKENID")
    pve_token_secret: SecretStr = Field(SecretStr(""), description="The API token's secret")
    pve_verify_tls: bool = Field(True, description="Verify the PVE certificate")
    pve_ca_file: Path | None = Field(None, description="CA bundle that signs the PVE certificate")
    pve_fingerprint: str | None = Field(
        None, description="Pinned SHA-256 fingerprint of the PVE certificate (AA:BB:...)"
    )
    pve_timeout: float = Field(10.0, gt=0, le=300, description="Per-request timeout (s)")
    pve_node: str | None = Field(
        None, description="Preferred node for new guests (default: the template's)"
    )

    # First boot
    firstboot_secret: SecretStr = Field(
        SecretStr(""), description="Per-release secret guests present in X-Ctrlable-Secret"
    )
    firstboot_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for a guest's first boot"
    )
    firstboot_rate_ip: int = Field(
        30, ge=1, le=10000, description="First-boot attempts allowed per client IP per minute"
    )
    firstboot_rate_host: int = Field(
        10, ge=1, le=10000, description="Authenticated first-boot attempts per hostname per minute"
    )
    mqtt_url: str = Field(
        "",
        description="MQTT broker (mqtt://host:port) wired into apps when the project has no "
        "ctrlable-pro and the deploy gives no mqtt_server override; empty = needs binding",
    )

    # Build plane: SSH to the PVE host's restricted ctrlable-build (install.sh writes these)
    build_ssh_host: str = Field(
        "", description="PVE host running /usr/local/sbin/ctrlable-build; empty disables builds"
    )
    build_ssh_port: int = Field(22, ge=1, le=65535, description="SSH port of the PVE host")
    build_ssh_user: str = Field("root", description="SSH user (its key is command= restricted)")
    build_ssh_key_file: Path | None = Field(
        None, description="Private key (ed25519) the companion presents to the PVE host"
    )
    build_ssh_known_hosts: Path | None = Field(
        None, description="known_hosts pinning the PVE host key (no trust on first use)"
    )

    # Platform report-up (docs/platform-api.md)
    platform_url: str = Field(
        "", description="Platform report endpoint (http/https URL); empty disables report-up"
    )
    platform_token: SecretStr = Field(
        SecretStr(""), description="This site's bearer credential for the platform"
    )
    platform_heartbeat: float = Field(
        300.0, gt=0, le=86400, description="Seconds between heartbeat reports"
    )
    platform_unreachable_after: float = Field(
        900.0, gt=0, description="Seconds of failed delivery before the platform is unreachable"
    )
    platform_timeout: float = Field(
        10.0, gt=0, le=300, description="Per-request timeout to the platform (s)"
    )
    platform_debounce: float = Field(
        1.0, ge=0, le=60, description="Seconds a change waits so a burst becomes one report"
    )
    platform_retry_min: float = Field(
        2.0, gt=0, le=3600, description="First retry delay after a failed report (s)"
    )
    platform_retry_max: float = Field(
        300.0, gt=0, le=86400, description="Longest retry delay (s); the delay doubles up to it"
    )

    # ctrlable-pro (HAOS VM) flow (docs/haos.md)
    haos_port: int = Field(8123, ge=1, le=65535, description="Port Home Assistant answers on")
    haos_address: str | None = Field(
        None,
        description="Address of the ctrlable-pro VM when its guest agent reports none "
        "(e.g. a DHCP reservation for its MAC); empty = guest agent only",
    )
    haos_agent_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for the guest agent to report an address"
    )
    haos_boot_timeout: float = Field(
        1200.0, gt=0, description="Seconds to wait for Home Assistant to answer after boot"
    )
    haos_restore_timeout: float = Field(
        1800.0, gt=0, description="Seconds to wait for the base backup upload, restore and restart"
    )
    haos_request_timeout: float = Field(
        30.0, gt=0, le=600, description="Per-request timeout to Home Assistant (s)"
    )
    haos_backup_dir: Path | None = Field(
        None, description="Directory holding the releases' base backups (default <data_dir>/haos)"
    )
    haos_language: str = Field("en", description="Language of the onboarded Home Assistant")
    haos_time_zone: str | None = Field(
        None, description="Time zone set during onboarding (e.g. Europe/Amsterdam); empty = HA's"
    )
    haos_country: str | None = Field(
        None, description="ISO 3166 country set during onboarding (e.g. NL); empty = unset"
    )

    @field_validator("pve_token_id")
    @classmethod
    def _check_token_id(cls, value: str) -> str:
        if "!" not in value or "@" not in value.split("!", 1)[0]:
            msg = "must look like USER@REALM!TOKENID"
            raise ValueError(msg)
        return value

    @field_validator("pve_url")
    @classmethod
    def _check_pve_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            msg = "must be an https:// URL (PVE serves its API over TLS only)"
            raise ValueError(msg)
        return value

    @field_validator("pve_fingerprint")
    @classmethod
    def _check_pve_fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.strip().replace(":", "").lower()
        if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
            msg = "must be a SHA-256 certificate fingerprint: 64 hex digits, colons optional"
            raise ValueError(msg)
        return value.strip()

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = "must be an mqtt:// or mqtts:// URL (or empty)"
            raise ValueError(msg)
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
            msg = "must be mqtt://host:port only (credentials are generated per instance)"
            raise ValueError(msg)
        return value

    @field_validator("platform_url")
    @classmethod
    def _check_platform_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = "must be an http:// or https:// URL (or empty to disable report-up)"
            raise ValueError(msg)
        if parts.username or parts.password or parts.query:
            msg = "must not carry credentials or a query; use CTRLABLE_PLATFORM_TOKEN"
            raise ValueError(msg)
        return value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "ctrlable.db"

    @property
    def haos_backups(self) -> Path:
        """Where the releases' HAOS base backups are read from."""
        return self.haos_backup_dir or self.data_dir / "haos"

    @classmethod
    def field_env_names(cls) -> dict[str, str]:
        return {name: ENV_PREFIX + name.upper() for name in cls.model_fields}

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, env_file: Path | None = None
    ) -> Settings:
        """Build settings from an env file (optional) overlaid by the environment."""
        values: dict[str, str] = {}
        if env_file is not None:
            values.update(read_env_file(env_file))
        env = os.environ if environ is None else environ
        values.update({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        names = {v: k for k, v in cls.field_env_names().items()}
        data: dict[str, Any] = {}
        for key, value in values.items():
            if not key.startswith(ENV_PREFIX):
                continue
            if key not in names:
                msg = f"{key}: unknown setting"
                raise SettingsError(msg)
            data[names[key]] = (
                None
                if value == ""
                and key.endswith(
                    (
                        "_CA_FILE",
                        "_FINGERPRINT",
                        "_NODE",
                        "_ADDRESS",
                        "_BACKUP_DIR",
                        "_TIME_ZONE",
                        "_COUNTRY",
                        "_KEY_FILE",
                        "_KNOWN_HOSTS",
                    )
                )
                else value
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            msg = f"{ENV_PREFIX}{field.upper()}: {first['msg']}"
            raise SettingsError(msg) from None


def env_example() -> str:
    """The text of ``.env.example``: every setting with its description and default."""
    lines = [
        "# Ctrlable companion settings. Every key is optional unless marked required.",
        "# Generated by: python -m companion.settings > .env.example",
    ]
    for name, info in Settings.model_fields.items():
        lines.append("")
        required = info.is_required()
        lines.append(f"# {info.description or name}{' (required)' if required else ''}")
        if required or info.default_factory is not None:
            default = ""
        else:
            value = info.default
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            default = (
                ""
                if value is None
                else str(value).lower()
                if isinstance(value, bool)
                else str(value)
            )
        prefix = "" if required else "# "
        lines.append(f"{prefix}{ENV_PREFIX}{name.upper()}={default}")
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a systemd-style env file: KEY=VALUE lines, # comments, optional quotes."""
    result: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            msg = f"{path}:{number}: expected KEY=VALUE"
            raise SettingsError(msg)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[key.strip()] = value
    return result


if __name__ == "__main__":
    print(env_example(), end="")
