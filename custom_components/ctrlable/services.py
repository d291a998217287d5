"""Actions: deploy_instance, deploy_stack, build_release, guest_action."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import voluptuous as vol
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import ATTR_DEVICE_ID
from homeassistant.core import HomeAssistant, ServiceCall, ServiceResponse, SupportsResponse
from homeassistant.exceptions import ServiceValidationError
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers import device_registry as dr

from .api import Build, Instance, Overview
from .const import DEFAULT_DEPLOY_WAIT_TIMEOUT, DOMAIN, GUEST_ACTIONS, INSTANCE_FINAL_STATES
from .coordinator import (
    CtrlableConfigEntry,
    CtrlableDataUpdateCoordinator,
    async_apply_build,
    async_apply_instances,
)
from .helpers import companion_errors

SERVICE_DEPLOY_INSTANCE = "deploy_instance"
SERVICE_DEPLOY_STACK = "deploy_stack"
SERVICE_BUILD_RELEASE = "build_release"
SERVICE_GUEST_ACTION = "guest_action"

ATTR_CONFIG_ENTRY_ID = "config_entry_id"
ATTR_PROJECT = "project"
ATTR_TYPE = "type"
ATTR_TYPES = "types"
ATTR_HOSTNAME = "hostname"
ATTR_HOSTNAME_PREFIX = "hostname_prefix"
ATTR_OVERRIDES = "overrides"
ATTR_WAIT = "wait"
ATTR_TIMEOUT = "timeout"
ATTR_RELEASE = "release"
ATTR_TEMPLATES = "templates"
ATTR_VMID = "vmid"
ATTR_ACTION = "action"

HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOSTNAME_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")

_ENTRY: dict[vol.Marker, Any] = {vol.Optional(ATTR_CONFIG_ENTRY_ID): cv.string}
_WAIT: dict[vol.Marker, Any] = {
    vol.Optional(ATTR_WAIT, default=False): cv.boolean,
    vol.Optional(ATTR_TIMEOUT, default=DEFAULT_DEPLOY_WAIT_TIMEOUT): vol.All(
        vol.Coerce(int), vol.Range(min=1, max=3600)
    ),
}

DEPLOY_INSTANCE_SCHEMA = vol.Schema(
    {
        **_ENTRY,
        vol.Required(ATTR_PROJECT): cv.string,
        vol.Required(ATTR_TYPE): cv.string,
        vol.Required(ATTR_HOSTNAME): cv.string,
        vol.Optional(ATTR_OVERRIDES, default=dict): vol.Schema({cv.string: object}),
        **_WAIT,
    }
)
DEPLOY_STACK_SCHEMA = vol.Schema(
    {
        **_ENTRY,
        vol.Required(ATTR_PROJECT): cv.string,
        vol.Optional(ATTR_TYPES): vol.All(cv.ensure_list, [cv.string]),
        vol.Optional(ATTR_HOSTNAME_PREFIX): cv.string,
        **_WAIT,
    }
)
BUILD_RELEASE_SCHEMA = vol.Schema(
    {
        **_ENTRY,
        vol.Optional(ATTR_RELEASE): cv.string,
        vol.Optional(ATTR_TEMPLATES): vol.All(cv.ensure_list, [cv.string]),
    }
)
GUEST_ACTION_SCHEMA = vol.All(
    vol.Schema(
        {
            **_ENTRY,
            vol.Exclusive(ATTR_DEVICE_ID, "target"): cv.string,
            vol.Exclusive(ATTR_VMID, "target"): vol.All(vol.Coerce(int), vol.Range(min=1)),
            vol.Required(ATTR_ACTION): vol.In(GUEST_ACTIONS),
        }
    ),
    cv.has_at_least_one_key(ATTR_DEVICE_ID, ATTR_VMID),
)


def _invalid(key: str, **placeholders: str) -> ServiceValidationError:
    return ServiceValidationError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders=placeholders or None,
    )


def _entry_for_call(hass: HomeAssistant, call: ServiceCall) -> CtrlableConfigEntry:
    """The loaded entry the call names, or the only loaded entry."""
    if (entry_id := call.data.get(ATTR_CONFIG_ENTRY_ID)) is not None:
        entry = hass.config_entries.async_get_entry(entry_id)
        if entry is None or entry.domain != DOMAIN:
            raise _invalid("entry_not_found", entry_id=entry_id)
        if entry.state is not ConfigEntryState.LOADED:
            raise _invalid("entry_not_loaded", title=entry.title)
        return entry
    entries: list[CtrlableConfigEntry] = hass.config_entries.async_loaded_entries(DOMAIN)
    if not entries:
        raise _invalid("no_loaded_entries")
    if len(entries) > 1:
        raise _invalid("multiple_entries")
    return entries[0]


def _catalog(data: Overview) -> list[str]:
    """Instance types of the active release."""
    if (release := data.releases.get(data.releases.active)) is None:
        raise _invalid("no_active_release")
    return [template.name for template in release.templates]


def _check_types(data: Overview, types: Iterable[str]) -> None:
    catalog = _catalog(data)
    for instance_type in types:
        if instance_type not in catalog:
            raise _invalid("unknown_type", type=instance_type, types=", ".join(catalog))


def validate_hostname(data: Overview, hostname: str) -> None:
    """Raise `ServiceValidationError` unless `hostname` is a free RFC 1123 host label."""
    if not HOSTNAME_RE.match(hostname):
        raise _invalid("invalid_hostname", hostname=hostname)
    for instance in data.instances:
        if instance.hostname == hostname and instance.state != "removed":
            raise _invalid("hostname_in_use", hostname=hostname, project=instance.project)


def validate_deploy_instance(data: Overview, instance_type: str, hostname: str) -> None:
    """Check a single-instance deploy against the active release and the existing instances."""
    _check_types(data, [instance_type])
    validate_hostname(data, hostname)


def instance_response(instance: Instance) -> dict[str, Any]:
    """An instance as shown in action responses."""
    return {
        "id": instance.id,
        "project": instance.project,
        "type": instance.type,
        "hostname": instance.hostname,
        "vmid": instance.vmid,
        "node": instance.node,
        "state": instance.state,
        "error": instance.error,
    }


def build_response(build: Build) -> dict[str, Any]:
    """A build as shown in action responses."""
    return {
        "id": build.id,
        "release": build.release,
        "state": build.state,
        "percent": build.percent,
        "error": build.error,
    }


async def wait_for_instances(
    coordinator: CtrlableDataUpdateCoordinator, instances: list[Instance], timeout: float
) -> list[Instance]:
    """Wait until every instance is active, failed or removed, or until `timeout` seconds.

    Returns the latest known state of each instance either way.
    """
    ids = [instance.id for instance in instances]
    done = asyncio.Event()

    def _latest() -> list[Instance]:
        return [
            coordinator.data.instance(i) or item for i, item in zip(ids, instances, strict=True)
        ]

    def _check() -> None:
        if all(item.state in INSTANCE_FINAL_STATES for item in _latest()):
            done.set()

    unsubscribe = coordinator.async_add_listener(_check)
    try:
        _check()
        async with asyncio.timeout(timeout):
            await done.wait()
    except TimeoutError:
        pass
    finally:
        unsubscribe()
    return _latest()


async def _deployed(
    entry: CtrlableConfigEntry, call: ServiceCall, instances: list[Instance]
) -> ServiceResponse:
    coordinator = entry.runtime_data.coordinator
    async_apply_instances(coordinator, instances)
    await coordinator.async_request_refresh()
    if call.data[ATTR_WAIT]:
        instances = await wait_for_instances(coordinator, instances, call.data[ATTR_TIMEOUT])
    return {"instances": [instance_response(instance) for instance in instances]}


async def _async_deploy_instance(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    entry = _entry_for_call(hass, call)
    data = entry.runtime_data.coordinator.data
    validate_deploy_instance(data, call.data[ATTR_TYPE], call.data[ATTR_HOSTNAME])
    with companion_errors(entry):
        instance = await entry.runtime_data.client.create_instance(
            project=call.data[ATTR_PROJECT],
            instance_type=call.data[ATTR_TYPE],
            hostname=call.data[ATTR_HOSTNAME],
            overrides=call.data[ATTR_OVERRIDES],
        )
    return await _deployed(entry, call, [instance])


async def _async_deploy_stack(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    entry = _entry_for_call(hass, call)
    data = entry.runtime_data.coordinator.data
    types: list[str] | None = call.data.get(ATTR_TYPES)
    _check_types(data, types or [])
    prefix: str | None = call.data.get(ATTR_HOSTNAME_PREFIX)
    if prefix and not HOSTNAME_PREFIX_RE.match(prefix):
        raise _invalid("invalid_hostname_prefix", prefix=prefix)
    with companion_errors(entry):
        instances = await entry.runtime_data.client.deploy(
            project=call.data[ATTR_PROJECT], types=types, hostname_prefix=prefix
        )
    return await _deployed(entry, call, instances)


async def _async_build_release(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    entry = _entry_for_call(hass, call)
    coordinator = entry.runtime_data.coordinator
    releases = coordinator.data.releases
    name: str | None = call.data.get(ATTR_RELEASE) or releases.latest
    if name is None:
        raise _invalid("no_release")
    if (release := releases.get(name)) is None:
        raise _invalid(
            "unknown_release",
            release=name,
            releases=", ".join(item.release for item in releases.releases),
        )
    templates: list[str] | None = call.data.get(ATTR_TEMPLATES)
    known = [template.name for template in release.templates]
    for template in templates or []:
        if template not in known:
            raise _invalid(
                "unknown_template", template=template, release=name, templates=", ".join(known)
            )
    with companion_errors(entry):
        build = await entry.runtime_data.client.build_release(name, templates)
    async_apply_build(coordinator, build)
    return {"build": build_response(build)}


def _vmid_of_device(hass: HomeAssistant, entry: CtrlableConfigEntry, device_id: str) -> int:
    device = dr.async_get(hass).async_get(device_id)
    prefix = f"{entry.runtime_data.coordinator.site_id}_guest_"
    if device is not None and entry.entry_id in device.config_entries:
        for domain, identifier in device.identifiers:
            if domain == DOMAIN and identifier.startswith(prefix):
                return int(identifier.removeprefix(prefix))
    raise _invalid("invalid_device", device_id=device_id)


def _entry_for_device(hass: HomeAssistant, call: ServiceCall) -> CtrlableConfigEntry:
    """With a device target and no entry id, the entry is the device's."""
    device_id = call.data.get(ATTR_DEVICE_ID)
    if device_id is None or ATTR_CONFIG_ENTRY_ID in call.data:
        return _entry_for_call(hass, call)
    device = dr.async_get(hass).async_get(device_id)
    for entry_id in device.config_entries if device is not None else ():
        entry = hass.config_entries.async_get_entry(entry_id)
        if entry is not None and entry.domain == DOMAIN:
            if entry.state is not ConfigEntryState.LOADED:
                raise _invalid("entry_not_loaded", title=entry.title)
            return entry
    raise _invalid("invalid_device", device_id=device_id)


