"""The thin HTTP layer: a route registry that also feeds OpenAPI, body parsing and middlewares."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ValidationError

from .errors import ApiError, InvalidRequest, Unauthorized

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["bearer", "firstboot", "none"]
ModelT = TypeVar("ModelT", bound=BaseModel)

SECRET_HEADER = "X-Ctrlable-Secret"  # noqa: S105 - a header name


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What OpenAPI needs to know of one route."""

    method: str
    path: str
    summary: str
    auth: Auth
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)
    tag: str = "companion"


class Api:
    """Collects routes with their metadata; `app.py` mounts them and `openapi.py` documents them."""

    def __init__(self) -> None:
        self.routes: list[tuple[RouteInfo, Handler]] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        auth: Auth = "bearer",
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        query: dict[str, str] | None = None,
        tag: str = "companion",
    ) -> Callable[[Handler], Handler]:
        info = RouteInfo(
            method.upper(), path, summary, auth, body, response, status, query or {}, tag
        )

        def decorator(handler: Handler) -> Handler:
            self.routes.append((info, handler))
            return handler

        return decorator

    def auth_of(self, method: str, resource: str | None) -> Auth | None:
        for info, _ in self.routes:
            if info.path == resource and method in (info.method, "HEAD"):
                return info.auth
        return None

    def mount(self, app: web.Application) -> None:
        for info, handler in self.routes:
            app.router.add_route(info.method, info.path, handler)


def json_response(data: Any, status: int = 200) -> web.Response:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, default=str)
    return web.Response(text=text, status=status, content_type="application/json")


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def validation_error(err: ValidationError, prefix: str = "") -> InvalidRequest:
    details = [{"field": prefix + _loc(e["loc"]), "message": e["msg"]} for e in err.errors()]
    first = details[0]
    return InvalidRequest(f"{first['field']}: {first['message']}", details=details)


async def parse_body(request: web.Request, model: type[ModelT]) -> ModelT:
    """Read a JSON object body into ``model``; a missing or broken body is a 400 naming it."""
    raw = await request.read()
    if not raw:
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            raise InvalidRequest.field("body", "is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest.field("body", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def parse_query(request: web.Request, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as err:
        raise validation_error(err) from None


def int_param(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest.field(name, f"must be an integer, got {raw!r}") from None


def error_middleware_factory() -> Middleware:
    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return json_response(err.body(), status=err.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
                exc.status, "http_error"
            )
            message = (
                f"no route {request.method} {request.path}"
                if exc.status in (404, 405)
                else exc.reason
            )
            body = {"error": {"code": code, "message": message, "details": None}}
            return json_response(body, status=exc.status)
        except ValidationError as err:
            return json_response(validation_error(err).body(), status=400)
        except Exception:
            _LOGGER.exception("unhandled error on %s %s", request.method, request.path)
            body = {"error": {"code": "internal", "message": "internal error", "details": None}}
            return json_response(body, status=500)

    return error_middleware


def auth_middleware_factory(
    api: Api, bearer_token: Callable[[], str], firstboot_secret: Callable[[], str]
) -> Middleware:
    """Every route needs the bearer token, except the ones the registry marks otherwise."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        auth = api.auth_of(request.method, canonical)
        if auth is None:
            # Unknown routes: still require the token so nothing leaks without it.
            auth = "bearer"
        if auth == "bearer":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            expected = bearer_token()
            if (
                scheme.lower() != "bearer"
                or not expected
                or not hmac.compare_digest(token.strip().encode(), expected.encode())
            ):
                raise Unauthorized("missing or invalid bearer token")
        elif auth == "firstboot":
            given = request.headers.get(SECRET_HEADER, "")
            expected = firstboot_secret()
            if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                raise Unauthorized(f"missing or invalid {SECRET_HEADER} header")
        return await handler(request)

    return auth_middleware
