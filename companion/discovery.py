"""mDNS advertisement of the companion as ``_ctrlable._tcp`` so Home Assistant discovers it."""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from . import __version__
from .settings import Settings

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_ctrlable._tcp.local."


def service_info(settings: Settings) -> AsyncServiceInfo:
    """What we announce: where the API is and which site it is. Never a secret."""
    public = urlsplit(settings.public_url)
    host = public.hostname or settings.listen_host
    port = public.port or settings.listen_port
    try:
        addresses = [socket.inet_aton(socket.gethostbyname(host))]
    except OSError:
        addresses = []
    name = f"Ctrlable {settings.site_id}.{SERVICE_TYPE}"
    return AsyncServiceInfo(
        SERVICE_TYPE,
        name,
        addresses=addresses,
        port=port,
        properties={
            "site_id": settings.site_id,
            "version": __version__,
            "path": "/api/v1",
            "scheme": public.scheme or "http",
        },
        server=f"ctrlable-{settings.site_id}.local.",
    )


class Advertiser:
    """A Component: registers the service on start, unregisters on stop."""

    def __init__(self, settings: Settings, interfaces: list[str] | None = None) -> None:
        self._settings = settings
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        kwargs = {"interfaces": self._interfaces} if self._interfaces else {}
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only, **kwargs)  # type: ignore[arg-type]
        self._info = service_info(self._settings)
        await self._zc.async_register_service(self._info, allow_name_change=True)
        _LOGGER.info("advertising %s on mDNS", self._info.name)

    async def stop(self) -> None:
        if self._zc is None:
            return
        if self._info is not None:
            await self._zc.async_unregister_service(self._info)
        await self._zc.async_close()
        self._zc = None
