"""Config flow: user, zeroconf, reauth, reconfigure; options; the "instance" subentry (deploy)."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv6Address
from typing import Any

import voluptuous as vol
from homeassistant.config_entries import (
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryFlow,
    OptionsFlow,
    SubentryFlowResult,
)
from homeassistant.const import CONF_API_TOKEN, CONF_URL
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import ServiceValidationError
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from yarl import URL

from .api import (
    CtrlableApiError,
    CtrlableAuthenticationError,
    CtrlableClient,
    CtrlableConnectionError,
    CtrlableError,
    Overview,
)
from .const import (
    CONF_EXCLUDED_GUESTS,
    CONF_EXPOSED_GUESTS,
    CONF_SCAN_INTERVAL,
    DEFAULT_SCAN_INTERVAL,
    DOMAIN,
    LOGGER,
    MAX_SCAN_INTERVAL,
    MIN_SCAN_INTERVAL,
    SUBENTRY_TYPE_INSTANCE,
)
from .coordinator import CtrlableConfigEntry, async_apply_instances
from .services import validate_deploy_instance

DEFAULT_PORT = 8580

CONF_PROJECT = "project"
CONF_TYPE = "type"
CONF_HOSTNAME = "hostname"
CONF_INSTANCE_ID = "instance_id"

_URL_SELECTOR = TextSelector(TextSelectorConfig(type=TextSelectorType.URL))
_TOKEN_SELECTOR = TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))


class InvalidUrl(ValueError):
    """The URL is not an http(s) URL with a host."""


def normalize_url(url: str) -> str:
    """Return `scheme://host:port[/path]`; a bare host gets http and port 8580."""
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parsed = URL(text)
    except ValueError as err:
        raise InvalidUrl(url) from err
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidUrl(url)
    port = parsed.explicit_port or DEFAULT_PORT
    return str(URL.build(scheme=parsed.scheme, host=parsed.host, port=port)) + parsed.path.rstrip(
        "/"
    )


async def _async_try_connect(
    hass: HomeAssistant, url: str, token: str
) -> tuple[Overview | None, dict[str, str]]:
    """Fetch the overview with these credentials; return it, or the form errors."""
    client = CtrlableClient(url, token, async_get_clientsession(hass))
    try:
        return await client.overview(), {}
    except CtrlableAuthenticationError:
        return None, {"base": "invalid_auth"}
    except CtrlableConnectionError:
        return None, {"base": "cannot_connect"}
    except CtrlableError:
        return None, {"base": "invalid_response"}
    except Exception:  # a config flow must never crash on an odd answer
        LOGGER.exception("Unexpected error talking to the companion at %s", url)
        return None, {"base": "unknown"}


class CtrlableConfigFlow(ConfigFlow, domain=DOMAIN):
    """Connect Home Assistant to a Ctrlable companion."""

    VERSION = 1
    MINOR_VERSION = 1

    _discovered_url: str
    _discovered_name: str

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> CtrlableOptionsFlow:
        """Options: scan interval and the guests to expose."""
        return CtrlableOptionsFlow()

    @classmethod
    @callback
    def async_get_supported_subentry_types(
        cls, config_entry: ConfigEntry
    ) -> dict[str, type[ConfigSubentryFlow]]:
        """One subentry type: an instance, added by deploying it."""
        return {SUBENTRY_TYPE_INSTANCE: InstanceSubentryFlow}

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the companion's URL and API token; test them before creating the entry."""
        errors: dict[str, str] = {}
        if user_input is not None:
            try:
                url = normalize_url(user_input[CONF_URL])
            except InvalidUrl:
                errors[CONF_URL] = "invalid_url"
            else:
                token = user_input[CONF_API_TOKEN]
                overview, errors = await _async_try_connect(self.hass, url, token)
                if overview is not None:
                    await self.async_set_unique_id(overview.companion.site_id)
                    self._abort_if_unique_id_configured()
                    return self.async_create_entry(
                        title=overview.companion.name,
                        data={CONF_URL: url, CONF_API_TOKEN: token},
                    )
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(
                vol.Schema(
                    {
                        vol.Required(CONF_URL): _URL_SELECTOR,
                        vol.Required(CONF_API_TOKEN): _TOKEN_SELECTOR,
                    }
                ),
                {CONF_URL: (user_input or {}).get(CONF_URL)},
            ),
            errors=errors,
        )

    async def async_step_zeroconf(self, discovery_info: ZeroconfServiceInfo) -> ConfigFlowResult:
        """A companion announced itself over mDNS (`_ctrlable._tcp`)."""
        site_id = discovery_info.properties.get("site_id")
        if not site_id or not discovery_info.port:
            return self.async_abort(reason="invalid_discovery_info")
        host = discovery_info.host
        if isinstance(discovery_info.ip_address, IPv6Address):
            host = f"[{host}]"
        scheme = "https" if discovery_info.properties.get("scheme") == "https" else "http"
        url = f"{scheme}://{host}:{discovery_info.port}"
        await self.async_set_unique_id(site_id)
        # A known companion that moved: follow it (and reload the entry).
        self._abort_if_unique_id_configured(updates={CONF_URL: url})
        self._discovered_url = url
        self._discovered_name = discovery_info.properties.get("name") or site_id
        self.context["title_placeholders"] = {"name": self._discovered_name}
        return await self.async_step_zeroconf_confirm()

    async def async_step_zeroconf_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the API token of the discovered companion."""
        errors: dict[str, str] = {}
        if user_input is not None:
            token = user_input[CONF_API_TOKEN]
            overview, errors = await _async_try_connect(self.hass, self._discovered_url, token)
            if overview is not None:
                if overview.companion.site_id != self.unique_id:
                    return self.async_abort(reason="wrong_companion")
                return self.async_create_entry(
                    title=overview.companion.name,
                    data={CONF_URL: self._discovered_url, CONF_API_TOKEN: token},
                )
        return self.async_show_form(
            step_id="zeroconf_confirm",
            data_schema=vol.Schema({vol.Required(CONF_API_TOKEN): _TOKEN_SELECTOR}),
            description_placeholders={
                "name": self._discovered_name,
                "url": self._discovered_url,
            },
            errors=errors,
        )

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        """The companion refused the token."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for a new API token."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            token = user_input[CONF_API_TOKEN]
            overview, errors = await _async_try_connect(self.hass, entry.data[CONF_URL], token)
            if overview is not None:
                await self.async_set_unique_id(overview.companion.site_id)
                self._abort_if_unique_id_mismatch(reason="wrong_companion")
                return self.async_update_reload_and_abort(
                    entry, data_updates={CONF_API_TOKEN: token}
                )
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema({vol.Required(CONF_API_TOKEN): _TOKEN_SELECTOR}),
            description_placeholders={"name": entry.title, "url": entry.data[CONF_URL]},
            errors=errors,
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change the URL (and optionally the token) of the same companion."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            try:
                url = normalize_url(user_input[CONF_URL])
            except InvalidUrl:
                errors[CONF_URL] = "invalid_url"
            else:
                token = user_input.get(CONF_API_TOKEN) or entry.data[CONF_API_TOKEN]
                overview, errors = await _async_try_connect(self.hass, url, token)
                if overview is not None:
                    await self.async_set_unique_id(overview.companion.site_id)
                    self._abort_if_unique_id_mismatch(reason="wrong_companion")
                    return self.async_update_reload_and_abort(
                        entry, data_updates={CONF_URL: url, CONF_API_TOKEN: token}
                    )
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=self.add_suggested_values_to_schema(
                vol.Schema(
                    {
                        vol.Required(CONF_URL): _URL_SELECTOR,
                        vol.Optional(CONF_API_TOKEN): _TOKEN_SELECTOR,
                    }
                ),
                {CONF_URL: (user_input or {}).get(CONF_URL, entry.data[CONF_URL])},
            ),
            description_placeholders={"name": entry.title},
            errors=errors,
        )


