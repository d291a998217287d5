"""Repair issues raised from the companion's overview.

- an instance whose USB radio must be passed through by hand ("needs binding"),
- a privilege the companion's Proxmox VE token lacks,
- any other problem the companion reports (Proxmox VE unreachable, token refused, TLS error),
- the central platform unreachable (the companion sets `unreachable_since` only after its own
  threshold, `CTRLABLE_PLATFORM_UNREACHABLE_AFTER`).

Issue ids start with the config entry id, so each companion manages only its own issues.
"""

from __future__ import annotations

from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir
from homeassistant.util import slugify

from .api import Instance, Overview
from .const import DOMAIN
from .coordinator import CtrlableConfigEntry

type IssueSpec = tuple[str, ir.IssueSeverity, dict[str, str]]


def _guest_kind(data: Overview, instance: Instance) -> str:
    if instance.vmid is not None and (guest := data.guest(instance.vmid)) is not None:
        return guest.type
    release = data.releases.get(instance.release)
    templates = release.templates if release is not None else ()
    kinds = {template.name: template.kind for template in templates}
    return "qemu" if kinds.get(instance.type) == "vm" else "lxc"


def binding_steps(data: Overview, instance: Instance) -> dict[str, str]:
    """The host shell commands that pass a USB radio through to the instance's guest."""
    vmid = instance.vmid
    if _guest_kind(data, instance) == "qemu":
        return {
            "find_command": "lsusb",
            "bind_command": f"qm set {vmid} --usb0 host=<vendor-id>:<product-id>",
            "restart_command": f"qm reboot {vmid}",
        }
    return {
        "find_command": "ls -l /dev/serial/by-id/",
        "bind_command": f"pct set {vmid} --dev0 /dev/serial/by-id/<your-radio>",
        "restart_command": f"pct reboot {vmid}",
    }


def wanted_issues(entry: CtrlableConfigEntry, data: Overview) -> dict[str, IssueSpec]:
    """Every issue the current data calls for, by issue id."""
    prefix = entry.entry_id
    issues: dict[str, IssueSpec] = {}
    for instance in data.instances:
        if not instance.needs_binding or instance.state == "removed" or instance.vmid is None:
            continue
        issues[f"{prefix}_needs_binding_{instance.id}"] = (
            "needs_binding",
            ir.IssueSeverity.WARNING,
            {
                "hostname": instance.hostname,
                "type": instance.type,
                "vmid": str(instance.vmid),
                "node": instance.node or "",
                **binding_steps(data, instance),
            },
        )
    for problem in data.problems:
        if problem.code != "missing_privilege":
            issues[f"{prefix}_problem_{slugify(problem.code)}"] = (
                "companion_problem",
                ir.IssueSeverity.ERROR,
                {"code": problem.code, "message": problem.message},
            )
            continue
        privilege = problem.privilege or "?"
        path = problem.path or "/"
        issues[f"{prefix}_missing_privilege_{slugify(privilege)}_{slugify(path) or 'root'}"] = (
            "missing_privilege",
            ir.IssueSeverity.ERROR,
            {"privilege": privilege, "path": path, "message": problem.message},
        )
    since = data.platform.unreachable_since
    if since is not None:
        last = data.platform.last_success
        issues[f"{prefix}_platform_unreachable"] = (
            "platform_unreachable",
            ir.IssueSeverity.WARNING,
            {
                "since": since.isoformat(),
                "last_success": last.isoformat() if last else "never",
                "outbox_depth": str(data.platform.outbox_depth),
            },
        )
    return issues


@callback
def async_update_issues(hass: HomeAssistant, entry: CtrlableConfigEntry) -> None:
    """Create the issues the data calls for and delete the ones it no longer does."""
    coordinator = entry.runtime_data.coordinator
    if not coordinator.last_update_success:
        return
    wanted = wanted_issues(entry, coordinator.data)
    for issue_id in _entry_issue_ids(hass, entry) - wanted.keys():
        ir.async_delete_issue(hass, DOMAIN, issue_id)
    for issue_id, (translation_key, severity, placeholders) in wanted.items():
        ir.async_create_issue(
            hass,
            DOMAIN,
            issue_id,
            is_fixable=False,
            severity=severity,
            translation_key=translation_key,
            translation_placeholders=placeholders,
        )


@callback
def async_delete_issues(hass: HomeAssistant, entry: CtrlableConfigEntry) -> None:
    """Delete every issue of this entry (when the entry is removed)."""
    for issue_id in _entry_issue_ids(hass, entry):
        ir.async_delete_issue(hass, DOMAIN, issue_id)


def _entry_issue_ids(hass: HomeAssistant, entry: CtrlableConfigEntry) -> set[str]:
    prefix = f"{entry.entry_id}_"
    return {
        issue_id
        for domain, issue_id in ir.async_get(hass).issues
        if domain == DOMAIN and issue_id.startswith(prefix)
    }
