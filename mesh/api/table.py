"""The route table of /v1: every route once, with all that is known of it.

One row per operation: method, path, handler, request model, success status and
answer model, the error statuses it can answer, its query parameters and a
summary. `make_app` mounts the handlers from it and `openapi.build_openapi`
describes the API from it, so the router and the description cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from mesh.api import dashboard, events, keyring_routes, metrics, routes
from mesh.api import models as m

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # lower case, as OpenAPI spells it
    path: str
    handler: Handler
    summary: str
    status: int = 200  # of a success
    body: type[BaseModel] | None = None  # the request body's model
    answer: type[BaseModel] | None = None  # the success answer's model (None: no body)
    many: bool = False  # the answer is a list of `answer`
    errors: tuple[int, ...] = ()  # besides 401 (any route), 403 and 503 (any change)
    query: tuple[Json, ...] = ()  # OpenAPI parameter objects (query and header)
    #: an answer that is no model (the event stream, the description): its response object
    raw_answer: Json | None = None
    operation_id: str | None = None  # default: from the method and path
    #: statuses besides `status` that answer the success model too (a health check's 503)
    also_answer: tuple[int, ...] = ()
    #: the list takes `?limit=` and `?after=` and answers a page (mesh.api.paging)
    paged: bool = False

    @property
    def changes(self) -> bool:
        """Whether the route changes state, and so may answer 503 (not durable)."""
        return self.method != "get"


def _param(
    name: str, description: str = "", *, where: str = "query", required: bool = False, **schema: str
) -> Json:
    """An OpenAPI parameter object (a string in the query, unless told otherwise)."""
    param: Json = {
        "name": name,
        "in": where,
        "required": required,
        "schema": {"type": "string", **schema},
    }
    if description:
        param["description"] = description
    return param


_NODE_STATUS_QUERY = _param(
    "node_status",
    "only the tasks whose node has one of these statuses (comma-separated), "
    "as this node's gossip sees it; anything else answers 422",
    pattern="^({0})(,({0}))*$".format("|".join(m.NODE_STATUSES)),
)

_WRITE_ERRORS = (400, 409, 413, 422)


async def _get_openapi(request: web.Request) -> web.Response:
    body = request.app[OPENAPI].body()
    return web.Response(body=body, content_type="application/json", charset="utf-8")


class OpenApiDocument:
    """/v1/openapi.json, built and serialized at its first request, then kept.

    Building it builds the schema of every API model (the models are `defer_build`),
    ~6 MB the control process would otherwise hold from its start for a document most
    agents never serve. The first request pays ~35 ms once."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = routes
        self._body: bytes | None = None

    def body(self) -> bytes:
        if self._body is None:
            from mesh.api.openapi import build_openapi

            self._body = json.dumps(build_openapi(self._routes)).encode()
        return self._body


OPENAPI = web.AppKey("openapi", OpenApiDocument)

