"""Per-type service wiring: what each LXC type's first boot needs, with secrets made per instance.

``build_wiring`` turns an instance (type, hostname, overrides, where its MQTT broker is) into a
``Wiring``: the ``guest`` part is the assignment answer the guest's ``ctrlable-firstboot.sh``
applies (and nothing more), ``bindings`` lists what still needs a human or HA (a USB coordinator,
no known MQTT broker). Every secret comes from :mod:`secrets` and is new for each call.

Overrides a deploy may give (``WIRING_OVERRIDES``; other keys belong to the deploy plane and are
ignored here; ``validate_overrides`` checks the known ones and names the bad field):

- zigbee2mqtt: ``coordinator`` (``tcp://<host>:<port>`` or ``usb``), ``adapter`` (zstack, ember,
  deconz, zigate, zboss, ezsp), ``channel`` (11-26), ``mqtt_server``, ``mqtt_user`` +
  ``mqtt_password`` (an existing broker login instead of a generated one), ``base_topic``.
- zwavejs: ``coordinator`` (``tcp://<host>:<port>`` of a ser2net Z-Wave stick, or ``usb``).
- frigate: ``mqtt_server``, ``mqtt_user`` + ``mqtt_password``.
- docker-portainer, freepbx: none.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

WIRING_VERSION = 1
LXC_TYPES = ("zigbee2mqtt", "zwavejs", "frigate", "docker-portainer", "freepbx")
BROKER_TYPE = "ctrlable-pro"  # the HAOS VM runs the project's MQTT broker
MQTT_PORT = 1883
ZIGBEE_ADAPTERS = ("zstack", "ember", "deconz", "zigate", "zboss", "ezsp")

WIRING_OVERRIDES: dict[str, frozenset[str]] = {
    "zigbee2mqtt": frozenset(
        {
            "coordinator",
            "adapter",
            "channel",
            "mqtt_server",
            "mqtt_user",
            "mqtt_password",
            "base_topic",
        }
    ),
    "zwavejs": frozenset({"coordinator"}),
    "frigate": frozenset({"mqtt_server", "mqtt_user", "mqtt_password"}),
    "docker-portainer": frozenset(),
    "freepbx": frozenset(),
}

_ALNUM = string.ascii_letters + string.digits
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TOPIC = re.compile(r"^[A-Za-z0-9_/-]{1,64}$")
_MQTT_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ZWAVE_KEYS = ("S2_Unauthenticated", "S2_Authenticated", "S2_AccessControl", "S0_Legacy")
ZWAVE_LR_KEYS = ("S2_Authenticated", "S2_AccessControl")


class WiringError(ValueError):
    """Overrides (or context) that cannot be wired; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Binding:
    """Something the guest cannot wire by itself; HA shows it as "needs binding"."""

    what: str  # "zigbee_coordinator" | "zwave_coordinator" | "mqtt_broker"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"what": self.what, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class WiringContext:
    """What the companion knows about one instance when it records its assignment."""

    instance_id: int
    type: str
    hostname: str
    release: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    broker_hostname: str | None = None  # the project's ctrlable-pro, when it has one
    default_mqtt_url: str = ""  # Settings.mqtt_url


@dataclass(frozen=True, slots=True)
class Wiring:
    guest: dict[str, Any]
    bindings: list[Binding]


# Secrets ------------------------------------------------------------------------------------


