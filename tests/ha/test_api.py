"""The companion client (api.py) against a small aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ha_common import load_json

from custom_components.ctrlable import api as api_module
from custom_components.ctrlable.api import (
    CtrlableApiError,
    CtrlableAuthenticationError,
    CtrlableClient,
    CtrlableConnectionError,
    CtrlableEvent,
    CtrlableResponseError,
    Overview,
    SseParser,
)

TOKEN = "secret-token"

type Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Companion:
    """A fake companion: routes answer what the test sets; requests are recorded."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response(
                {"error": {"code": "not_found", "message": "no route", "details": None}},
                status=404,
            )
        return await handler(request)

    def json(self, method: str, path: str, data: Any, status: int = 200) -> None:
        async def _handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(data, status=status)

        self.routes[(method, path)] = _handler


@pytest.fixture
async def companion(socket_enabled: None) -> AsyncIterator[tuple[Companion, str]]:
    """The fake companion, listening on 127.0.0.1 on a free port."""
    fake = Companion()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session (Home Assistant's shared one in production)."""
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def test_overview_sends_bearer_token_and_parses(
    companion: tuple[Companion, str], session: aiohttp.ClientSession
) -> None:
    """The token goes in the Authorization header, never in the URL; the answer is typed."""
    fake, url = companion
    fake.json("GET", "/api/v1/overview", load_json("overview.json"))
    client = CtrlableClient(url + "/", TOKEN, session)

    overview = await client.overview()

    assert isinstance(overview, Overview)
    assert overview.companion.site_id == "site-1"
    assert overview.guest(101) is not None
    assert overview.guest(999) is None
    assert overview.node("pve") is not None
    assert overview.instance(4) is not None
    assert overview.instance(99) is None
    assert overview.last_event_id == 42
    assert overview.releases.get("2026.06") is not None
    assert overview.builds[0].templates["zwavejs"].percent == 100
    method, path, headers, _ = fake.requests[0]
    assert (method, path) == ("GET", "/api/v1/overview")
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in path
    assert client.url == url


async def test_health_needs_no_token(
    companion: tuple[Companion, str], session: aiohttp.ClientSession
) -> None:
    """GET /api/health is the only call without the token."""
    fake, url = companion
    fake.json("GET", "/api/health", {"status": "ok", "version": "0.1.0"})
    assert await CtrlableClient(url, TOKEN, session).health() == "0.1.0"
    assert "Authorization" not in fake.requests[0][2]


async def test_write_calls(
    companion: tuple[Companion, str], session: aiohttp.ClientSession
) -> None:
    """Every write call sends the documented body to the documented route."""
    fake, url = companion
    instance = load_json("instance_pending.json")
    fake.json("POST", "/api/v1/instances", instance, status=202)
    fake.json("POST", "/api/v1/deploy", load_json("deploy.json"), status=202)
    fake.json("DELETE", "/api/v1/instances/5", {**instance, "state": "removed"}, status=202)
    fake.json("GET", "/api/v1/instances/5", instance)
    fake.json("POST", "/api/v1/guests/101/reboot", load_json("guest_action.json"))
    fake.json("POST", "/api/v1/releases/2026.06/build", load_json("build_queued.json"), 202)
    fake.json("GET", "/api/v1/builds/2", load_json("build_queued.json"))
    client = CtrlableClient(url, TOKEN, session)

    created = await client.create_instance(
        project="jones-flat", instance_type="zwavejs", hostname="zwavejs-2"
    )
    deployed = await client.deploy(project="jones-flat", types=["zwavejs"], hostname_prefix="jf-")
    await client.deploy(project="jones-flat")
    removed = await client.delete_instance(5)
    fetched = await client.instance(5)
    action = await client.guest_action(101, "reboot")
    build = await client.build_release("2026.06", ["zwavejs"])
    await client.build_release("2026.06")
    fetched_build = await client.build(2)

    assert created.id == 5
    assert created.state == "pending"
    assert [item.hostname for item in deployed] == ["jf-zwavejs", "jf-zigbee2mqtt"]
    assert removed.state == "removed"
    assert fetched.hostname == "zwavejs-2"
    assert (action.vmid, action.action, action.status) == (101, "reboot", "running")
    assert build.state == "queued"
    assert fetched_build.id == 2
    bodies = [(method, path, body) for method, path, _, body in fake.requests]
    assert bodies == [
        (
            "POST",
            "/api/v1/instances",
            {"project": "jones-flat", "type": "zwavejs", "hostname": "zwavejs-2", "overrides": {}},
        ),
        (
            "POST",
            "/api/v1/deploy",
            {"project": "jones-flat", "types": ["zwavejs"], "hostname_prefix": "jf-"},
        ),
        ("POST", "/api/v1/deploy", {"project": "jones-flat"}),
        ("DELETE", "/api/v1/instances/5", None),
        ("GET", "/api/v1/instances/5", None),
        ("POST", "/api/v1/guests/101/reboot", None),
        ("POST", "/api/v1/releases/2026.06/build", {"templates": ["zwavejs"]}),
        ("POST", "/api/v1/releases/2026.06/build", {}),
        ("GET", "/api/v1/builds/2", None),
    ]


def _error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


@pytest.mark.parametrize(
    ("status", "body", "error", "code"),
    [
        (401, _error("unauthorized", "bad token"), CtrlableAuthenticationError, None),
        (401, "nope", CtrlableAuthenticationError, None),
        (
            400,
            _error("invalid_request", "bad", [{"field": "hostname", "message": "x"}]),
            CtrlableApiError,
            "invalid_request",
        ),
        (409, _error("build_running", "busy"), CtrlableApiError, "build_running"),
        (500, "<html>oops</html>", CtrlableApiError, "http_error"),
    ],
)
async def test_error_mapping(
    companion: tuple[Companion, str],
    session: aiohttp.ClientSession,
    status: int,
    body: Any,
    error: type[Exception],
    code: str | None,
) -> None:
    """HTTP errors become the client's own exceptions, with the companion's code and message."""
    fake, url = companion

    async def _handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)

    fake.routes[("GET", "/api/v1/overview")] = _handler
    with pytest.raises(error) as info:
        await CtrlableClient(url, TOKEN, session).overview()
    if code is not None:
        assert isinstance(info.value, CtrlableApiError)
        assert info.value.status == status
        assert info.value.code == code
    if status == 400:
        assert isinstance(info.value, CtrlableApiError)
        assert info.value.details == [{"field": "hostname", "message": "x"}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "body is not JSON"),
        ([], "field 'body' must be an object"),
        (
            {"companion": {"version": "1", "site_id": 3, "name": "x"}},
            "field 'site_id' must be a string",
        ),
    ],
)
async def test_invalid_answers(
    companion: tuple[Companion, str], session: aiohttp.ClientSession, body: Any, message: str
) -> None:
    """An answer that breaks the contract is a CtrlableResponseError naming the field."""
    fake, url = companion

    async def _handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(text=body)
        return web.json_response(body)

    fake.routes[("GET", "/api/v1/overview")] = _handler
    with pytest.raises(CtrlableResponseError, match=message):
        await CtrlableClient(url, TOKEN, session).overview()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vmid", "101", "'vmid' must be an integer"),
        ("vmid", True, "'vmid' must be an integer"),
        ("vmid", None, "'vmid' must be an integer"),
        ("cpu", "high", "'cpu' must be a number"),
        ("mem", "lots", "'mem' must be a number"),
        ("template", "no", "'template' must be a boolean"),
        ("instance_id", 1.5, "'instance_id' must be an integer or null"),
        ("name", 5, "'name' must be a string or null"),
    ],
)
def test_guest_field_validation(field: str, value: Any, message: str) -> None:
    """Each field is checked for its type; the error names it."""
    data = load_json("overview.json")
    data["guests"][0][field] = value
    with pytest.raises(CtrlableResponseError, match=message):
        Overview.from_dict(data)


