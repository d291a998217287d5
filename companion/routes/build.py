"""Template builds: start one, follow it, cancel it; the manifest the host's wrapper fetches."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..errors import NotFound
from ..services import services_of
from ..web import Api, int_param, json_response, parse_body

TEMPLATE_NAME = r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$"


class BuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    templates: list[Annotated[str, Field(pattern=TEMPLATE_NAME)]] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="templates to build (default: every template of the release)",
    )

    def names(self) -> list[str] | None:
        return None if self.templates is None else list(self.templates)


class BuildTemplateOut(BaseModel):
    state: str
    percent: int
    step: str | None = None
    message: str | None = None
    error: str | None = None
    template_vmid: int | None = None
    node: str | None = None
    builder_ref: str | None = None
    builder_sha: str | None = None
    app_version: str | None = None


class BuildOut(BaseModel):
    id: int
    release: str
    state: str
    percent: int
    templates: dict[str, BuildTemplateOut]
    requested: list[str]
    error: str | None
    log_tail: list[str]
    started_at: str
    finished_at: str | None


def register(api: Api) -> None:
    @api.route(
        "POST",
        "/api/v1/releases/{release}/build",
        summary="Build a release's templates on the PVE host (409 while a build runs)",
        body=BuildRequest,
        response=BuildOut,
        status=202,
        tag="build",
    )
    async def start_build(request: web.Request) -> web.Response:
        body = await parse_body(request, BuildRequest)
        built = await services_of(request).build.start_build(
            request.match_info["release"], body.names()
        )
        return json_response(built, status=202)

    @api.route(
        "GET",
        "/api/v1/builds/{id}",
        summary="One build and its progress",
        response=BuildOut,
        tag="build",
    )
    async def get_build(request: web.Request) -> web.Response:
        return json_response(await services_of(request).build.get(int_param(request, "id")))

    @api.route(
        "POST",
        "/api/v1/builds/{id}/cancel",
        summary="Stop the running build; the host destroys its half-built guest",
        response=BuildOut,
        status=202,
        tag="build",
    )
    async def cancel_build(request: web.Request) -> web.Response:
        built = await services_of(request).build.cancel(int_param(request, "id"))
        return json_response(built, status=202)

    @api.route(
        "GET",
        "/api/v1/releases/{release}/manifest",
        summary="A release manifest as JSON, plus what the host's build wrapper needs (`build`)",
        tag="build",
    )
    async def manifest(request: web.Request) -> web.Response:
        services = services_of(request)
        release = request.match_info["release"]
        shipped = services.catalog.shipped(release)
        if shipped is None:
            raise NotFound(f"release {release!r} is not shipped with this companion")
        data: dict[str, Any] = shipped.manifest.model_dump(mode="json")
        secret = services.settings.firstboot_secret.get_secret_value()
        data["build"] = {
            "manifest_sha256": shipped.sha256,
            "companion_url": services.settings.public_url,
            "firstboot_secret": secret or None,
        }
        return json_response(data)