class CtrlableOptionsFlow(OptionsFlow):
    """Scan interval and which guests get devices and entities."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """One form for all options."""
        entry: CtrlableConfigEntry = self.config_entry
        excluded = [str(vmid) for vmid in entry.options.get(CONF_EXCLUDED_GUESTS, [])]
        guests = []
        if entry.state is ConfigEntryState.LOADED:
            guests = [g for g in entry.runtime_data.coordinator.data.guests if not g.template]
        known = {str(guest.vmid) for guest in guests}
        if user_input is not None:
            options: dict[str, Any] = {CONF_SCAN_INTERVAL: int(user_input[CONF_SCAN_INTERVAL])}
            if guests:
                exposed = set(user_input.get(CONF_EXPOSED_GUESTS, []))
                # Guests that are gone right now keep their choice.
                excluded = [vmid for vmid in excluded if vmid not in known] + [
                    vmid for vmid in sorted(known, key=int) if vmid not in exposed
                ]
            options[CONF_EXCLUDED_GUESTS] = excluded
            return self.async_create_entry(data=options)
        fields: dict[vol.Marker, Any] = {
            vol.Required(
                CONF_SCAN_INTERVAL,
                default=entry.options.get(CONF_SCAN_INTERVAL, DEFAULT_SCAN_INTERVAL),
            ): NumberSelector(
                NumberSelectorConfig(
                    min=MIN_SCAN_INTERVAL,
                    max=MAX_SCAN_INTERVAL,
                    step=1,
                    unit_of_measurement="s",
                    mode=NumberSelectorMode.BOX,
                )
            ),
        }
        if guests:
            fields[
                vol.Optional(
                    CONF_EXPOSED_GUESTS,
                    default=sorted(known - set(excluded), key=int),
                )
            ] = SelectSelector(
                SelectSelectorConfig(
                    options=[
                        SelectOptionDict(value=str(g.vmid), label=f"{g.name} ({g.vmid})")
                        for g in sorted(guests, key=lambda g: g.vmid)
                    ],
                    multiple=True,
                    mode=SelectSelectorMode.LIST,
                )
            )
        return self.async_show_form(step_id="init", data_schema=vol.Schema(fields))


_FIELD_OF_ERROR = {
    "invalid_hostname": CONF_HOSTNAME,
    "hostname_in_use": CONF_HOSTNAME,
    "unknown_type": CONF_TYPE,
}


class InstanceSubentryFlow(ConfigSubentryFlow):
    """The deploy wizard: project, type and hostname; deploys, then records the instance."""

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Ask what to deploy, check it, deploy it."""
        entry: CtrlableConfigEntry = self._get_entry()
        if entry.state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        coordinator = entry.runtime_data.coordinator
        data = coordinator.data
        release = data.releases.get(data.releases.active)
        if release is None or not release.templates:
            return self.async_abort(reason="no_active_release")
        errors: dict[str, str] = {}
        placeholders = {"release": release.release, "message": ""}
        if user_input is not None:
            project = user_input[CONF_PROJECT].strip()
            instance_type = user_input[CONF_TYPE]
            hostname = user_input[CONF_HOSTNAME].strip().lower()
            try:
                validate_deploy_instance(data, instance_type, hostname)
            except ServiceValidationError as err:
                key = err.translation_key or "unknown"
                errors[_FIELD_OF_ERROR.get(key, "base")] = key
            if not project:
                errors[CONF_PROJECT] = "invalid_project"
            if not errors:
                try:
                    instance = await coordinator.client.create_instance(
                        project=project, instance_type=instance_type, hostname=hostname
                    )
                except CtrlableAuthenticationError:
                    entry.async_start_reauth(self.hass)
                    errors["base"] = "invalid_auth"
                except CtrlableConnectionError:
                    errors["base"] = "cannot_connect"
                except CtrlableApiError as err:
                    errors["base"] = "deploy_rejected"
                    placeholders["message"] = err.message
                except CtrlableError as err:
                    errors["base"] = "deploy_failed"
                    placeholders["message"] = str(err)
                else:
                    async_apply_instances(coordinator, [instance])
                    await coordinator.async_request_refresh()
                    return self.async_create_entry(
                        title=instance.hostname,
                        data={
                            CONF_PROJECT: instance.project,
                            CONF_TYPE: instance.type,
                            CONF_HOSTNAME: instance.hostname,
                            CONF_INSTANCE_ID: instance.id,
                        },
                        unique_id=f"instance_{instance.id}",
                        description="deployed",
                        description_placeholders={
                            "hostname": instance.hostname,
                            "project": instance.project,
                            "id": str(instance.id),
                            "state": instance.state,
                        },
                    )
        projects = sorted({project.name for project in data.projects})
        schema = vol.Schema(
            {
                vol.Required(CONF_PROJECT): SelectSelector(
                    SelectSelectorConfig(
                        options=projects, custom_value=True, mode=SelectSelectorMode.DROPDOWN
                    )
                ),
                vol.Required(CONF_TYPE): SelectSelector(
                    SelectSelectorConfig(
                        options=[
                            SelectOptionDict(
                                value=template.name,
                                label=f"{template.name} ({template.app_version})"
                                if template.app_version
                                else template.name,
                            )
                            for template in release.templates
                        ],
                        mode=SelectSelectorMode.DROPDOWN,
                    )
                ),
                vol.Required(CONF_HOSTNAME): TextSelector(),
            }
        )
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(schema, user_input or {}),
            description_placeholders=placeholders,
            errors=errors,
        )
