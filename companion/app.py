"""The aiohttp application factory: services, routes, middlewares, start-up and shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .build import BuildPlane
from .deploy import DeployPlane
from .discovery import Advertiser
from .events import EventBus
from .haos import HaosHandler
from .manifest import ReleaseCatalog
from .platform import PlatformPlane
from .provision import ProvisionPlane
from .proxmox import ProxmoxClient, ProxmoxError
from .releases import Releases
from .routes import build as build_routes
from .routes import core, host, overview
from .routes import deploy as deploy_routes
from .routes import provision as provision_routes
from .services import SERVICES, Services
from .settings import Settings
from .state import Database
from .web import Api, auth_middleware_factory, error_middleware_factory

_LOGGER = logging.getLogger(__name__)

# Each plane's routes; a plane adds its module here.
ROUTE_MODULES = [core, host, overview, deploy_routes, provision_routes, build_routes]

MAX_BODY = 4 * 1024 * 1024


def build_api() -> Api:
    api = Api()
    for module in ROUTE_MODULES:
        module.register(api)
    return api


async def build_services(settings: Settings) -> Services:
    """Open the DB and build every plane. Planes add themselves below, in dependency order."""
    db = await Database.open(settings.db_path)
    events = EventBus(db)
    catalog = ReleaseCatalog.load(settings.releases_dir)
    releases = Releases(db, catalog, events)
    await releases.sync_catalog()
    services = Services(settings, db, events, catalog, releases)
    services.pve = ProxmoxClient.from_settings(settings)
    services.components.append(services.pve)
    services.platform = PlatformPlane(settings, db, events, releases)
    services.components.append(services.platform)
    services.provision = ProvisionPlane(settings, db, events)
    services.build = BuildPlane(settings, db, events, catalog, releases)
    services.components.append(services.build)
    services.deploy = DeployPlane(services)
    services.components.append(services.deploy)
    # ctrlable-pro: the HAOS flow is the deploy plane's ``vm`` kind; it also keeps the apps'
    # MQTT logins in the VM's HA in sync and adds the ``ha`` facts to the platform report.
    haos = HaosHandler(services)
    services.deploy.register_kind(haos)
    services.components.append(haos)
    services.platform.add_instance_extras(haos.report_extras)
    services.components.append(TemplateAdoption(services))
    if settings.mdns:
        services.components.append(Advertiser(settings))
    return services


class TemplateAdoption:
    """On start, adopt the templates the build wrapper left on the host (tagged ``ctrlable``),
    so a site whose DB is new still knows its active release. Best effort: PVE may be down."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def start(self) -> None:
        try:
            guests = await self._services.pve.guests()
        except ProxmoxError as err:
            _LOGGER.warning("template adoption skipped: %s", err)
            return
        activated = await self._services.releases.adopt([g.resource() for g in guests])
        if activated:
            _LOGGER.info("adopted templates from the host; active release %s", activated[-1])

    async def stop(self) -> None:
        return None


def create_app(settings: Settings, services: Services | None = None) -> web.Application:
    api = build_api()
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[
            error_middleware_factory(),
            provision_routes.guard_middleware(),
            auth_middleware_factory(
                api,
                bearer_token=settings.api_token.get_secret_value,
                firstboot_secret=settings.firstboot_secret.get_secret_value,
            ),
        ],
    )
    api.mount(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        built = services if services is not None else await build_services(settings)
        app[SERVICES] = built
        started = []
        try:
            for component in built.components:
                await component.start()
                started.append(component)
            _LOGGER.info(
                "companion ready on %s:%s (data %s)",
                settings.listen_host,
                settings.listen_port,
                settings.data_dir,
            )
            yield
        finally:
            for component in reversed(started):
                try:
                    await component.stop()
                except Exception:
                    _LOGGER.exception("error stopping %s", type(component).__name__)
            await built.events.close()
            if services is None:
                await built.db.close()

    async def end_streams(app: web.Application) -> None:
        # Open event streams end first, so shutdown does not wait on them.
        if SERVICES in app:
            await app[SERVICES].events.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)  # type: ignore[arg-type, unused-ignore]  # aiosignal varies
    return app
