"""API tokens, ACLs and the schema's permission ``check`` (proxmox-api.md §8, §9 step 6).

A token's effective privileges on a path are those of the most specific ACL entry on that path or
on an ancestor (with ``propagate``). With privilege separation the real PVE intersects the user's
and the token's ACLs; the simulator models the result directly as one ACL list per token.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

PRIVILEGES: Final[frozenset[str]] = frozenset(
    {
        *(
            f"VM.{p}"
            for p in (
                "Allocate Audit Backup Clone Console Migrate Monitor PowerMgmt Snapshot "
                "Snapshot.Rollback Config.CDROM Config.CPU Config.Cloudinit Config.Disk "
                "Config.HWType Config.Memory Config.Network Config.Options"
            ).split()
        ),
        *(
            f"Sys.{p}"
            for p in "Audit Console Incoming Modify PowerMgmt Syslog AccessNetwork".split()
        ),
        *(f"Datastore.{p}" for p in "Allocate AllocateSpace AllocateTemplate Audit".split()),
        "SDN.Allocate",
        "SDN.Audit",
        "SDN.Use",
        "Pool.Allocate",
        "Pool.Audit",
        "Mapping.Audit",
        "Mapping.Modify",
        "Mapping.Use",
        "User.Modify",
        "Group.Allocate",
        "Realm.Allocate",
        "Realm.AllocateUser",
        "Permissions.Modify",
    }
)

# The least-privilege role of proxmox-api.md §8.
CTRLABLE_ROLE: Final[frozenset[str]] = frozenset(
    "VM.Audit VM.Clone VM.Allocate VM.Config.Network VM.Config.Options VM.PowerMgmt "
    "Datastore.AllocateSpace Datastore.Audit Sys.Audit SDN.Use".split()
)

TOKEN_ID_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9.\-_]+$")


class PermissionDenied(Exception):
    """403; ``what`` is the parenthesised part (``/vms/100, VM.PowerMgmt``) or None (bare)."""

    def __init__(self, what: str | None = None) -> None:
        self.what = what
        self.message = (
            f"Permission check failed ({what})" if what is not None else "Permission check failed"
        )
        super().__init__(self.message)


@dataclass(frozen=True)
class Acl:
    path: str
    privileges: frozenset[str]
    propagate: bool = True


def _check_privs(privs: Iterable[str]) -> frozenset[str]:
    out = frozenset(privs)
    unknown = sorted(out - PRIVILEGES)
    if unknown:
        msg = f"unknown privilege(s): {', '.join(unknown)}"
        raise ValueError(msg)
    return out


@dataclass
class Token:
    """An API token ``user@realm!name`` with its secret and its effective ACLs."""

    userid: str = "ctrlable@pve"
    name: str = "provisioner"
    secret: str = field(default_factory=lambda: str(uuid.uuid4()))
    acls: list[Acl] = field(default_factory=lambda: [Acl("/", CTRLABLE_ROLE)])
    expired: bool = False

    def __post_init__(self) -> None:
        if "@" not in self.userid:
            msg = f"token userid {self.userid!r} must be user@realm"
            raise ValueError(msg)
        if not TOKEN_ID_RE.match(self.name):
            msg = f"token name {self.name!r} must match [A-Za-z][A-Za-z0-9.-_]+"
            raise ValueError(msg)
        for acl in self.acls:
            _check_privs(acl.privileges)

    @property
    def full_id(self) -> str:
        return f"{self.userid}!{self.name}"

    def set_privileges(self, privileges: Iterable[str], path: str = "/") -> None:
        """Replace all ACLs by one entry (``path``, ``privileges``, propagate)."""
        self.acls = [Acl(normalize_path(path), _check_privs(privileges))]

    def privileges(self, path: str) -> frozenset[str]:
        path = normalize_path(path)
        best: Acl | None = None
        for acl in self.acls:
            applies = acl.path == path or (
                acl.propagate and (acl.path == "/" or path.startswith(acl.path + "/"))
            )
            if applies and (best is None or len(acl.path) > len(best.path)):
                best = acl
        return best.privileges if best else frozenset()

    def has(self, path: str, priv: str) -> bool:
        return priv in self.privileges(path)

    def check(self, path: str, privs: Sequence[str], *, any_of: bool = False) -> None:
        """Raise :class:`PermissionDenied` like PVE's ``check``/``check_any``."""
        path = normalize_path(path)
        have = self.privileges(path)
        if any_of:
            if not any(p in have for p in privs):
                raise PermissionDenied(f"{path}, {'|'.join(privs)}")
            return
        for priv in privs:
            if priv not in have:
                raise PermissionDenied(f"{path}, {priv}")


def normalize_path(path: str) -> str:
    path = re.sub(r"/+", "/", "/" + path.strip())
    return path.rstrip("/") or "/"


def _template_replace(template: str, params: Mapping[str, Any]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(params.get(m.group(1), "")), template)


def eval_check(token: Token, check: Sequence[Any], params: Mapping[str, Any]) -> bool:
    """Evaluate a schema ``check`` expression; raise :class:`PermissionDenied` on failure."""
    return _eval(token, check, params, noerr=False)


def _eval(token: Token, check: Sequence[Any], params: Mapping[str, Any], *, noerr: bool) -> bool:
    test = check[0]
    if test == "and":
        for sub in check[1:]:
            _eval(token, sub, params, noerr=False)
        return True
    if test == "or":
        for sub in check[1:]:
            if _eval(token, sub, params, noerr=True):
                return True
        if noerr:
            return False
        raise PermissionDenied()
    if test == "perm":
        template, privs = check[1], list(check[2])
        options = dict(zip(check[3::2], check[4::2], strict=False))
        require = options.get("require_param")
        if require and params.get(require) is None:
            if noerr:
                return False
            raise PermissionDenied()
        path = normalize_path(_template_replace(template, params))
        try:
            token.check(path, privs, any_of=bool(options.get("any")))
        except PermissionDenied:
            if noerr:
                return False
            raise
        return True
    if test == "userid-param":
        return True
    msg = f"unsupported permission test {test!r}"
    raise ValueError(msg)


def check_operation(
    token: Token, permissions: Mapping[str, Any], params: Mapping[str, Any]
) -> None:
    """Step 6: the operation-level check (``user: all`` passes)."""
    check = permissions.get("check")
    if check:
        eval_check(token, check, params)
