"""The OpenAPI 3.1 description of /v1, generated from the pydantic models.

Request schemas come from the models in validation mode and answers from the
`*Out` models in serialization mode, so the description says exactly what the
handlers accept and answer. The table `_OPERATIONS` lists every route once:
method, path, request model, success status and model, and the error statuses
it can answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from mesh.api import models as m

Json = dict[str, Any]
_REF = "#/components/schemas/{model}"

_Body = type[BaseModel] | None
_Answer = tuple[int, type[BaseModel] | None, bool]  # status, model, is a list

_OPERATIONS: list[tuple[str, str, str, _Body, _Answer, tuple[int, ...]]] = [
    ("get", "/v1/health", "Whether the agent serves", None, (200, m.HealthOut, False), ()),
    ("get", "/v1/members", "The cluster as this node sees it", None,
     (200, m.MemberOut, True), ()),
    ("post", "/v1/networks", "Create a network", m.NetworkCreate,
     (201, m.NetworkOut, False), (400, 409, 413, 422)),
    ("get", "/v1/networks", "List networks", None, (200, m.NetworkOut, True), ()),
    ("get", "/v1/networks/{name}", "Inspect a network", None, (200, m.NetworkOut, False), (404,)),
    ("delete", "/v1/networks/{name}", "Remove a network", None, (204, None, False), (404, 409)),
    ("post", "/v1/services", "Create a service (answers with its VIPs)", m.ServiceCreate,
     (201, m.ServiceOut, False), (400, 409, 413, 422)),
    ("get", "/v1/services", "List services", None, (200, m.ServiceOut, True), ()),
    ("get", "/v1/services/{name}", "Inspect a service", None, (200, m.ServiceOut, False), (404,)),
    ("patch", "/v1/services/{name}", "Update a service", m.ServicePatchIn,
     (200, m.ServiceOut, False), (400, 404, 409, 413, 422)),
    ("delete", "/v1/services/{name}", "Remove a service and its tasks", None,
     (204, None, False), (404,)),
    ("post", "/v1/services/{name}/tasks", "Register a task of a service on this node",
     m.TaskCreate, (201, m.TaskOut, False), (400, 404, 409, 413, 422)),
    ("get", "/v1/services/{name}/tasks", "List a service's tasks", None,
     (200, m.TaskOut, True), (404, 422)),
    ("get", "/v1/tasks", "List tasks", None, (200, m.TaskOut, True), (422,)),
    ("get", "/v1/tasks/{id}", "Inspect a task", None, (200, m.TaskOut, False), (404,)),
    ("delete", "/v1/tasks/{id}", "Drain a task, then remove it", None,
     (202, m.TaskOut, False), (404,)),
    ("get", "/v1/gossip", "Gossip counters: packets dropped by reason, health score", None,
     (200, m.GossipOut, False), (409,)),
    ("get", "/v1/agent", "This agent: pid, start time, configuration", None,
     (200, m.AgentOut, False), ()),
    ("get", "/v1/dns", "Every record the embedded DNS answers an asker on a network", None,
     (200, m.DnsRecordsOut, False), (409, 422)),
    ("get", "/v1/http", "The HTTP routing mesh's counters: requests, rejections, "
     "descriptors, ejected tasks", None, (200, m.HttpOut, False), (409,)),
    ("get", "/v1/lb", "The L4 table as this node's load-balancer backend has it programmed",
     None, (200, m.LbOut, False), (409,)),
    ("get", "/v1/resolve", "What the embedded DNS answers an asker on a network", None,
     (200, m.ResolveOut, False), (409, 422)),
    ("put", "/v1/tasks/{id}/health", "A TTL heartbeat or a health report from the task",
     m.HealthReport, (200, m.TaskOut, False), (400, 404, 409, 413, 422)),
    ("get", "/v1/keyring", "The gossip keyring: key fingerprints, which is primary", None,
     (200, m.KeyringOut, False), (409,)),
    ("post", "/v1/keyring", "Install a gossip key", m.KeyIn,
     (200, m.KeyringOut, False), (400, 409, 413, 422)),
    ("put", "/v1/keyring/primary", "Make an installed gossip key the primary", m.KeyIn,
     (200, m.KeyringOut, False), (400, 409, 413, 422)),
    ("post", "/v1/keyring/remove", "Remove a gossip key (not the primary)", m.KeyIn,
     (200, m.KeyringOut, False), (400, 409, 413, 422)),
]

_ERROR_TEXT = {400: "Malformed request", 401: "Missing or wrong bearer token",
               404: "Not found", 409: "Conflict", 413: "Body too large",
               422: "Invalid value", 503: "The change could not be made durable"}

_NODE_STATUS_QUERY: Json = {
    "name": "node_status", "in": "query", "required": False,
    "schema": {"type": "string",
               "pattern": "^({0})(,({0}))*$".format("|".join(m.NODE_STATUSES))},
    "description": "only the tasks whose node has one of these statuses (comma-separated), "
                   "as this node's gossip sees it; anything else answers 422"}

_QUERY: dict[tuple[str, str], list[Json]] = {
    ("patch", "/v1/services/{name}"): [
        {"name": "version", "in": "query", "required": False,
         "schema": {"type": "string", "pattern": "^[0-9]+$"},
         "description": "refuse the change unless the service is at this version"}],
    ("get", "/v1/resolve"): [
        {"name": "name", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "type", "in": "query", "required": False,
         "schema": {"type": "string", "default": "A"}},
        {"name": "network", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "ask as a task on this network would (default: the host)"}],
    ("get", "/v1/dns"): [
        {"name": "network", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "as a task on this network sees it (default: the host)"}],
    ("get", "/v1/tasks"): [
        {"name": "service", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "node", "in": "query", "required": False, "schema": {"type": "string"}},
        _NODE_STATUS_QUERY],
    ("get", "/v1/services/{name}/tasks"): [_NODE_STATUS_QUERY],
}


def _schemas() -> Json:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for _, _, _, body, (_, answer, _), _ in _OPERATIONS:
        if body is not None:
            pairs.append((body, "validation"))
        if answer is not None:
            pairs.append((answer, "serialization"))
    pairs.append((m.ErrorOut, "serialization"))
    _, top = models_json_schema(list(dict.fromkeys(pairs)), ref_template=_REF)
    schemas: Json = top.get("$defs", {})
    return schemas


def _ref(model: type[BaseModel]) -> Json:
    return {"$ref": _REF.format(model=model.__name__)}


def _operation_id(method: str, path: str) -> str:
    words = path.removeprefix("/v1/").replace("{", "").replace("}", "").split("/")
    return "_".join([method, *words])


def _operation(method: str, path: str, summary: str, body: _Body, answer: _Answer,
               errors: tuple[int, ...]) -> Json:
    status, model, is_list = answer
    success: Json = {"description": "OK"}
    if model is not None:
        schema = {"type": "array", "items": _ref(model)} if is_list else _ref(model)
        success["content"] = {"application/json": {"schema": schema}}
    responses: Json = {str(status): success}
    error_content = {"application/json": {"schema": _ref(m.ErrorOut)}}
    statuses = set(errors) | {401} | ({503} if method != "get" else set())
    for code in sorted(statuses):
        responses[str(code)] = {"description": _ERROR_TEXT[code], "content": error_content}
    operation: Json = {"summary": summary, "operationId": _operation_id(method, path),
                       "responses": responses}
    parameters = [{"name": p.strip("{}"), "in": "path", "required": True,
                   "schema": {"type": "string"}}
                  for p in path.split("/") if p.startswith("{")]
    parameters += _QUERY.get((method, path), [])
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def _unmodelled_operations() -> Json:
    """The routes whose answer is no model: the change feed and this description."""
    unauthorized = {"description": _ERROR_TEXT[401],
                    "content": {"application/json": {"schema": _ref(m.ErrorOut)}}}
    return {
        "/v1/events": {"get": {
            "summary": "A stream of changes (server-sent events), without end",
            "operationId": "get_events",
            "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False,
                            "schema": {"type": "string"},
                            "description": "resume after this event id"}],
            "responses": {
                "200": {"description": 'frames of `id: <seq>`, `event: <kind>`, `data: {"op", '
                                       '"kind", "key", "object"}`; `event: gap` when changes '
                                       "were missed (re-read the lists)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "401": unauthorized}}},
        "/v1/openapi.json": {"get": {
            "summary": "This description (OpenAPI 3.1)",
            "operationId": "get_openapi",
            "responses": {
                "200": {"description": "OK",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "401": unauthorized}}},
    }


def build_openapi(version: Literal["3.1.0"] = "3.1.0") -> Json:
    paths: Json = {}
    for method, path, summary, body, answer, errors in _OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(method, path, summary, body, answer,
                                                        errors)
    paths.update(_unmodelled_operations())
    return {
        "openapi": version,
        "info": {"title": "meshplane agent API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
