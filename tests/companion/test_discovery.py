"""The companion announces itself as _ctrlable._tcp with its site id, and nothing secret."""

from __future__ import annotations

from pathlib import Path

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from companion.discovery import SERVICE_TYPE, Advertiser

from .conftest import API_TOKEN, make_settings


async def test_advertised_on_loopback_and_withdrawn(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, site_id="site-42", public_url="http://127.0.0.1:18580", mdns=True
    )
    advertiser = Advertiser(settings, interfaces=["127.0.0.1"])
    await advertiser.start()
    browser = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"Ctrlable site-42.{SERVICE_TYPE}")
        assert await info.async_request(browser.zeroconf, 3000)
        assert info.port == 18580
        assert info.parsed_addresses() == ["127.0.0.1"]
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        assert props["site_id"] == "site-42"
        assert props["path"] == "/api/v1"
        assert API_TOKEN not in str(props)
    finally:
        await advertiser.stop()
        await browser.async_close()