def password(length: int = 24) -> str:
    """A random letters-and-digits password (no quoting trouble in YAML, JSON, PHP or SQL)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def zigbee_network_key() -> list[int]:
    return list(secrets.token_bytes(16))


def zigbee_pan_id() -> int:
    # IEEE 802.15.4 PAN ids Zigbee uses: 0x0001-0x3FFE (0x0000 and 0x3FFF and above avoided).
    return secrets.randbelow(0x3FFE) + 1


def zigbee_ext_pan_id() -> list[int]:
    while True:
        value = list(secrets.token_bytes(8))
        if value not in ([0] * 8, [0xFF] * 8):
            return value


def zwave_keys(names: tuple[str, ...]) -> dict[str, str]:
    """Distinct 16-byte keys as 32 upper-case hex digits (what Z-Wave JS UI stores)."""
    keys: dict[str, str] = {}
    while len(keys) < len(names):
        candidate = secrets.token_hex(16).upper()
        if candidate not in keys.values():
            keys[names[len(keys)]] = candidate
    return keys


# Overrides ----------------------------------------------------------------------------------


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").lower().split(".")
        return bool(labels) and all(_LABEL.match(label) for label in labels)
    return True


def parse_tcp_coordinator(value: Any, field_name: str) -> str | None:
    """``tcp://host:port`` -> the same, normalized; ``usb`` -> None; anything else -> error."""
    if not isinstance(value, str):
        raise WiringError(field_name, "must be a string: tcp://<host>:<port> or usb")
    if value.strip().lower() == "usb":
        return None
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme != "tcp"
        or not parts.hostname
        or port is None
        or not 1 <= port <= 65535
        or parts.path not in ("", "/")
        or parts.query
        or parts.username
        or not _host_ok(parts.hostname)
    ):
        raise WiringError(field_name, f"must be tcp://<host>:<port> or usb, got {value!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def parse_mqtt_server(value: Any, field_name: str) -> tuple[str, str, int]:
    """``mqtt[s]://host[:port]`` -> (scheme, host, port)."""
    if not isinstance(value, str):
        raise WiringError(field_name, "must be a string like mqtt://host:1883")
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in ("mqtt", "mqtts")
        or not parts.hostname
        or not _host_ok(parts.hostname)
        or parts.path not in ("", "/")
        or parts.query
        or parts.username
        or parts.password
    ):
        raise WiringError(
            field_name, f"must be mqtt://<host>[:<port>] (no credentials), got {value!r}"
        )
    default = 8883 if parts.scheme == "mqtts" else MQTT_PORT
    return parts.scheme, parts.hostname, port or default


def validate_overrides(type_: str, overrides: Mapping[str, Any]) -> None:
    """Check the wiring keys among ``overrides`` for ``type_``; raises WiringError naming one."""
    if type_ not in WIRING_OVERRIDES:
        raise WiringError("type", f"unknown LXC type {type_!r} (one of {', '.join(LXC_TYPES)})")
    known = WIRING_OVERRIDES[type_]
    if "coordinator" in known and "coordinator" in overrides:
        parse_tcp_coordinator(overrides["coordinator"], "overrides.coordinator")
    adapter = overrides.get("adapter") if "adapter" in known else None
    if adapter is not None and adapter not in ZIGBEE_ADAPTERS:
        raise WiringError("overrides.adapter", f"must be one of {', '.join(ZIGBEE_ADAPTERS)}")
    if "channel" in known and "channel" in overrides:
        channel = overrides["channel"]
        if isinstance(channel, bool) or not isinstance(channel, int) or not 11 <= channel <= 26:
            raise WiringError("overrides.channel", "must be an integer from 11 to 26")
    if "base_topic" in known and "base_topic" in overrides:
        topic = overrides["base_topic"]
        if not isinstance(topic, str) or not _TOPIC.match(topic):
            raise WiringError("overrides.base_topic", "must be 1-64 of A-Z a-z 0-9 _ / -")
    if "mqtt_server" in known and "mqtt_server" in overrides:
        parse_mqtt_server(overrides["mqtt_server"], "overrides.mqtt_server")
    if "mqtt_user" in known:
        has_user, has_password = "mqtt_user" in overrides, "mqtt_password" in overrides
        if has_user != has_password:
            missing = "mqtt_password" if has_user else "mqtt_user"
            raise WiringError(f"overrides.{missing}", "mqtt_user and mqtt_password go together")
        if has_user:
            user, secret = overrides["mqtt_user"], overrides["mqtt_password"]
            if not isinstance(user, str) or not _MQTT_USER.match(user):
                raise WiringError("overrides.mqtt_user", "must be 1-64 of A-Z a-z 0-9 . _ @ -")
            if not isinstance(secret, str) or not 8 <= len(secret) <= 128:
                raise WiringError("overrides.mqtt_password", "must be a string of 8-128 chars")
            if any(ch in secret for ch in "\r\n\0"):
                raise WiringError("overrides.mqtt_password", "must not contain line breaks")


# Building -----------------------------------------------------------------------------------


