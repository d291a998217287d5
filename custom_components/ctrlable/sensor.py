"""Sensors: companion platform report-up, node and guest load, storage use, instance state."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import PERCENTAGE, EntityCategory, UnitOfInformation
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.typing import StateType
from homeassistant.util import dt as dt_util

from .api import Guest, Instance, Node, Overview, Storage
from .const import GUEST_STATUSES, INSTANCE_STATES
from .coordinator import CtrlableConfigEntry, CtrlableDataUpdateCoordinator
from .entity import (
    CtrlableCompanionEntity,
    CtrlableGuestEntity,
    CtrlableInstanceEntity,
    CtrlableNodeEntity,
    async_add_dynamic_entities,
    node_identifier,
)

# Read-only entities fed by the coordinator.
PARALLEL_UPDATES = 0

# A boot time computed from an uptime moves by a second or two between polls; keep the
# previous value unless it moved more than this.
BOOT_TIME_TOLERANCE = timedelta(seconds=60)


def _percent(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return round(part / whole * 100, 1)


def _fraction(value: float | None) -> float | None:
    return None if value is None else round(value * 100, 1)


@dataclass(frozen=True, kw_only=True)
class CtrlableCompanionSensorDescription(SensorEntityDescription):
    """A sensor of the companion."""

    value_fn: Callable[[Overview], StateType | datetime]


@dataclass(frozen=True, kw_only=True)
class CtrlableNodeSensorDescription(SensorEntityDescription):
    """A sensor of a node. With `uptime`, `value_fn` returns seconds shown as a boot time."""

    value_fn: Callable[[Node], StateType]
    uptime: bool = False


@dataclass(frozen=True, kw_only=True)
class CtrlableGuestSensorDescription(SensorEntityDescription):
    """A sensor of a guest. With `uptime`, `value_fn` returns seconds shown as a boot time."""

    value_fn: Callable[[Guest], StateType]
    uptime: bool = False


@dataclass(frozen=True, kw_only=True)
class CtrlableInstanceSensorDescription(SensorEntityDescription):
    """A sensor of an instance."""

    value_fn: Callable[[Instance], StateType]
    attributes_fn: Callable[[Instance], Mapping[str, Any]] | None = None


COMPANION_SENSORS: tuple[CtrlableCompanionSensorDescription, ...] = (
    CtrlableCompanionSensorDescription(
        key="platform_last_report",
        translation_key="platform_last_report",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda data: data.platform.last_success,
    ),
    CtrlableCompanionSensorDescription(
        key="platform_outbox",
        translation_key="platform_outbox",
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda data: data.platform.outbox_depth,
    ),
)

NODE_SENSORS: tuple[CtrlableNodeSensorDescription, ...] = (
    CtrlableNodeSensorDescription(
        key="cpu_usage",
        translation_key="cpu_usage",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda node: _fraction(node.cpu),
    ),
    CtrlableNodeSensorDescription(
        key="memory_usage",
        translation_key="memory_usage",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda node: _percent(node.mem, node.maxmem),
    ),
    CtrlableNodeSensorDescription(
        key="memory_used",
        translation_key="memory_used",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.GIBIBYTES,
        suggested_display_precision=2,
        state_class=SensorStateClass.MEASUREMENT,
        entity_registry_enabled_default=False,
        value_fn=lambda node: node.mem,
    ),
    CtrlableNodeSensorDescription(
        key="uptime",
        translation_key="uptime",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_category=EntityCategory.DIAGNOSTIC,
        uptime=True,
        value_fn=lambda node: node.uptime,
    ),
)

STORAGE_SENSOR = SensorEntityDescription(
    key="usage",
    translation_key="storage_usage",
    native_unit_of_measurement=PERCENTAGE,
    state_class=SensorStateClass.MEASUREMENT,
    suggested_display_precision=1,
)

GUEST_SENSORS: tuple[CtrlableGuestSensorDescription, ...] = (
    CtrlableGuestSensorDescription(
        key="status",
        translation_key="guest_status",
        device_class=SensorDeviceClass.ENUM,
        options=list(GUEST_STATUSES),
        value_fn=lambda guest: guest.status if guest.status in GUEST_STATUSES else "unknown",
    ),
    CtrlableGuestSensorDescription(
        key="cpu_usage",
        translation_key="cpu_usage",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda guest: _fraction(guest.cpu),
    ),
    CtrlableGuestSensorDescription(
        key="memory_usage",
        translation_key="memory_usage",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda guest: _percent(guest.mem, guest.maxmem),
    ),
    CtrlableGuestSensorDescription(
        key="memory_used",
        translation_key="memory_used",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.MEBIBYTES,
        suggested_display_precision=0,
        state_class=SensorStateClass.MEASUREMENT,
        entity_registry_enabled_default=False,
        value_fn=lambda guest: guest.mem,
    ),
    CtrlableGuestSensorDescription(
        key="uptime",
        translation_key="uptime",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_category=EntityCategory.DIAGNOSTIC,
        uptime=True,
        value_fn=lambda guest: guest.uptime if guest.status == "running" else None,
    ),
)

INSTANCE_SENSORS: tuple[CtrlableInstanceSensorDescription, ...] = (
    CtrlableInstanceSensorDescription(
        key="state",
        translation_key="instance_state",
        device_class=SensorDeviceClass.ENUM,
        options=list(INSTANCE_STATES),
        value_fn=lambda instance: instance.state if instance.state in INSTANCE_STATES else None,
        attributes_fn=lambda instance: {
            "instance_id": instance.id,
            "type": instance.type,
            "vmid": instance.vmid,
            "error": instance.error,
        },
    ),
    CtrlableInstanceSensorDescription(
        key="release",
        translation_key="instance_release",
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda instance: instance.release,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: CtrlableConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Set up the sensors, and add new ones as nodes, guests and instances appear."""
    coordinator = entry.runtime_data.coordinator
    async_add_entities(
        CtrlableCompanionSensor(coordinator, description) for description in COMPANION_SENSORS
    )

    def _node_entities(name: str) -> Iterable[SensorEntity]:
        return [CtrlableNodeSensor(coordinator, description, name) for description in NODE_SENSORS]

    def _storage_keys() -> Iterable[tuple[str, str]]:
        return [
            (node.node, storage.storage)
            for node in coordinator.data.nodes
            for storage in node.storages
        ]

    def _guest_entities(vmid: int) -> Iterable[SensorEntity]:
        if (guest := coordinator.data.guest(vmid)) is None:
            return []
        return [
            CtrlableGuestSensor(coordinator, description, guest) for description in GUEST_SENSORS
        ]

    def _instance_entities(instance_id: int) -> Iterable[SensorEntity]:
        if (instance := coordinator.data.instance(instance_id)) is None:
            return []
        return [
            CtrlableInstanceSensor(coordinator, description, instance)
            for description in INSTANCE_SENSORS
        ]

    async_add_dynamic_entities(
        entry,
        async_add_entities,
        lambda: [node.node for node in coordinator.data.nodes],
        _node_entities,
    )
    async_add_dynamic_entities(
        entry,
        async_add_entities,
        _storage_keys,
        lambda key: [CtrlableStorageSensor(coordinator, *key)],
    )
    async_add_dynamic_entities(
        entry,
        async_add_entities,
        lambda: [guest.vmid for guest in coordinator.exposed_guests()],
        _guest_entities,
    )
    async_add_dynamic_entities(
        entry,
        async_add_entities,
        lambda: [instance.id for instance in coordinator.visible_instances()],
        _instance_entities,
    )


