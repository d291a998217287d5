"""Projects, instances and stack deploys (the deploy plane's HTTP side)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..deploy import Overrides, check_hostname, check_project_name
from ..services import services_of
from ..web import Api, int_param, json_response, parse_body, parse_query

InstanceState = Literal[
    "pending",
    "cloning",
    "starting",
    "awaiting_firstboot",
    "active",
    "rolling_back",
    "failed",
    "removed",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectIn(_In):
    name: str = Field(description="slug: a-z 0-9 '-', 1-64 characters")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_project_name(value)


class InstanceIn(_In):
    project: str = Field(description="project name (created if missing)")
    type: str = Field(description="a template name of the active release")
    hostname: str = Field(description="DNS label, unique among the project's live instances")
    overrides: Overrides = Field(default_factory=Overrides)

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        return check_project_name(value)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        return check_hostname(value)


class DeployIn(_In):
    project: str = Field(description="project name (created if missing)")
    types: list[str] | None = Field(
        default=None, description="types to deploy (repeat a type for several); default: the stack"
    )
    hostname_prefix: str = Field(
        default="", max_length=40, description="hostnames are <prefix><type>-<n>"
    )
    overrides: dict[str, Overrides] = Field(
        default_factory=dict, description="per type: the overrides of its instances"
    )

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        return check_project_name(value)


class InstancesQuery(_In):
    project: str | None = None
    include_removed: bool = False


class ProjectOut(BaseModel):
    id: int
    name: str
    created_at: str


class ProjectsOut(BaseModel):
    projects: list[ProjectOut]


class InstanceOut(BaseModel):
    id: int
    project: str
    type: str
    hostname: str
    release: str
    node: str | None
    vmid: int | None
    mac: str | None
    state: InstanceState
    step: str | None
    error: str | None
    needs_binding: bool
    created_at: str
    updated_at: str


class InstancesOut(BaseModel):
    instances: list[InstanceOut]


class Skipped(BaseModel):
    type: str
    reason: str


class DeployOut(BaseModel):
    instances: list[InstanceOut]
    skipped: list[Skipped]


def register(api: Api) -> None:
    @api.route(
        "GET", "/api/v1/projects", summary="Projects (a dealer's sites)", response=ProjectsOut
    )
    async def list_projects(request: web.Request) -> web.Response:
        projects = await services_of(request).deploy.list_projects()
        return json_response({"projects": projects})

    @api.route(
        "POST",
        "/api/v1/projects",
        summary="Create a project (409 if the name exists)",
        body=ProjectIn,
        response=ProjectOut,
        status=201,
    )
    async def create_project(request: web.Request) -> web.Response:
        body = await parse_body(request, ProjectIn)
        project = await services_of(request).deploy.create_project(body.name)
        return json_response(project, status=201)

    @api.route(
        "GET",
        "/api/v1/instances",
        summary="Instances (without removed ones unless include_removed=1)",
        response=InstancesOut,
        query={"project": "only this project's", "include_removed": "1 to list removed ones"},
    )
    async def list_instances(request: web.Request) -> web.Response:
        query = parse_query(request, InstancesQuery)
        instances = await services_of(request).deploy.list_instances(
            query.project, include_removed=query.include_removed
        )
        return json_response({"instances": instances})

    @api.route("GET", "/api/v1/instances/{id}", summary="One instance", response=InstanceOut)
    async def get_instance(request: web.Request) -> web.Response:
        instance_id = int_param(request, "id")
        return json_response(await services_of(request).deploy.instance(instance_id))

    @api.route(
        "POST",
        "/api/v1/instances",
        summary="Deploy one instance; answers at once, follow instance.state events",
        body=InstanceIn,
        response=InstanceOut,
        status=202,
    )
    async def create_instance(request: web.Request) -> web.Response:
        body = await parse_body(request, InstanceIn)
        instance = await services_of(request).deploy.create_instance(
            body.project, body.type, body.hostname, body.overrides
        )
        return json_response(instance, status=202)

    @api.route(
        "POST",
        "/api/v1/deploy",
        summary="Deploy a stack (the release's default or the given types) in parallel",
        body=DeployIn,
        response=DeployOut,
        status=202,
    )
    async def deploy_stack(request: web.Request) -> web.Response:
        body = await parse_body(request, DeployIn)
        result = await services_of(request).deploy.deploy_stack(
            body.project, body.types, body.hostname_prefix, body.overrides
        )
        return json_response(result, status=202)

    @api.route(
        "DELETE",
        "/api/v1/instances/{id}",
        summary="Stop and destroy the instance's guest (ends removed)",
        response=InstanceOut,
        status=202,
    )
    async def delete_instance(request: web.Request) -> web.Response:
        instance_id = int_param(request, "id")
        return json_response(await services_of(request).deploy.remove(instance_id), status=202)