def test_lenient_parsing() -> None:
    """Optional blocks may be missing; sizes may be floats; a nameless guest gets a name."""
    data = load_json("overview.json")
    del data["problems"]
    del data["last_event_id"]
    data["nodes"][0]["storages"] = None
    data["nodes"][0]["mem"] = 1.5e9
    data["guests"][0]["name"] = None
    data["releases"]["releases"][0]["templates"] = None
    data["builds"][0]["templates"] = None
    overview = Overview.from_dict(data)
    assert overview.problems == ()
    assert overview.last_event_id == 0
    assert overview.nodes[0].storages == ()
    assert overview.nodes[0].mem == 1500000000
    assert overview.guests[0].name == "guest-101"
    assert overview.releases.releases[0].templates == ()
    assert overview.builds[0].templates == {}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(guests={}), "'guests' must be a list"),
        (lambda d: d.update(guests=[1]), "'guests' must be an object"),
        (lambda d: d["projects"][0].update(created_at="yesterday"), "'created_at' must be an ISO"),
        (lambda d: d["builds"][0].update(templates=[1]), "'templates' must be an object"),
    ],
)
def test_structure_validation(mutate: Callable[[dict[str, Any]], Any], message: str) -> None:
    """Lists, objects and times are checked too."""
    data = load_json("overview.json")
    mutate(data)
    with pytest.raises(CtrlableResponseError, match=message):
        Overview.from_dict(data)