class _BootTime:
    """Turns an uptime in seconds into a boot time that does not jitter between polls."""

    _boot_time: datetime | None = None

    def _stable_boot_time(self, uptime: StateType) -> datetime | None:
        if not isinstance(uptime, int) or uptime <= 0:
            self._boot_time = None
            return None
        boot_time = dt_util.utcnow().replace(microsecond=0) - timedelta(seconds=uptime)
        if self._boot_time is None or abs(boot_time - self._boot_time) > BOOT_TIME_TOLERANCE:
            self._boot_time = boot_time
        return self._boot_time


class CtrlableCompanionSensor(CtrlableCompanionEntity, SensorEntity):
    """A sensor of the companion."""

    entity_description: CtrlableCompanionSensorDescription

    @property
    def native_value(self) -> StateType | datetime:
        """The sensor's value."""
        return self.entity_description.value_fn(self.coordinator.data)


class CtrlableNodeSensor(_BootTime, CtrlableNodeEntity, SensorEntity):
    """A sensor of a node."""

    entity_description: CtrlableNodeSensorDescription

    @property
    def native_value(self) -> StateType | datetime:
        """The sensor's value."""
        if (node := self.node) is None:
            return None
        value = self.entity_description.value_fn(node)
        return self._stable_boot_time(value) if self.entity_description.uptime else value


class CtrlableStorageSensor(CtrlableNodeEntity, SensorEntity):
    """Used share of one storage of a node."""

    _removed_when_gone = True

    def __init__(self, coordinator: CtrlableDataUpdateCoordinator, node: str, storage: str) -> None:
        """Name the sensor after the storage."""
        super().__init__(coordinator, STORAGE_SENSOR, node)
        self.storage_name = storage
        self._attr_unique_id = (
            f"{node_identifier(coordinator.site_id, node)}_storage_{storage}_{STORAGE_SENSOR.key}"
        )
        self._attr_translation_placeholders = {"storage": storage}

    @property
    def storage(self) -> Storage | None:
        """The storage's current data."""
        if (node := self.node) is None:
            return None
        return next((item for item in node.storages if item.storage == self.storage_name), None)

    def _is_gone(self) -> bool:
        return self.storage is None

    @property
    def available(self) -> bool:
        """Available while the node reports the storage."""
        return super().available and self.storage is not None

    @property
    def native_value(self) -> float | None:
        """Used share in percent."""
        if (storage := self.storage) is None:
            return None
        return _percent(storage.used, storage.total)


class CtrlableGuestSensor(_BootTime, CtrlableGuestEntity, SensorEntity):
    """A sensor of a guest."""

    entity_description: CtrlableGuestSensorDescription

    @property
    def native_value(self) -> StateType | datetime:
        """The sensor's value."""
        if (guest := self.guest) is None:
            return None
        value = self.entity_description.value_fn(guest)
        return self._stable_boot_time(value) if self.entity_description.uptime else value


class CtrlableInstanceSensor(CtrlableInstanceEntity, SensorEntity):
    """A sensor of an instance."""

    entity_description: CtrlableInstanceSensorDescription

    @property
    def native_value(self) -> StateType:
        """The sensor's value."""
        if (instance := self.instance) is None:
            return None
        return self.entity_description.value_fn(instance)

    @property
    def extra_state_attributes(self) -> Mapping[str, Any] | None:
        """Details of the instance (id, type, vmid, last error)."""
        if (instance := self.instance) is None or self.entity_description.attributes_fn is None:
            return None
        return self.entity_description.attributes_fn(instance)