async def _async_guest_action(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    entry = _entry_for_device(hass, call)
    coordinator = entry.runtime_data.coordinator
    if (device_id := call.data.get(ATTR_DEVICE_ID)) is not None:
        vmid = _vmid_of_device(hass, entry, device_id)
    else:
        vmid = call.data[ATTR_VMID]
    guest = coordinator.data.guest(vmid)
    if guest is None or guest.template:
        raise _invalid("unknown_guest", vmid=str(vmid))
    with companion_errors(entry):
        result = await entry.runtime_data.client.guest_action(vmid, call.data[ATTR_ACTION])
    await coordinator.async_request_refresh()
    return {"vmid": result.vmid, "action": result.action, "status": result.status}


type ServiceHandler = Callable[[HomeAssistant, ServiceCall], Coroutine[Any, Any, ServiceResponse]]

SERVICES: tuple[tuple[str, ServiceHandler, vol.Schema | vol.All], ...] = (
    (SERVICE_DEPLOY_INSTANCE, _async_deploy_instance, DEPLOY_INSTANCE_SCHEMA),
    (SERVICE_DEPLOY_STACK, _async_deploy_stack, DEPLOY_STACK_SCHEMA),
    (SERVICE_BUILD_RELEASE, _async_build_release, BUILD_RELEASE_SCHEMA),
    (SERVICE_GUEST_ACTION, _async_guest_action, GUEST_ACTION_SCHEMA),
)


def _bind(
    hass: HomeAssistant, handler: ServiceHandler
) -> Callable[[ServiceCall], Coroutine[Any, Any, ServiceResponse]]:
    async def _async_call(call: ServiceCall) -> ServiceResponse:
        return await handler(hass, call)

    return _async_call


def async_setup_services(hass: HomeAssistant) -> None:
    """Register the integration's actions (once, from `async_setup`)."""
    for name, handler, schema in SERVICES:
        hass.services.async_register(
            DOMAIN,
            name,
            _bind(hass, handler),
            schema=schema,
            supports_response=SupportsResponse.OPTIONAL,
        )
