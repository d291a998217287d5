"""The companion's HTTP core: auth on every route, the error shape, OpenAPI true to the routes."""

from __future__ import annotations

import re

from companion.app import build_api

from .conftest import Companion


def _concrete(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: "1" if m.group(1) in ("id", "vmid") else "x", path)


async def test_health_is_open(companion: Companion) -> None:
    status, body = await companion.request("GET", "/api/health", headers={"Authorization": ""})
    assert status == 200
    assert body["status"] == "ok"


async def test_every_route_but_health_rejects_missing_and_wrong_tokens(
    companion: Companion,
) -> None:
    api = build_api()
    checked = 0
    for info, _ in api.routes:
        if info.auth == "none":
            continue
        path = _concrete(info.path)
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            async with companion.session.request(
                info.method, companion.url + path, headers=header
            ) as r:
                body = await r.json()
                assert r.status == 401, (info.method, path, header)
                assert body["error"]["code"] == "unauthorized"
        checked += 1
    assert checked == len([i for i, _ in api.routes if i.auth != "none"])


async def test_unknown_route_is_json_404_after_auth(companion: Companion) -> None:
    status, body = await companion.request("GET", "/api/v1/nope")
    assert status == 404
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == "not_found"
    async with companion.session.get(companion.url + "/api/v1/nope") as r:
        assert r.status == 401


async def test_wrong_method_is_json_405(companion: Companion) -> None:
    status, body = await companion.request("DELETE", "/api/v1/releases")
    assert status == 405
    assert body["error"]["code"] == "method_not_allowed"


async def test_openapi_lists_every_route(companion: Companion) -> None:
    status, doc = await companion.request("GET", "/api/v1/openapi.json")
    assert status == 200
    registered = {(i.method.lower(), i.path) for i, _ in build_api().routes}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == registered
    mounted = {
        (r.method.lower(), r.resource.canonical)
        for r in companion.server.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert registered == mounted


async def test_events_bad_since_names_the_field(companion: Companion) -> None:
    status, body = await companion.request("GET", "/api/v1/events?since=abc")
    assert status == 400
    assert body["error"]["details"][0]["field"] == "since"


async def test_events_replay_then_live(companion: Companion) -> None:
    bus = companion.services.events
    await bus.publish("instance.state", {"id": 1, "state": "pending"})
    async with companion.session.get(
        companion.url + "/api/v1/events?since=0", headers=companion.headers
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert b"event: instance.state" in first
        assert b'"state": "pending"' in first
        await bus.publish("build.state", {"id": 7, "state": "running"})
        second = await resp.content.readuntil(b"\n\n")
        assert b"id: 2" in second
        assert b"event: build.state" in second


async def test_releases_lists_the_shipped_manifest(companion: Companion) -> None:
    status, body = await companion.request("GET", "/api/v1/releases")
    assert status == 200
    assert body["latest"] == "2026.06"
    assert body["active"] is None
    names = {t["name"] for t in body["releases"][0]["templates"]}
    assert names == {
        "ctrlable-pro",
        "zwavejs",
        "zigbee2mqtt",
        "docker-portainer",
        "frigate",
        "freepbx",
    }
