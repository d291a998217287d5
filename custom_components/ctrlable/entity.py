"""Base entities, device information and dynamic entity creation."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from homeassistant.core import callback
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity, EntityDescription
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .api import Guest, Instance, Node
from .const import DOMAIN, MANUFACTURER
from .coordinator import CtrlableConfigEntry, CtrlableDataUpdateCoordinator

GUEST_MODELS = {"lxc": "LXC container", "qemu": "QEMU virtual machine"}


def node_identifier(site_id: str, node: str) -> str:
    """Device identifier of a Proxmox VE node."""
    return f"{site_id}_node_{node}"


def guest_identifier(site_id: str, vmid: int) -> str:
    """Device identifier of a guest."""
    return f"{site_id}_guest_{vmid}"


def project_identifier(site_id: str, project: str) -> str:
    """Device identifier of a project."""
    return f"{site_id}_project_{project}"


def instance_key(site_id: str, instance_id: int) -> str:
    """Unique id prefix of the entities of one instance."""
    return f"{site_id}_instance_{instance_id}"


def companion_device_info(coordinator: CtrlableDataUpdateCoordinator) -> DeviceInfo:
    """Device of the companion itself (a service)."""
    companion = coordinator.data.companion
    return DeviceInfo(
        identifiers={(DOMAIN, coordinator.site_id)},
        name=companion.name,
        manufacturer=MANUFACTURER,
        model="Provisioner companion",
        sw_version=companion.version,
        entry_type=DeviceEntryType.SERVICE,
        configuration_url=coordinator.client.url,
    )


def node_device_info(site_id: str, node: str) -> DeviceInfo:
    """Device of a Proxmox VE node, attached to the companion."""
    return DeviceInfo(
        identifiers={(DOMAIN, node_identifier(site_id, node))},
        name=node,
        manufacturer="Proxmox",
        model="Proxmox VE node",
        via_device=(DOMAIN, site_id),
    )


def guest_device_info(site_id: str, guest: Guest) -> DeviceInfo:
    """Device of a guest, attached to its node."""
    return DeviceInfo(
        identifiers={(DOMAIN, guest_identifier(site_id, guest.vmid))},
        name=guest.name,
        manufacturer="Proxmox",
        model=GUEST_MODELS.get(guest.type, guest.type),
        serial_number=str(guest.vmid),
        via_device=(DOMAIN, node_identifier(site_id, guest.node)),
    )


class CtrlableEntity(CoordinatorEntity[CtrlableDataUpdateCoordinator]):
    """An entity fed by the overview coordinator."""

    _attr_has_entity_name = True
    # Entities of parts that can vanish without their device (instances, storages) say so here;
    # they then remove themselves from the entity registry.
    _removed_when_gone = False

    def __init__(
        self,
        coordinator: CtrlableDataUpdateCoordinator,
        description: EntityDescription,
        key: str,
    ) -> None:
        """Set the description and the unique id `<key>_<description key>`."""
        super().__init__(coordinator)
        self.entity_description = description
        self._attr_unique_id = f"{key}_{description.key}"

    def _is_gone(self) -> bool:
        """True when the companion no longer reports what this entity shows."""
        return False

    @callback
    def _handle_coordinator_update(self) -> None:
        """Remove the entity when its part vanished; else write the new state."""
        if (
            self._removed_when_gone
            and self.coordinator.last_update_success
            and self.coordinator.inventory_complete
            and self._is_gone()
        ):
            registry = er.async_get(self.hass)
            if registry.async_get(self.entity_id) is not None:
                registry.async_remove(self.entity_id)
            else:
                self.hass.async_create_task(self.async_remove(force_remove=True))
            return
        super()._handle_coordinator_update()


class CtrlableCompanionEntity(CtrlableEntity):
    """An entity of the companion (service) device."""

    def __init__(
        self, coordinator: CtrlableDataUpdateCoordinator, description: EntityDescription
    ) -> None:
        """Attach to the companion device."""
        super().__init__(coordinator, description, coordinator.site_id)
        self._attr_device_info = companion_device_info(coordinator)


class CtrlableNodeEntity(CtrlableEntity):
    """An entity of a Proxmox VE node."""

    def __init__(
        self,
        coordinator: CtrlableDataUpdateCoordinator,
        description: EntityDescription,
        node: str,
    ) -> None:
        """Attach to the node's device."""
        site_id = coordinator.site_id
        super().__init__(coordinator, description, node_identifier(site_id, node))
        self.node_name = node
        self._attr_device_info = node_device_info(site_id, node)

    @property
    def node(self) -> Node | None:
        """The node's current data."""
        return self.coordinator.data.node(self.node_name)

    @property
    def available(self) -> bool:
        """Available while the companion answers and reports the node."""
        return super().available and self.node is not None


class CtrlableGuestEntity(CtrlableEntity):
    """An entity of a guest (VM or container)."""

    def __init__(
        self,
        coordinator: CtrlableDataUpdateCoordinator,
        description: EntityDescription,
        guest: Guest,
    ) -> None:
        """Attach to the guest's device."""
        site_id = coordinator.site_id
        super().__init__(coordinator, description, guest_identifier(site_id, guest.vmid))
        self.vmid = guest.vmid
        self._attr_device_info = guest_device_info(site_id, guest)

    @property
    def guest(self) -> Guest | None:
        """The guest's current data."""
        return self.coordinator.data.guest(self.vmid)

    @property
    def available(self) -> bool:
        """Available while the companion answers and reports the guest."""
        return super().available and self.guest is not None


class CtrlableInstanceEntity(CtrlableEntity):
    """An entity of one instance, on its project's device."""

    def __init__(
        self,
        coordinator: CtrlableDataUpdateCoordinator,
        description: EntityDescription,
        instance: Instance,
    ) -> None:
        """Attach to the project's device; the hostname goes into the name."""
        site_id = coordinator.site_id
        super().__init__(coordinator, description, instance_key(site_id, instance.id))
        self.instance_id = instance.id
        self._attr_translation_placeholders = {"hostname": instance.hostname}
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, project_identifier(site_id, instance.project))},
            name=instance.project,
            manufacturer=MANUFACTURER,
            model="Project",
            entry_type=DeviceEntryType.SERVICE,
            via_device=(DOMAIN, site_id),
        )

    _removed_when_gone = True

    @property
    def instance(self) -> Instance | None:
        """The instance's current data."""
        return self.coordinator.data.instance(self.instance_id)

    def _is_gone(self) -> bool:
        return (instance := self.instance) is None or instance.state == "removed"

    @property
    def available(self) -> bool:
        """Available while the companion answers and reports the instance."""
        return super().available and self.instance is not None


@callback
def async_add_dynamic_entities[K: Hashable](
    entry: CtrlableConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
    keys: Callable[[], Iterable[K]],
    build: Callable[[K], Iterable[Entity]],
) -> None:
    """Add entities for every key now and for every new key after each coordinator update.

    Keys that disappear are forgotten (their devices are removed elsewhere), so a key that comes
    back gets new entities.
    """
    coordinator = entry.runtime_data.coordinator
    known: set[K] = set()

    @callback
    def _async_check() -> None:
        current = list(keys())
        new = [key for key in current if key not in known]
        if coordinator.inventory_complete:
            # Vanished keys lose their entities elsewhere; forget them so they can come back.
            known.intersection_update(current)
        known.update(new)
        if new:
            async_add_entities([entity for key in new for entity in build(key)])

    _async_check()
    entry.async_on_unload(coordinator.async_add_listener(_async_check))
