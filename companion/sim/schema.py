"""Request validation against the PVE API schema subset (proxmox-api.md §9 "Simulator lookup").

The rules follow pve-common's JSONSchema checker as the reference documents it: parameters are
strings on the wire (form or query), JSON bodies may carry typed values; booleans are only
``0``/``1`` (JSON ``true``/``false`` accepted); unknown or missing parameters, type, enum, range,
length, pattern and named-format errors are collected into an ``errors`` map keyed by name.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

SUBSET_RESOURCE: Final = "pve-schema-subset.json"

MISSING = "property is missing and it is not optional"
NOT_IN_SCHEMA = (
    "property is not defined in schema and the schema does not allow additional properties"
)

# Highest index + 1 of PVE 8's numbered config keys (net0..net31 etc.); the dump folds each family
# into one ``name[n]`` entry, so the ranges come from qemu-server / pve-container.
INDEX_LIMITS: Final[dict[str, int]] = {
    "net": 32,
    "scsi": 31,
    "ide": 4,
    "sata": 6,
    "virtio": 16,
    "unused": 256,
    "ipconfig": 32,
    "hostpci": 16,
    "usb": 14,
    "serial": 4,
    "parallel": 3,
    "numa": 8,
    "mp": 256,
    "dev": 256,
    "virtiofs": 10,
}
_INDEXED = re.compile(r"^([a-z][a-z_-]*?)(\d+)$")


class NotImplementedPath(Exception):
    """No schema entry for this path or method (HTTP 501)."""

    def __init__(self, method: str, rel_path: str) -> None:
        super().__init__(f"Method '{method} {rel_path}' not implemented")
        self.message = str(self)


class ParamErrors(Exception):
    """Parameter verification failed (HTTP 400); ``errors`` maps parameter name to reason."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("Parameter verification failed.")
        self.errors = dict(errors)


@dataclass(frozen=True)
class Operation:
    """One (path template, method) of the schema."""

    path: str
    method: str
    name: str
    permissions: Mapping[str, Any]
    proxyto: str | None
    properties: Mapping[str, Mapping[str, Any]]
    additional_properties: bool
    returns: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Route:
    template: str
    regex: re.Pattern[str]
    names: tuple[str, ...]
    literal_segments: int


