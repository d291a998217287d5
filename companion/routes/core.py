"""Health, OpenAPI, releases and the event stream."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import InvalidRequest
from ..openapi import build_openapi
from ..services import services_of
from ..web import Api, json_response, parse_query

HEARTBEAT_SECONDS = 15.0


class Health(BaseModel):
    status: str
    version: str


class EventsQuery(BaseModel):
    since: int = Field(0, ge=0, description="replay events after this id")


def register(api: Api) -> None:
    @api.route("GET", "/api/health", summary="Liveness (no auth)", auth="none", response=Health)
    async def health(request: web.Request) -> web.Response:
        return json_response(Health(status="ok", version=__version__))

    @api.route("GET", "/api/v1/openapi.json", summary="This API's OpenAPI document")
    async def openapi(request: web.Request) -> web.Response:
        return json_response(build_openapi(api))

    @api.route("GET", "/api/v1/releases", summary="Shipped releases, the active and the latest")
    async def releases(request: web.Request) -> web.Response:
        return json_response(await services_of(request).releases.describe())

    @api.route(
        "GET",
        "/api/v1/events",
        summary="Server-Sent Events: every state change, replayed after ?since=",
        query={"since": "last event id seen (default 0)"},
    )
    async def events(request: web.Request) -> web.StreamResponse:
        services = services_of(request)
        query = parse_query(request, EventsQuery)
        last = query.since
        header = request.headers.get("Last-Event-ID")
        if header:
            try:
                last = max(last, int(header))
            except ValueError:
                raise InvalidRequest.field("Last-Event-ID", "must be an integer") from None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async with services.events.subscribe() as queue:
            for event in await services.events.since(last):
                await response.write(event.as_sse())
                last = event.id
            while True:
                try:
                    live = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if live is None:
                    break
                if live.id <= last:
                    continue
                await response.write(live.as_sse())
                last = live.id
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response
