"""Derive ``companion/sim/data/pve-schema-subset.json`` from the full PVE API schema dump.

Usage: ``python -m companion.sim.derive_schema [SOURCE] [DEST]``; SOURCE defaults to
``../shared/reference/pve-apidoc.json`` (relative to the repository root). The subset keeps, for
each operation listed in :mod:`companion.sim.endpoints`, the operation as the dump has it, minus the
prose (``description``, ``verbose_description``) the simulator does not use; the permission
description stays. The output is deterministic (sorted keys), so re-running it is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from companion.sim.endpoints import IMPLEMENTED

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "reference" / "pve-apidoc.json"
DEFAULT_DEST = Path(__file__).resolve().parent / "data" / "pve-schema-subset.json"
EXPECTED_SHA256 = "8705eacb97b319e47defcbacc099eb0ad157f105a9acf8b8e4cb798d45be6c70"

ORIGIN: dict[str, Any] = {
    "source": "furbyhaxx/proxmox-api-spec proxmox-ve-api-8.3.0.json (commit f52c5c41, 2025-01-28)",
    "source_sha256": EXPECTED_SHA256,
    "generated_by": (
        "PVE::RESTHandler::api_dump_remove_refs(api_dump('PVE::API2')), pve-manager 8.3.x"
    ),
    "license": (
        "The schema content is Proxmox VE's own API schema (AGPL-3.0); the repository it was taken "
        "from is MIT-licensed. This file is a mechanically filtered subset of it."
    ),
    "derived_by": "companion/sim/derive_schema.py",
}

_DROP_KEYS = frozenset({"description", "verbose_description", "completion"})


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children") or []:
        yield from _walk(child)


def _strip(schema: Any) -> Any:
    """Drop prose from one schema; name maps (``properties``, dict ``format``) keep every name."""
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP_KEYS:
            continue
        if key in ("properties", "format") and isinstance(value, dict):
            out[key] = {name: _strip(sub) for name, sub in value.items()}
        else:
            out[key] = _strip(value)
    return out


def derive(dump: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the subset document for the operations in ``IMPLEMENTED``."""
    flat: dict[str, dict[str, Any]] = {}
    for tree in dump:
        for node in _walk(tree):
            flat[node["path"]] = node
    paths: dict[str, dict[str, Any]] = {}
    for method, path in IMPLEMENTED:
        found = flat.get(path)
        if found is None or method not in found.get("info", {}):
            msg = f"{method} {path} is not in the schema dump"
            raise KeyError(msg)
        raw = found["info"][method]
        op = {k: v for k, v in raw.items() if k not in ("parameters", "returns", "permissions")}
        op.pop("description", None)
        # The permission prose stays: it documents checks done inside the handler.
        op["permissions"] = raw.get("permissions", {})
        op["parameters"] = _strip(raw.get("parameters", {}))
        op["returns"] = _strip(raw.get("returns", {}))
        paths.setdefault(path, {})[method] = op
    return {"_origin": ORIGIN, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    raw = args.source.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EXPECTED_SHA256:
        print(
            f"warning: {args.source} sha256 {digest} != expected {EXPECTED_SHA256}", file=sys.stderr
        )
    doc = derive(json.loads(raw))
    doc["_origin"] = {**doc["_origin"], "source_sha256": digest}
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    args.dest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.dest} ({len(doc['paths'])} paths)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
