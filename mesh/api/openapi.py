"""The OpenAPI 3.1 description of /v1, generated from the route table.

Each row of `table.ROUTES` is one operation. Request schemas come from the
models in validation mode and answers from the `*Out` models in serialization
mode, so the description says exactly what the handlers accept and answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from mesh.api import models as m
from mesh.api.paging import MAX_CURSOR, MAX_LIMIT
from mesh.api.table import ROUTES, Route

Json = dict[str, Any]
_REF = "#/components/schemas/{model}"

_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or wrong bearer token",
    403: "A read-scope token: this method needs a write token (`insufficient_scope`)",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "Invalid value",
    503: "The change could not be made durable (or, creating a sandboxed task, its sandbox"
    " could not be made: `sandbox_failed`)",
}


_ALSO_TEXT = {503: "Not serving (the same body as the 200): an external load balancer skips it"}


def _schemas(table: tuple[Route, ...]) -> Json:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for route in table:
        if route.body is not None:
            pairs.append((route.body, "validation"))
        if route.answer is not None:
            pairs.append((route.answer, "serialization"))
    pairs.append((m.ErrorOut, "serialization"))
    _, top = models_json_schema(list(dict.fromkeys(pairs)), ref_template=_REF)
    schemas: Json = top.get("$defs", {})
    return schemas


def _ref(model: type[BaseModel]) -> Json:
    return {"$ref": _REF.format(model=model.__name__)}


def _operation_id(method: str, path: str) -> str:
    words = path.removeprefix("/v1/").replace("{", "").replace("}", "").split("/")
    return "_".join([method, *words])


def _success(route: Route) -> Json:
    if route.raw_answer is not None:
        return route.raw_answer
    success: Json = {"description": "OK"}
    if route.answer is not None:
        schema = _ref(route.answer)
        if route.many:
            schema = {"type": "array", "items": schema}
        success["content"] = {"application/json": {"schema": schema}}
    if route.paged:
        success["headers"] = {
            "Link": {
                "description": 'with `limit`, when more follow: `<URL>; rel="next"`, the '
                "URL of the next page (the same query with `after` set)",
                "schema": {"type": "string"},
            }
        }
    return success


#: The query of a paged list (mesh.api.paging; docs/api.md, "Pages").
_PAGE_QUERY: tuple[Json, ...] = (
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "at most this many items, in the list's stable order; the "
        "answer's Link header names the next page (without it: the whole list)",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "the cursor of the Link header: the items after the previous page",
        "schema": {"type": "string", "maxLength": MAX_CURSOR, "pattern": "^[A-Za-z0-9_-]*$"},
    },
)


def _operation(route: Route) -> Json:
    responses: Json = {str(route.status): _success(route)}
    error_content = {"application/json": {"schema": _ref(m.ErrorOut)}}
    # Every method but GET needs a write token: a read token's request is a 403.
    statuses = set(route.errors) | {401} | ({403, 503} if route.changes else set())
    if route.paged:
        statuses.add(422)  # a bad limit or cursor
    for code in sorted(statuses):
        responses[str(code)] = {"description": _ERROR_TEXT[code], "content": error_content}
    for code in route.also_answer:
        responses[str(code)] = _success(route) | {"description": _ALSO_TEXT[code]}
    operation: Json = {
        "summary": route.summary,
        "operationId": route.operation_id or _operation_id(route.method, route.path),
        "responses": responses,
    }
    parameters = [
        {"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
        for p in route.path.split("/")
        if p.startswith("{")
    ]
    parameters += route.query
    if route.paged:
        parameters += _PAGE_QUERY
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    return operation


def build_openapi(table: tuple[Route, ...] = ROUTES, version: Literal["3.1.0"] = "3.1.0") -> Json:
    paths: Json = {}
    for route in table:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": version,
        "info": {"title": "meshplane agent API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": _schemas(table),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
