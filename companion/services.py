"""The objects request handlers and planes share, built once by ``app.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from .build import BuildPlane
    from .deploy import DeployPlane
    from .events import EventBus
    from .manifest import ReleaseCatalog
    from .platform import PlatformPlane
    from .provision import ProvisionPlane
    from .proxmox import ProxmoxClient
    from .releases import Releases
    from .settings import Settings
    from .state import Database


class Component(Protocol):
    """Something with background work: started after the DB is open, stopped before it closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Services:
    """Core services; each plane adds its own attribute in ``app.build_services``."""

    pve: ProxmoxClient
    build: BuildPlane
    platform: PlatformPlane
    deploy: DeployPlane
    provision: ProvisionPlane

    def __init__(
        self,
        settings: Settings,
        db: Database,
        events: EventBus,
        catalog: ReleaseCatalog,
        releases: Releases,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.catalog = catalog
        self.releases = releases
        self.components: list[Component] = []


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def services_of(request: web.Request) -> Services:
    return request.app[SERVICES]