async def test_connection_refused(session: aiohttp.ClientSession, socket_enabled: None) -> None:
    """Nothing listening: a connection error."""
    with pytest.raises(CtrlableConnectionError, match="cannot reach the companion"):
        await CtrlableClient("http://127.0.0.1:9", TOKEN, session).overview()


async def test_timeout(companion: tuple[Companion, str], session: aiohttp.ClientSession) -> None:
    """A companion that does not answer in time: a connection error."""
    fake, url = companion

    async def _slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({})

    fake.routes[("GET", "/api/v1/overview")] = _slow
    with pytest.raises(CtrlableConnectionError, match="timeout"):
        await CtrlableClient(url, TOKEN, session, request_timeout=0.05).overview()


def test_sse_parser() -> None:
    """The text/event-stream grammar: fields, comments, multi-line data, blank-line dispatch."""
    parser = SseParser()
    lines = [
        ": keep-alive",
        "",
        "id: 7",
        "event: build.progress",
        'data: {"id": 2,',
        'data:  "percent": 40}',
        "",
        "id: x",
        "data: plain text",
        "retry: 1000",
        "",
        "event: lonely",
        "",
        "data:{}",
        "",
    ]
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    assert events == [
        CtrlableEvent(id=7, event="build.progress", data={"id": 2, "percent": 40}),
        CtrlableEvent(id=None, event="message", data="plain text"),
        CtrlableEvent(id=None, event="message", data={}),
    ]


async def test_event_stream(
    companion: tuple[Companion, str], session: aiohttp.ClientSession
) -> None:
    """Events are read as they come, with `since` in the query and the token in the header."""
    fake, url = companion

    async def _events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        await response.write(b'id: 43\r\nevent: instance.state\r\ndata: {"id": 3}\r\n\r\n')
        await response.write(b'id: 44\nevent: release.active\ndata: {"release": "2026.06"}\n\n')
        await response.write_eof()
        return response

    fake.routes[("GET", "/api/v1/events")] = _events
    client = CtrlableClient(url, TOKEN, session)
    events = [event async for event in client.events(since=42)]
    assert events == [
        CtrlableEvent(id=43, event="instance.state", data={"id": 3}),
        CtrlableEvent(id=44, event="release.active", data={"release": "2026.06"}),
    ]
    _, path, headers, _ = fake.requests[0]
    assert path == "/api/v1/events?since=42"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "text/event-stream"
    assert [event async for event in client.events()] == events
    assert fake.requests[1][1] == "/api/v1/events"


async def test_event_stream_errors(
    companion: tuple[Companion, str],
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused token, bad bytes, silence and a dropped connection map to client errors."""
    fake, url = companion
    client = CtrlableClient(url, TOKEN, session)

    fake.json("GET", "/api/v1/events", {"error": {"code": "unauthorized", "message": "no"}}, 401)
    with pytest.raises(CtrlableAuthenticationError):
        [event async for event in client.events()]

    async def _bad_bytes(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: \xff\xfe\n\n")
        return response

    fake.routes[("GET", "/api/v1/events")] = _bad_bytes
    with pytest.raises(CtrlableResponseError, match="not UTF-8"):
        [event async for event in client.events()]

    async def _silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await asyncio.sleep(5)
        return response

    monkeypatch.setattr(api_module, "EVENT_STREAM_READ_TIMEOUT", 0.05)
    fake.routes[("GET", "/api/v1/events")] = _silent
    with pytest.raises(CtrlableConnectionError, match="went silent"):
        [event async for event in client.events()]

    async def _dropped(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"data: {}\n")
        assert request.transport is not None
        request.transport.close()
        return response

    fake.routes[("GET", "/api/v1/events")] = _dropped
    with pytest.raises(CtrlableConnectionError, match="event stream lost"):
        [event async for event in client.events()]

    async def _long_line(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: " + b"x" * (2**18) + b"\n\n")
        return response

    fake.routes[("GET", "/api/v1/events")] = _long_line
    with pytest.raises(CtrlableResponseError, match="invalid event stream"):
        [event async for event in client.events()]


def test_api_error_text() -> None:
    """The exception text shows the companion's code and message."""
    assert str(CtrlableApiError(409, "build_running", "busy")) == "build_running: busy"
    assert json.dumps(CtrlableApiError(400, "x", "y", [1]).details) == "[1]"
