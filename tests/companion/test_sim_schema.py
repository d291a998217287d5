"""The simulator's schema subset, request validation (proxmox-api.md §9 steps 1-5) and permission
expressions (step 6), without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from companion.sim.derive_schema import DEFAULT_SOURCE, EXPECTED_SHA256, derive
from companion.sim.endpoints import IMPLEMENTED
from companion.sim.handlers import HANDLERS
from companion.sim.perms import CTRLABLE_ROLE, Acl, PermissionDenied, Token, eval_check
from companion.sim.schema import MISSING, NOT_IN_SCHEMA, NotImplementedPath, ParamErrors, Schema

SUBSET = Path(__file__).resolve().parents[2] / "companion/sim/data/pve-schema-subset.json"


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


def errors_of(schema: Schema, method: str, path: str, params: dict[str, object]) -> dict[str, str]:
    op, uri = schema.lookup(method, path)
    with pytest.raises(ParamErrors) as info:
        schema.validate(op, {**params, **uri})
    return info.value.errors


def test_handlers_subset_and_endpoint_list_agree(schema: Schema) -> None:
    assert set(HANDLERS) == set(IMPLEMENTED)
    assert {(m, p) for (p, m) in schema.operations} == set(HANDLERS)


def test_subset_records_its_origin() -> None:
    origin = json.loads(SUBSET.read_text())["_origin"]
    assert origin["source_sha256"] == EXPECTED_SHA256
    assert "AGPL-3.0" in origin["license"]
    assert "proxmox-ve-api-8.3.0.json" in origin["source"]


@pytest.mark.skipif(not DEFAULT_SOURCE.exists(), reason="full schema dump not present")
def test_subset_is_what_derive_schema_produces() -> None:
    derived = derive(json.loads(DEFAULT_SOURCE.read_bytes()))
    committed = json.loads(SUBSET.read_text())
    assert json.loads(json.dumps(derived["paths"])) == committed["paths"]


def test_unknown_path_and_method_are_501(schema: Schema) -> None:
    with pytest.raises(NotImplementedPath) as info:
        schema.lookup("POST", "/nodes/pve/lxc/100/config")
    assert info.value.message == "Method 'POST /nodes/pve/lxc/100/config' not implemented"
    with pytest.raises(NotImplementedPath):
        schema.lookup("GET", "/nodes/pve/nothing")
    op, uri = schema.lookup("GET", "/nodes/pve/qemu/100/status/current")
    assert op.path == "/nodes/{node}/qemu/{vmid}/status/current"
    assert uri == {"node": "pve", "vmid": "100"}


def test_unknown_missing_and_mistyped_params(schema: Schema) -> None:
    errs = errors_of(schema, "POST", "/nodes/pve/lxc/9010/clone", {"bogus": "1", "full": "True"})
    assert errs == {
        "bogus": NOT_IN_SCHEMA,
        "full": "type check ('boolean') failed - got 'True'",
        "newid": MISSING,
    }
    errs = errors_of(schema, "POST", "/nodes/pve/lxc/abc/clone", {"newid": "99"})
    assert errs["vmid"] == "type check ('integer') failed - got 'abc'"
    assert errs["newid"] == "value must have a minimum value of 100"


def test_booleans_accept_0_1_and_json_true_false(schema: Schema) -> None:
    op, uri = schema.lookup("POST", "/nodes/pve/qemu/9000/clone")
    typed = schema.validate(op, {**uri, "newid": 101, "full": True})
    assert typed["full"] == 1
    assert typed["newid"] == 101
    assert typed["vmid"] == 9000
    assert schema.validate(op, {**uri, "newid": "101", "full": "0"})["full"] == 0
    for bad in ("true", "yes", "2"):
        errs = errors_of(schema, "POST", "/nodes/pve/qemu/9000/clone", {"newid": 101, "full": bad})
        assert errs == {"full": f"type check ('boolean') failed - got '{bad}'"}


def test_enum_and_named_formats(schema: Schema) -> None:
    errs = errors_of(schema, "GET", "/cluster/resources", {"type": "vms"})
    assert errs == {
        "type": "value 'vms' does not have a value in the enumeration 'vm, storage, node, sdn'"
    }
    errs = errors_of(
        schema, "POST", "/nodes/pve/lxc/9010/clone", {"newid": 101, "hostname": "bad_name"}
    )
    assert errs == {"hostname": "invalid format - value does not look like a valid DNS name\n"}
    errs = errors_of(schema, "POST", "/nodes/pve/lxc/9010/clone", {"newid": 101, "target": "a..b"})
    assert errs == {"target": "invalid format - value does not look like a valid node name\n"}


def test_indexed_keys_and_property_strings(schema: Schema) -> None:
    op, uri = schema.lookup("PUT", "/nodes/pve/qemu/100/config")
    typed = schema.validate(op, {**uri, "net0": "virtio,bridge=vmbr0", "net31": "e1000"})
    assert typed["net0"] == "virtio,bridge=vmbr0"
    errs = errors_of(schema, "PUT", "/nodes/pve/qemu/100/config", {"net32": "virtio"})
    assert errs == {"net32": NOT_IN_SCHEMA}
    errs = errors_of(
        schema, "PUT", "/nodes/pve/qemu/100/config", {"net0": "virtio=01:24:11:00:00:01"}
    )
    assert errs["net0"].startswith("invalid format - format error\n")
    assert (
        "net0.macaddr: invalid format - value does not look like a valid unicast MAC"
        in errs["net0"]
    )
    errs = errors_of(schema, "PUT", "/nodes/pve/qemu/100/config", {"net0": "virtio,vlan=3"})
    assert errs == {"net0": "invalid format - invalid key in comma-separated list property: vlan\n"}
    errs = errors_of(schema, "PUT", "/nodes/pve/lxc/100/config", {"net0": "bridge=vmbr0"})
    assert errs == {"net0": f"invalid format - format error\nnet0.name: {MISSING}\n"}


def test_lxc_config_has_no_post_but_qemu_does(schema: Schema) -> None:
    assert ("/nodes/{node}/qemu/{vmid}/config", "POST") in schema.operations
    assert ("/nodes/{node}/lxc/{vmid}/config", "POST") not in schema.operations


def test_permission_expressions() -> None:
    token = Token(acls=[Acl("/", CTRLABLE_ROLE)])
    clone_check = [
        "and",
        ["perm", "/vms/{vmid}", ["VM.Clone"]],
        [
            "or",
            ["perm", "/vms/{newid}", ["VM.Allocate"]],
            ["perm", "/pool/{pool}", ["VM.Allocate"], "require_param", "pool"],
        ],
    ]
    assert eval_check(token, clone_check, {"vmid": "9000", "newid": "101"})
    narrow = Token(acls=[Acl("/vms/9000", frozenset({"VM.Clone"}))])
    with pytest.raises(PermissionDenied) as info:
        eval_check(narrow, clone_check, {"vmid": "9000", "newid": "101"})
    assert info.value.message == "Permission check failed"  # an 'or' fails bare
    with pytest.raises(PermissionDenied) as info:
        eval_check(narrow, ["perm", "/vms/{vmid}", ["VM.PowerMgmt"]], {"vmid": "9000"})
    assert info.value.message == "Permission check failed (/vms/9000, VM.PowerMgmt)"
    any_check = ["perm", "/vms/{vmid}", ["VM.Config.Disk", "VM.Config.CPU"], "any", 1]
    with pytest.raises(PermissionDenied) as info:
        eval_check(token, any_check, {"vmid": "100"})
    assert info.value.message == "Permission check failed (/vms/100, VM.Config.Disk|VM.Config.CPU)"


def test_acl_most_specific_path_wins() -> None:
    token = Token(
        acls=[Acl("/", frozenset({"VM.Audit"})), Acl("/vms/100", frozenset({"VM.PowerMgmt"}))]
    )
    assert token.privileges("/vms/100") == {"VM.PowerMgmt"}
    assert token.privileges("/vms/101") == {"VM.Audit"}
    with pytest.raises(ValueError, match="unknown privilege"):
        Token(acls=[Acl("/", frozenset({"VM.Everything"}))])