ROUTES: tuple[Route, ...] = (
    Route(
        "get",
        "/v1/http",
        routes.http_stats,
        "The HTTP routing mesh's counters: requests, rejections, descriptors, ejected tasks",
        answer=m.HttpOut,
        errors=(409,),
    ),
    Route(
        "get",
        "/v1/lb",
        routes.lb_table,
        "The L4 table as this node's load-balancer backend has it programmed",
        answer=m.LbOut,
        errors=(409,),
    ),
    Route(
        "get",
        "/v1/lb/healthz/{service}",
        routes.lb_healthz,
        "Whether this node serves the service's published ports: 200, or 503 (same body) "
        "while it cannot (traffic-policy=local: no healthy task of its own; cluster: none "
        "anywhere), so an external load balancer skips it. Also served without credentials "
        "on --lb-healthz ADDR[:PORT]",
        answer=m.LbHealthOut,
        errors=(404, 409),
        also_answer=(503,),
    ),
    Route(
        "get",
        "/v1/gossip",
        routes.gossip_stats,
        "Gossip counters: packets dropped by reason, health score",
        answer=m.GossipOut,
        errors=(409,),
    ),
    Route(
        "get",
        "/v1/dns",
        routes.dns_records,
        "Every record the embedded DNS answers an asker on a network",
        answer=m.DnsRecordsOut,
        errors=(409, 422),
        query=(_param("network", "as a task on this network sees it (default: the host)"),),
    ),
    Route(
        "get",
        "/v1/resolve",
        routes.resolve,
        "What the embedded DNS answers an asker on a network",
        answer=m.ResolveOut,
        errors=(409, 422),
        query=(
            _param("name", required=True),
            _param("type", default="A"),
            _param("network", "ask as a task on this network would (default: the host)"),
        ),
    ),
    Route("get", "/v1/health", routes.health, "Whether the agent serves", answer=m.HealthOut),
    Route(
        "get",
        "/v1/agent",
        routes.agent_info,
        "This agent: pid, start time, configuration",
        answer=m.AgentOut,
    ),
    Route(
        "get",
        "/v1/members",
        routes.members,
        "The cluster as this node sees it",
        answer=m.MemberOut,
        many=True,
        paged=True,
    ),
    Route(
        "post",
        "/v1/networks",
        routes.create_network,
        "Create a network",
        status=201,
        body=m.NetworkCreate,
        answer=m.NetworkOut,
        errors=_WRITE_ERRORS,
    ),
    Route(
        "get",
        "/v1/networks",
        routes.list_networks,
        "List networks",
        answer=m.NetworkOut,
        many=True,
        paged=True,
    ),
    Route(
        "get",
        "/v1/networks/{name}",
        routes.get_network,
        "Inspect a network",
        answer=m.NetworkOut,
        errors=(404,),
    ),
    Route(
        "delete",
        "/v1/networks/{name}",
        routes.delete_network,
        "Remove a network",
        status=204,
        errors=(404, 409),
    ),
    Route(
        "post",
        "/v1/services",
        routes.create_service,
        "Create a service (answers with its VIPs)",
        status=201,
        body=m.ServiceCreate,
        answer=m.ServiceOut,
        errors=_WRITE_ERRORS,
    ),
    Route(
        "get",
        "/v1/services",
        routes.list_services,
        "List services",
        answer=m.ServiceOut,
        many=True,
        paged=True,
    ),
    Route(
        "get",
        "/v1/services/{name}",
        routes.get_service,
        "Inspect a service",
        answer=m.ServiceOut,
        errors=(404,),
    ),
    Route(
        "patch",
        "/v1/services/{name}",
        routes.update_service,
        "Update a service",
        body=m.ServicePatchIn,
        answer=m.ServiceOut,
        errors=(400, 404, 409, 413, 422),
        query=(
            _param(
                "version",
                "refuse the change unless the service is at this version",
                pattern="^[0-9]+$",
            ),
        ),
    ),
    Route(
        "delete",
        "/v1/services/{name}",
        routes.delete_service,
        "Remove a service and its tasks",
        status=204,
        errors=(404,),
    ),
    Route(
        "post",
        "/v1/services/{name}/tasks",
        routes.create_task,
        "Register a task of a service on this node (an address, or a sandbox)",
        status=201,
        body=m.TaskCreate,
        answer=m.TaskOut,
        errors=(400, 404, 409, 413, 422),
    ),
    Route(
        "get",
        "/v1/services/{name}/tasks",
        routes.list_service_tasks,
        "List a service's tasks",
        answer=m.TaskOut,
        many=True,
        paged=True,
        errors=(404, 422),
        query=(_NODE_STATUS_QUERY,),
    ),
    Route(
        "get",
        "/v1/tasks",
        routes.list_tasks,
        "List tasks",
        answer=m.TaskOut,
        many=True,
        paged=True,
        errors=(422,),
        query=(_param("service"), _param("node"), _NODE_STATUS_QUERY),
    ),
    Route(
        "get", "/v1/tasks/{id}", routes.get_task, "Inspect a task", answer=m.TaskOut, errors=(404,)
    ),
    Route(
        "delete",
        "/v1/tasks/{id}",
        routes.delete_task,
        "Drain a task, then remove it",
        status=202,
        answer=m.TaskOut,
        errors=(404,),
    ),
    Route(
        "put",
        "/v1/tasks/{id}/health",
        routes.report_health,
        "A TTL heartbeat or a health report from the task",
        body=m.HealthReport,
        answer=m.TaskOut,
        errors=(400, 404, 409, 413, 422),
    ),
    Route(
        "get",
        "/v1/keyring",
        keyring_routes.list_keys,
        "The gossip keyring: key fingerprints, which is primary",
        answer=m.KeyringOut,
        errors=(409,),
    ),
    Route(
        "post",
        "/v1/keyring",
        keyring_routes.install_key,
        "Install a gossip key",
        body=m.KeyIn,
        answer=m.KeyringOut,
        errors=_WRITE_ERRORS,
    ),
    Route(
        "put",
        "/v1/keyring/primary",
        keyring_routes.use_key,
        "Make an installed gossip key the primary",
        body=m.KeyIn,
        answer=m.KeyringOut,
        errors=_WRITE_ERRORS,
    ),
    Route(
        "post",
        "/v1/keyring/remove",
        keyring_routes.remove_key,
        "Remove a gossip key (not the primary)",
        body=m.KeyIn,
        answer=m.KeyringOut,
        errors=_WRITE_ERRORS,
    ),
    Route(
        "get",
        "/v1/events",
        events.stream_events,
        "A stream of changes (server-sent events), without end",
        operation_id="get_events",
        query=(_param("Last-Event-ID", "resume after this event id", where="header"),),
        raw_answer={
            "description": 'frames of `id: <seq>`, `event: <kind>`, `data: {"op", '
            '"kind", "key", "object"}`; `event: gap` when changes '
            "were missed (re-read the lists)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    ),
    Route(
        "get",
        "/metrics",
        metrics.metrics,
        "The agent's metrics (control process and workers): Prometheus text, or "
        "OpenMetrics when `Accept` asks for it; families in docs/metrics.md",
        operation_id="get_metrics",
        raw_answer={
            "description": "every `meshplane_` family and the process collector's",
            "content": {
                "text/plain; version=0.0.4": {"schema": {"type": "string"}},
                "application/openmetrics-text; version=1.0.0": {"schema": {"type": "string"}},
            },
        },
    ),
    Route(
        "get",
        "/v1/openapi.json",
        _get_openapi,
        "This description (OpenAPI 3.1)",
        operation_id="get_openapi",
        raw_answer={
            "description": "OK",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    ),
    Route(
        "get",
        "/",
        dashboard.index,
        "The dashboard: a live page of the cluster (open without the token; it asks for it)",
        operation_id="get_dashboard",
        raw_answer={
            "description": "the page (docs/dashboard.md)",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
    ),
    Route(
        "get",
        "/dashboard/{name}",
        dashboard.asset,
        "The dashboard's script and style sheet (app.js, style.css)",
        errors=(404,),
        operation_id="get_dashboard_asset",
        raw_answer={
            "description": "the asset",
            "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}},
            },
        },
    ),
)


def mount(app: web.Application, table: tuple[Route, ...] = ROUTES) -> None:
    """Add every route of `table` to the app's router (a GET answers HEAD too)."""
    for route in table:
        if route.method == "get":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method.upper(), route.path, route.handler)
