"""``/api/v1/openapi.json``: generated from the route registry, so it lists exactly the routes."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from . import __version__
from .web import Api

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
            "required": ["code", "message"],
        }
    },
}


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(api: Api) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    for info, _handler in api.routes:
        op: dict[str, Any] = {
            "summary": info.summary,
            "tags": [info.tag],
            "responses": {
                str(info.status): {
                    "description": "success",
                    **(
                        {
                            "content": {
                                "application/json": {"schema": _schema(info.response, components)}
                            }
                        }
                        if info.response is not None
                        else {}
                    ),
                },
                "default": {
                    "description": "error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", info.path)
        ]
        params += [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, text in info.query.items()
        ]
        if params:
            op["parameters"] = params
        if info.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(info.body, components)}},
            }
        if info.auth == "bearer":
            op["security"] = [{"bearer": []}]
        elif info.auth == "firstboot":
            op["security"] = [{"firstbootSecret": []}]
        else:
            op["security"] = []
        paths.setdefault(info.path, {})[info.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ctrlable companion API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "firstbootSecret": {"type": "apiKey", "in": "header", "name": "X-Ctrlable-Secret"},
            },
        },
        "security": [{"bearer": []}],
    }