def _mqtt(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any] | None:
    """Where the broker is and this instance's own login, or None (needs binding)."""
    overrides = ctx.overrides
    if "mqtt_server" in overrides:
        source = "overrides.mqtt_server"
        scheme, host, port = parse_mqtt_server(overrides["mqtt_server"], source)
    elif ctx.broker_hostname:
        source = "broker"
        scheme, host, port = "mqtt", ctx.broker_hostname, MQTT_PORT
    elif ctx.default_mqtt_url:
        source = "mqtt_url"
        scheme, host, port = parse_mqtt_server(ctx.default_mqtt_url, source)
    else:
        bindings.append(Binding("mqtt_broker", "no MQTT broker known for this project"))
        return None
    if "mqtt_user" in overrides:
        user, secret = str(overrides["mqtt_user"]), str(overrides["mqtt_password"])
    else:
        user, secret = f"ctrlable-{ctx.hostname}", password(32)
    return {
        "server": f"{scheme}://{host}:{port}",
        "host": host,
        "port": port,
        "tls": scheme == "mqtts",
        "source": source,
        "user": user,
        "password": secret,
    }


def _coordinator(ctx: WiringContext, what: str, bindings: list[Binding]) -> str | None:
    raw = ctx.overrides.get("coordinator")
    if raw is None:
        bindings.append(Binding(what, "no network coordinator given (USB stick assumed)"))
        return None
    url = parse_tcp_coordinator(raw, "overrides.coordinator")
    if url is None:
        bindings.append(Binding(what, "USB coordinator: pass the device through to the guest"))
    return url


def _zigbee2mqtt(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any]:
    mqtt = _mqtt(ctx, bindings)
    port = _coordinator(ctx, "zigbee_coordinator", bindings)
    network: dict[str, Any] = {
        "network_key": zigbee_network_key(),
        "pan_id": zigbee_pan_id(),
        "ext_pan_id": zigbee_ext_pan_id(),
    }
    if "channel" in ctx.overrides:
        network["channel"] = int(ctx.overrides["channel"])
    return {
        "mqtt": None
        if mqtt is None
        else {
            "server": mqtt["server"],
            "user": mqtt["user"],
            "password": mqtt["password"],
            "base_topic": str(ctx.overrides.get("base_topic", "zigbee2mqtt")),
        },
        "serial": None
        if port is None
        else {"port": port, "adapter": str(ctx.overrides.get("adapter", "zstack"))},
        "network": network,
    }


def _zwavejs(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any]:
    port = _coordinator(ctx, "zwave_coordinator", bindings)
    return {
        "serial": None if port is None else {"port": port},
        "security_keys": zwave_keys(ZWAVE_KEYS),
        "security_keys_long_range": zwave_keys(ZWAVE_LR_KEYS),
        "session_secret": password(48),
        "admin": {"username": "admin", "password": password(24)},
    }


def _frigate(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any]:
    mqtt = _mqtt(ctx, bindings)
    if mqtt is not None and mqtt["tls"]:
        # Frigate's MQTT TLS needs a CA file in the guest; not wired (yet).
        raise WiringError(mqtt["source"], "frigate is wired with mqtt:// only, not mqtts://")
    return {
        "mqtt": None
        if mqtt is None
        else {
            "host": mqtt["host"],
            "port": mqtt["port"],
            "user": mqtt["user"],
            "password": mqtt["password"],
        }
    }


def _docker_portainer(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any]:
    # Portainer wants at least 12 characters.
    return {"portainer": {"username": "admin", "password": password(24)}}


def _freepbx(ctx: WiringContext, bindings: list[Binding]) -> dict[str, Any]:
    return {
        "admin": {"username": "admin", "password": password(24)},
        "db_password": password(32),
    }


_BUILDERS = {
    "zigbee2mqtt": _zigbee2mqtt,
    "zwavejs": _zwavejs,
    "frigate": _frigate,
    "docker-portainer": _docker_portainer,
    "freepbx": _freepbx,
}


def build_wiring(ctx: WiringContext) -> Wiring:
    """The assignment for one instance; new secrets on every call."""
    if ctx.type not in _BUILDERS:
        raise WiringError("type", f"no first-boot wiring for type {ctx.type!r}")
    if not _LABEL.match(ctx.hostname):
        raise WiringError("hostname", f"{ctx.hostname!r} is not a DNS label")
    validate_overrides(ctx.type, ctx.overrides)
    bindings: list[Binding] = []
    wiring = _BUILDERS[ctx.type](ctx, bindings)
    guest = {
        "version": WIRING_VERSION,
        "instance_id": ctx.instance_id,
        "type": ctx.type,
        "hostname": ctx.hostname,
        "release": ctx.release,
        "wiring": wiring,
        "needs_binding": [b.what for b in bindings],
    }
    return Wiring(guest=guest, bindings=bindings)
