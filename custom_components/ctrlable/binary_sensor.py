"""Binary sensors: node online, platform report-up connection."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from homeassistant.components.binary_sensor import (
    BinarySensorDeviceClass,
    BinarySensorEntity,
    BinarySensorEntityDescription,
)
from homeassistant.const import EntityCategory
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import Node, Overview
from .coordinator import CtrlableConfigEntry
from .entity import CtrlableCompanionEntity, CtrlableNodeEntity, async_add_dynamic_entities

# Read-only entities fed by the coordinator.
PARALLEL_UPDATES = 0


@dataclass(frozen=True, kw_only=True)
class CtrlableCompanionBinarySensorDescription(BinarySensorEntityDescription):
    """A binary sensor of the companion."""

    is_on_fn: Callable[[Overview], bool | None]


@dataclass(frozen=True, kw_only=True)
class CtrlableNodeBinarySensorDescription(BinarySensorEntityDescription):
    """A binary sensor of a node."""

    is_on_fn: Callable[[Node], bool | None]


COMPANION_BINARY_SENSORS: tuple[CtrlableCompanionBinarySensorDescription, ...] = (
    CtrlableCompanionBinarySensorDescription(
        key="platform_connection",
        translation_key="platform_connection",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        entity_category=EntityCategory.DIAGNOSTIC,
        is_on_fn=lambda data: data.platform.unreachable_since is None,
    ),
)

NODE_BINARY_SENSORS: tuple[CtrlableNodeBinarySensorDescription, ...] = (
    CtrlableNodeBinarySensorDescription(
        key="status",
        translation_key="node_status",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        is_on_fn=lambda node: node.status == "online",
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: CtrlableConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Set up the binary sensors, and add node ones as nodes appear."""
    coordinator = entry.runtime_data.coordinator
    async_add_entities(
        CtrlableCompanionBinarySensor(coordinator, description)
        for description in COMPANION_BINARY_SENSORS
    )

    def _node_entities(name: str) -> Iterable[BinarySensorEntity]:
        return [
            CtrlableNodeBinarySensor(coordinator, description, name)
            for description in NODE_BINARY_SENSORS
        ]

    async_add_dynamic_entities(
        entry,
        async_add_entities,
        lambda: [node.node for node in coordinator.data.nodes],
        _node_entities,
    )


class CtrlableCompanionBinarySensor(CtrlableCompanionEntity, BinarySensorEntity):
    """A binary sensor of the companion."""

    entity_description: CtrlableCompanionBinarySensorDescription

    @property
    def is_on(self) -> bool | None:
        """The sensor's state."""
        return self.entity_description.is_on_fn(self.coordinator.data)


class CtrlableNodeBinarySensor(CtrlableNodeEntity, BinarySensorEntity):
    """A binary sensor of a node."""

    entity_description: CtrlableNodeBinarySensorDescription

    @property
    def is_on(self) -> bool | None:
        """The sensor's state."""
        if (node := self.node) is None:
            return None
        return self.entity_description.is_on_fn(node)
