"""The one place where companion client errors become Home Assistant errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate

from homeassistant.exceptions import HomeAssistantError, ServiceValidationError

from .api import (
    CtrlableApiError,
    CtrlableAuthenticationError,
    CtrlableConnectionError,
    CtrlableError,
)
from .const import DOMAIN
from .coordinator import CtrlableConfigEntry
from .entity import CtrlableEntity


@contextmanager
def companion_errors(entry: CtrlableConfigEntry) -> Iterator[None]:
    """Turn client errors raised inside the block into translated `HomeAssistantError`s.

    A refused token also starts the re-authentication flow of the entry.
    """
    try:
        yield
    except CtrlableAuthenticationError as err:
        entry.async_start_reauth(entry.runtime_data.coordinator.hass)
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="invalid_auth") from err
    except CtrlableConnectionError as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="cannot_connect",
            translation_placeholders={"error": str(err)},
        ) from err
    except CtrlableApiError as err:
        if err.status == 400:
            # The companion refused the request itself (e.g. a name it does not accept).
            raise ServiceValidationError(
                translation_domain=DOMAIN,
                translation_key="invalid_request",
                translation_placeholders={"message": _describe(err)},
            ) from err
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="api_error",
            translation_placeholders={"code": err.code, "message": err.message},
        ) from err
    except CtrlableError as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="unexpected_response",
            translation_placeholders={"error": str(err)},
        ) from err


def _describe(err: CtrlableApiError) -> str:
    """The companion's message, with the fields it names (`details` of invalid_request)."""
    fields = []
    if isinstance(err.details, list):
        for item in err.details:
            if isinstance(item, dict) and "field" in item:
                fields.append(f"{item['field']}: {item.get('message', 'invalid')}")
    return f"{err.message} ({'; '.join(fields)})" if fields else err.message


def companion_action[_EntityT: CtrlableEntity, **_P](
    func: Callable[Concatenate[_EntityT, _P], Awaitable[Any]],
) -> Callable[Concatenate[_EntityT, _P], Coroutine[Any, Any, None]]:
    """Decorate an entity action: translate client errors, then refresh the data."""

    async def handler(self: _EntityT, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        with companion_errors(self.coordinator.config_entry):
            await func(self, *args, **kwargs)
        await self.coordinator.async_request_refresh()

    return handler
