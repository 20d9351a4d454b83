"""The HTTP API (aiohttp): `make_app(deps)` builds it; the agent binds it.

Two middlewares wrap every handler. `_errors` turns every `MeshError` (and
aiohttp's own 404/405/413) into the error shape of DESIGN.md, and anything
unexpected into a logged 500 of the same shape, never a traceback. `_auth`
checks the bearer token when one is configured (`/v1/health` stays open, for
load-balancer probes).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gossip.security import KeyringControl
from mesh.api.openapi import build_openapi
from mesh.control import Control
from mesh.core.logs import event
from mesh.core.model import Network
from mesh.errors import BadRequest, Invalid, MeshError, MethodNotAllowed, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ApiDeps:
    control: Control
    node: str
    members: Callable[[], list[dict[str, Any]]]
    heartbeat: Callable[[str, bool, str], None]
    drain_grace: float
    token: str | None = None
    max_body: int = 1 << 20
    #: the gossip layer's counters (drops by reason, packets, health score)
    gossip_stats: Callable[[], dict[str, Any]] | None = None
    #: (name, type, network or None) -> what the DNS server answers; None without DNS
    resolve: Callable[[str, str, Network | None], Awaitable[dict[str, Any]]] | None = None
    #: this agent: pid, start time and its configuration (flags as strings, token hidden)
    agent_info: Callable[[], dict[str, Any]] | None = None
    #: network or None -> every DNS record an asker there gets; None without DNS
    dns_records: Callable[[Network | None], list[dict[str, str]]] | None = None
    #: the DNS server's counters (malformed queries by kind, cache size, ...); None without DNS
    dns_stats: Callable[[], dict[str, int]] | None = None
    #: the gossip keyring's control (install/use/remove); None when gossip is not encrypted
    keyring: KeyringControl | None = None
    #: the L4 table as the backend has it programmed; None when no backend runs
    lb: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: the HTTP routing mesh's counters; None when it does not run (--http none)
    http_stats: Callable[[], dict[str, Any]] | None = None
    #: every node this node's gossip knows of -> alive, suspect, dead or left
    node_statuses: Callable[[], dict[str, str]] | None = None

    def node_status(self) -> Callable[[str], str]:
        """node -> its status as seen now; this node is alive, a node gossip never
        heard of (before this agent rejoined, say) is `unknown`."""
        known = self.node_statuses() if self.node_statuses is not None else {}
        known[self.node] = "alive"
        return lambda node: known.get(node, "unknown")


DEPS = web.AppKey("deps", ApiDeps)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def error_response(error: MeshError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


def _from_http_exception(exc: web.HTTPException) -> MeshError:
    if exc.status == 404:
        return NotFound("no such path")
    if exc.status == 405:
        return MethodNotAllowed(f"method not allowed; allowed: {exc.headers.get('Allow', '')}")
    if exc.status == 413:
        return PayloadTooLarge("request body too large")
    error = MeshError(exc.reason, code="http_error")
    error.status = exc.status
    return error


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MeshError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc))
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # a bug: answer in shape, keep serving, leave a trace in the log
        event(log, "api_internal_error", logging.ERROR, path=request.path, error=repr(exc))
        log.exception("unhandled error in %s %s", request.method, request.path)
        error = MeshError("internal error; see the agent's log", code="internal")
        error.status = 500
        return error_response(error)


def bearer_credentials(authorization: str) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` value, None for another
    scheme. The scheme is case-insensitive (RFC 9110 §11.1: `bearer`, `BEARER`), and
    is separated from the token by one or more spaces (§11.4, RFC 6750 §2.1)."""
    scheme, _, credentials = authorization.strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.lstrip(" ").encode("utf-8", "surrogateescape")  # any bytes sent


def _auth_middleware(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/v1/health":
            given = bearer_credentials(request.headers.get("Authorization", ""))
            # Constant time: how much of a guess matches must not show in the timing.
            if given is None or not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": {"code": "unauthorized",
                               "message": "a valid 'Authorization: Bearer <token>' is required"}},
                    status=401, headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return _auth


def _validation_error(exc: ValidationError) -> MeshError:
    first: ErrorDetails = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    kind = first["type"]
    if kind == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {first['msg']}", code="malformed_json")
    if not first["loc"] and kind in ("model_type", "model_attributes_type", "dict_type"):
        return BadRequest("the body must be a JSON object", code="malformed_json")
    if kind == "extra_forbidden":
        return BadRequest(f"unknown field {where!r}", code="unknown_field")
    if kind == "missing":
        return Invalid(f"field {where!r} is required", code="missing_field")
    message = first["msg"].removeprefix("Value error, ")
    return Invalid(f"field {where!r}: {message}")


async def read_model(request: web.Request, model: type[M]) -> M:
    if request.content_length is not None and request.content_length > request.app[DEPS].max_body:
        raise PayloadTooLarge(f"the body may be at most {request.app[DEPS].max_body} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the body may be at most {request.app[DEPS].max_body} bytes") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def make_app(deps: ApiDeps) -> web.Application:
    from mesh.api import events, keyring_routes, routes

    middlewares: list[Middleware] = [_errors]
    if deps.token:
        middlewares.append(_auth_middleware(deps.token))
    app = web.Application(middlewares=middlewares, client_max_size=deps.max_body)
    app[DEPS] = deps
    routes.add_routes(app)
    keyring_routes.add_routes(app)
    events.setup(app)
    openapi = build_openapi()

    async def get_openapi(_request: web.Request) -> web.Response:
        return json_response(openapi)

    app.router.add_get("/v1/openapi.json", get_openapi)
    return app