class Schema:
    """The operations of the subset, path matching, and parameter validation."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.origin: Mapping[str, Any] = doc.get("_origin", {})
        self.operations: dict[tuple[str, str], Operation] = {}
        routes: list[_Route] = []
        for template, methods in doc["paths"].items():
            for method, op in methods.items():
                params = op.get("parameters", {})
                self.operations[(template, method)] = Operation(
                    path=template,
                    method=method,
                    name=op.get("name", ""),
                    permissions=op.get("permissions", {}),
                    proxyto=op.get("proxyto"),
                    properties=params.get("properties", {}),
                    additional_properties=bool(params.get("additionalProperties", 0)),
                    returns=op.get("returns", {}),
                )
            names = tuple(re.findall(r"\{(\w+)\}", template))
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            literal = sum(1 for seg in template.split("/") if seg and not seg.startswith("{"))
            routes.append(_Route(template, re.compile(f"^{pattern}$"), names, literal))
        # More literal segments first, so a fixed path beats a placeholder at the same depth.
        self._routes = sorted(routes, key=lambda r: -r.literal_segments)

    @classmethod
    def load(cls) -> Schema:
        text = resources.files("companion.sim").joinpath("data", SUBSET_RESOURCE).read_text("utf-8")
        return cls(json.loads(text))

    def match(self, rel_path: str) -> tuple[str, dict[str, str]] | None:
        """Return (template, uri params) for a path below ``/api2/json``, or None."""
        path = rel_path.rstrip("/") or "/"
        for route in self._routes:
            m = route.regex.match(path)
            if m:
                return route.template, dict(m.groupdict())
        return None

    def lookup(self, method: str, rel_path: str) -> tuple[Operation, dict[str, str]]:
        """Steps 1-3: find the operation or raise :class:`NotImplementedPath`."""
        found = self.match(rel_path)
        if found is None:
            raise NotImplementedPath(method, rel_path)
        template, uri_params = found
        op = self.operations.get((template, method))
        if op is None:
            raise NotImplementedPath(method, rel_path)
        return op, uri_params

    def validate(self, op: Operation, params: Mapping[str, Any]) -> dict[str, Any]:
        """Steps 4-5: check every parameter; return them typed (int/float/0-1 ints/str)."""
        errors: dict[str, str] = {}
        out: dict[str, Any] = {}
        for key, value in params.items():
            prop = property_schema(op.properties, key)
            if prop is None:
                if not op.additional_properties:
                    errors[key] = NOT_IN_SCHEMA
                continue
            checked = check_value(prop, value, key, errors)
            if checked is not None:
                out[key] = checked
        for key, prop in op.properties.items():
            if "[n]" in key or prop.get("optional"):
                continue
            if key not in params:
                errors[key] = MISSING
        for key in list(out):
            prop = property_schema(op.properties, key)
            requires = prop.get("requires") if prop else None
            if isinstance(requires, str) and requires not in params:
                errors[requires] = f"missing property - '{key}' requires this property"
        if errors:
            raise ParamErrors(errors)
        return out


def property_schema(
    properties: Mapping[str, Mapping[str, Any]], key: str
) -> Mapping[str, Any] | None:
    """Step 4: the schema of ``key``, mapping ``net0`` to ``net[n]`` within PVE's index range."""
    if key in properties:
        return properties[key]
    m = _INDEXED.match(key)
    if not m:
        return None
    base, index = m.group(1), int(m.group(2))
    prop = properties.get(f"{base}[n]")
    if prop is None:
        return None
    if m.group(2) != str(index) or index >= INDEX_LIMITS.get(base, 256):
        return None
    return prop


# ---------------------------------------------------------------------------------------------
# Value checks


def _add(errors: dict[str, str], path: str, message: str) -> None:
    errors.setdefault(path, message)


def check_value(
    schema: Mapping[str, Any], value: Any, path: str, errors: dict[str, str]
) -> Any | None:
    """Check one value against one property schema; return it typed, or None after an error."""
    typ = schema.get("type", "string")
    if isinstance(value, bool):
        if typ == "boolean":
            value = "1" if value else "0"
        else:
            _add(errors, path, f"type check ('{typ}') failed - got JSON::PP::Boolean")
            return None
    elif isinstance(value, list | dict):
        _add(errors, path, f"type check ('{typ}') failed - got {_perl_ref(value)}")
        return None
    elif value is None:
        _add(errors, path, MISSING)
        return None
    text = _to_text(value)
    typed: Any
    if typ == "boolean":
        if text not in ("0", "1"):
            _add(errors, path, f"type check ('boolean') failed - got '{text}'")
            return None
        typed = int(text)
    elif typ == "integer":
        if not re.fullmatch(r"[+-]?\d+", text):
            _add(errors, path, f"type check ('integer') failed - got '{text}'")
            return None
        typed = int(text)
    elif typ == "number":
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            _add(errors, path, f"type check ('number') failed - got '{text}'")
            return None
        typed = float(text)
    else:
        typed = text
    if not _check_constraints(schema, typed, text, path, errors):
        return None
    return typed


def _perl_ref(value: Any) -> str:
    return "ARRAY" if isinstance(value, list) else "HASH"


