"""First-boot routes: ``GET /api/provision/assignment`` and ``POST /api/provision/complete``.

Both authenticate with the per-release secret in ``X-Ctrlable-Secret`` (checked by the core's
auth middleware, constant time). ``guard_middleware`` runs before that check, so every attempt
from an address counts against its rate limit, failed ones included, and a secret put in the
URL is refused before anything else looks at the request.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ApiError, InvalidRequest
from ..provision import RateLimited
from ..services import services_of
from ..web import Api, Handler, json_response, parse_body, parse_query

PREFIX = "/api/provision/"
MAX_REPORT = 64 * 1024


class ReportTooLarge(ApiError):
    status = 413
    code = "too_large"


class AssignmentQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str = Field(min_length=1, max_length=63, description="the guest's hostname")
    mac: str = Field(min_length=17, max_length=17, description="the guest's eth0 MAC")


class CompleteBody(BaseModel):
    """``hostname`` and ``mac`` identify the guest; every other field is its report."""

    model_config = ConfigDict(extra="allow")

    hostname: str = Field(min_length=1, max_length=63)
    mac: str = Field(min_length=17, max_length=17)


class Assignment(BaseModel):
    """What the guest applies (per type; see docs/firstboot.md)."""

    model_config = ConfigDict(extra="allow")

    version: int
    instance_id: int
    type: str
    hostname: str
    release: str
    wiring: dict[str, Any]
    needs_binding: list[str]


class Completed(BaseModel):
    instance_id: int
    state: str


def client_of(request: web.Request) -> str:
    return request.remote or "unknown"


def guard_middleware() -> Middleware:
    """Rate limit per client address and refuse a secret in the URL, before authentication."""

    @web.middleware
    async def provision_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX):
            return await handler(request)
        try:
            provision = getattr(services_of(request), "provision", None)
            if provision is not None:
                provision.check_ip(client_of(request))
            if any(key.lower() in ("secret", "x-ctrlable-secret") for key in request.query):
                raise InvalidRequest.field(
                    "secret", "must be sent in the X-Ctrlable-Secret header, never in the URL"
                )
            return await handler(request)
        except RateLimited as err:
            response = json_response(err.body(), status=err.status)
            response.headers["Retry-After"] = str(err.retry_after)
            return response

    return provision_guard


def register(api: Api) -> None:
    @api.route(
        "GET",
        "/api/provision/assignment",
        summary="A guest's first-boot assignment (bound to its hostname and MAC)",
        auth="firstboot",
        response=Assignment,
        query={"hostname": "the guest's hostname", "mac": "the MAC of the guest's eth0"},
        tag="provision",
    )
    async def assignment(request: web.Request) -> web.Response:
        query = parse_query(request, AssignmentQuery)
        served = await services_of(request).provision.serve(
            query.hostname, query.mac, client_of(request)
        )
        return json_response(served.payload)

    @api.route(
        "POST",
        "/api/provision/complete",
        summary="A guest reports its first boot done; consumes the assignment",
        auth="firstboot",
        body=CompleteBody,
        response=Completed,
        tag="provision",
    )
    async def complete(request: web.Request) -> web.Response:
        services = services_of(request)
        if len(await request.read()) > MAX_REPORT:
            raise ReportTooLarge(f"the report is larger than {MAX_REPORT} bytes")
        body = await parse_body(request, CompleteBody)
        report = dict(body.model_extra or {})
        deploy = getattr(services, "deploy", None)
        on_completed = (
            deploy.firstboot_completed if deploy is not None else services.provision.mark_active
        )
        instance_id = await services.provision.complete(
            body.hostname, body.mac, client_of(request), report, on_completed
        )
        return json_response(Completed(instance_id=instance_id, state="active"))
