"""Power buttons for every guest: start, stop, shut down, reboot."""

from __future__ import annotations

from collections.abc import Iterable

from homeassistant.components.button import (
    ButtonDeviceClass,
    ButtonEntity,
    ButtonEntityDescription,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .const import GUEST_ACTIONS
from .coordinator import CtrlableConfigEntry
from .entity import CtrlableGuestEntity, async_add_dynamic_entities
from .helpers import companion_action

# One power action at a time per guest platform; the companion serialises PVE tasks anyway.
PARALLEL_UPDATES = 1

# Enabled by default: dealers do not go looking for hidden controls.
GUEST_BUTTONS: tuple[ButtonEntityDescription, ...] = tuple(
    ButtonEntityDescription(
        key=action,
        translation_key=action,
        device_class=ButtonDeviceClass.RESTART if action == "reboot" else None,
    )
    for action in GUEST_ACTIONS
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: CtrlableConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Set up the buttons of every exposed guest, now and as guests appear."""
    coordinator = entry.runtime_data.coordinator

    def _guest_buttons(vmid: int) -> Iterable[ButtonEntity]:
        if (guest := coordinator.data.guest(vmid)) is None:
            return []
        return [
            CtrlableGuestButton(coordinator, description, guest) for description in GUEST_BUTTONS
        ]

    async_add_dynamic_entities(
        entry,
        async_add_entities,
        lambda: [guest.vmid for guest in coordinator.exposed_guests()],
        _guest_buttons,
    )


class CtrlableGuestButton(CtrlableGuestEntity, ButtonEntity):
    """Runs one power action on a guest through the companion."""

    @companion_action
    async def async_press(self) -> None:
        """Ask the companion to run the action."""
        await self.coordinator.client.guest_action(self.vmid, self.entity_description.key)