def _to_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_constraints(
    schema: Mapping[str, Any], typed: Any, text: str, path: str, errors: dict[str, str]
) -> bool:
    enum = schema.get("enum")
    if enum is not None and text not in [str(e) for e in enum]:
        _add(
            errors,
            path,
            f"value '{text}' does not have a value in the enumeration "
            f"'{', '.join(map(str, enum))}'",
        )
        return False
    if isinstance(typed, int | float) and not isinstance(typed, bool):
        minimum = _num(schema.get("minimum"))
        maximum = _num(schema.get("maximum"))
        if minimum is not None and typed < minimum:
            _add(errors, path, f"value must have a minimum value of {_fmt_num(minimum)}")
            return False
        if maximum is not None and typed > maximum:
            _add(errors, path, f"value must have a maximum value of {_fmt_num(maximum)}")
            return False
    if schema.get("type", "string") == "string":
        min_len = _num(schema.get("minLength"))
        max_len = _num(schema.get("maxLength"))
        if min_len is not None and len(text) < min_len:
            _add(errors, path, f"value must be at least {_fmt_num(min_len)} characters long")
            return False
        if max_len is not None and len(text) > max_len:
            _add(errors, path, f"value may only be {_fmt_num(max_len)} characters long")
            return False
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            regex = _perl_regex(pattern)
            if regex is not None and not regex.fullmatch(text):
                _add(errors, path, "value does not match the regex pattern")
                return False
    fmt = schema.get("format")
    if fmt is not None:
        problem = check_format(fmt, text, path)
        if problem is not None:
            _add(errors, path, f"invalid format - {problem}")
            return False
    return True


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt_num(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


_REGEX_CACHE: dict[str, re.Pattern[str] | None] = {}


def _perl_regex(pattern: str) -> re.Pattern[str] | None:
    """Translate the dump's Perl-isms (``(?^:...)``) and compile; None if untranslatable."""
    if pattern not in _REGEX_CACHE:
        py = re.sub(
            r"\(\?\^([a-z]*):", lambda m: f"(?{m.group(1)}:" if m.group(1) else "(?:", pattern
        )
        try:
            _REGEX_CACHE[pattern] = re.compile(py)
        except re.error:
            _REGEX_CACHE[pattern] = None
    return _REGEX_CACHE[pattern]


# ---------------------------------------------------------------------------------------------
# Named formats (the dump carries only their names) and property strings (dict formats).

_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?"
_DNS_NAME = re.compile(rf"^({_LABEL}\.)*{_LABEL}$")
_NODE = re.compile(rf"^{_LABEL}$")
_VMID = re.compile(r"^[1-9][0-9]{2,8}$")
_UNICAST_MAC = re.compile(r"^[a-f0-9][02468ace](?::[a-f0-9]{2}){5}$", re.IGNORECASE)
_STORAGE_ID = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
_CONFIG_ID = re.compile(r"^[a-z][a-z0-9_]+$", re.IGNORECASE)
_POOL_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_BRIDGE_ID = re.compile(r"^[-_.\w]+$")


def _ip_ok(value: str, version: int, cidr: bool) -> bool:
    try:
        if cidr:
            if "/" not in value:
                return False
            net = ipaddress.ip_interface(value)
        else:
            net = ipaddress.ip_address(value)  # type: ignore[assignment]
    except ValueError:
        return False
    return net.version == version


def _fmt_ipv4_config(value: str) -> str | None:
    if value in ("dhcp", "manual") or _ip_ok(value, 4, cidr=True):
        return None
    return "value does not look like a valid IPv4 network configuration\n"


def _fmt_ipv6_config(value: str) -> str | None:
    if value in ("auto", "dhcp", "manual") or _ip_ok(value, 6, cidr=True):
        return None
    return "value does not look like a valid IPv6 network configuration\n"


_NAMED_FORMATS: Final[dict[str, Callable[[str], str | None]]] = {
    "pve-vmid": lambda v: None if _VMID.match(v) else "value does not look like a valid VM ID\n",
    "pve-node": lambda v: None
    if _NODE.match(v)
    else "value does not look like a valid node name\n",
    "dns-name": lambda v: None
    if _DNS_NAME.match(v)
    else "value does not look like a valid DNS name\n",
    "mac-addr": lambda v: (
        None if _UNICAST_MAC.match(v) else "value does not look like a valid unicast MAC address\n"
    ),
    "pve-storage-id": lambda v: (
        None if _STORAGE_ID.match(v) else f"storage ID '{v}' contains illegal characters\n"
    ),
    "pve-configid": lambda v: None if _CONFIG_ID.match(v) else f"invalid configuration ID '{v}'\n",
    "pve-poolid": lambda v: None if _POOL_ID.match(v) else f"invalid pool ID '{v}'\n",
    "pve-bridge-id": lambda v: (
        None if _BRIDGE_ID.match(v) else f"'{v}' is not a valid bridge/vnet name\n"
    ),
    "ipv4": lambda v: (
        None if _ip_ok(v, 4, cidr=False) else "value does not look like a valid IPv4 address\n"
    ),
    "ipv6": lambda v: (
        None if _ip_ok(v, 6, cidr=False) else "value does not look like a valid IPv6 address\n"
    ),
    "CIDR": lambda v: (
        None
        if _ip_ok(v, 4, cidr=True) or _ip_ok(v, 6, cidr=True)
        else "value does not look like a valid CIDR network\n"
    ),
    "pve-ipv4-config": _fmt_ipv4_config,
    "pve-ipv6-config": _fmt_ipv6_config,
}


def known_formats() -> frozenset[str]:
    return frozenset(_NAMED_FORMATS)


def check_format(fmt: Any, value: str, path: str) -> str | None:
    """Return the error text (PVE keeps the trailing newline) or None. Unknown names pass."""
    if isinstance(fmt, Mapping):
        return parse_property_string(fmt, value, path)[1]
    if not isinstance(fmt, str):
        return None
    checker = _NAMED_FORMATS.get(fmt)
    if checker is not None:
        return checker(value)
    if fmt.endswith("-list") and fmt[: -len("-list")] in _NAMED_FORMATS:
        item_checker = _NAMED_FORMATS[fmt[: -len("-list")]]
        for item in re.split(r"[,;\s]+", value.strip()):
            if item:
                problem = item_checker(item)
                if problem is not None:
                    return problem
    return None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_property_string(
    fmt: Mapping[str, Any], data: str, path: str
) -> tuple[dict[str, Any], str | None]:
    """Parse ``k=v,k2=v2`` against a dict format; return (values, error text or None)."""
    res: dict[str, Any] = {}
    default_key: str | None = None
    for part in data.split(","):
        if not part.strip():
            continue
        if "=" in part:
            key, _, val = part.partition("=")
            if not key or not val:
                return res, "missing key in comma-separated list property\n"
            if key in res:
                return res, f"duplicate key in comma-separated list property: {key}\n"
            schema = fmt.get(key)
            if isinstance(schema, Mapping) and schema.get("alias"):
                key_alias = schema.get("keyAlias")
                if key_alias:
                    if key_alias in res:
                        return res, f"key alias '{key_alias}' is already defined\n"
                    res[key_alias] = key
                key = schema["alias"]
                schema = fmt.get(key)
            if not isinstance(schema, Mapping):
                return res, f"invalid key in comma-separated list property: {key}\n"
            if schema.get("type") == "boolean":
                low = val.lower()
                val = "1" if low in _TRUE else "0" if low in _FALSE else val
            res[key] = val
        else:
            if default_key is not None:
                return res, f"duplicate key in comma-separated list property: {default_key}\n"
            for key, schema in fmt.items():
                if isinstance(schema, Mapping) and schema.get("default_key"):
                    default_key = key
                    break
            if default_key is None:
                return res, "value without key, but schema does not define a default key\n"
            if default_key in res:
                return res, f"duplicate key in comma-separated list property: {default_key}\n"
            res[default_key] = part
    errors: dict[str, str] = {}
    for key, schema in fmt.items():
        if not isinstance(schema, Mapping) or schema.get("alias"):
            continue
        sub_path = f"{path}.{key}"
        if key in res:
            checked = check_value(schema, res[key], sub_path, errors)
            if checked is not None:
                res[key] = checked
        elif not schema.get("optional"):
            errors[sub_path] = MISSING
    if errors:
        lines = "".join(f"{k}: {v.rstrip(chr(10))}\n" for k, v in sorted(errors.items()))
        return res, f"format error\n{lines}"
    return res, None
