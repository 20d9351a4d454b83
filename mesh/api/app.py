"""The HTTP API (aiohttp): `make_app(deps)` builds it; the agent binds it.

The routes are the rows of `table.ROUTES`, which `/v1/openapi.json` is
generated from too; every handler answers through `answer` (an `*Out` model).
Two middlewares wrap every handler. `_errors` is the one error path: every
`MeshError` (the 401 of `_auth` included) and aiohttp's own 403/404/405/413 become
the error shape of docs/design.md (`ErrorOut`), and anything unexpected a logged
500 of the same shape, never a traceback. `_auth` checks the bearer token when
tokens are configured (`/v1/health` stays open, for load-balancer probes): no
token or an unknown one is a 401, a `read` token on any method but GET and HEAD
a 403 (`mesh.api_tokens` decides; a GET route added later is read-scope as it is).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from gossip.security import KeyringControl
from lb.http.routes import Problem
from lb.policy import Health as LbHealth
from mesh.api.dashboard import PAGE_PATHS
from mesh.api.models import ErrorDetail, ErrorOut
from mesh.api_tokens import Decision, Tokens, decide
from mesh.control import Control
from mesh.core.logs import event
from mesh.core.model import Network
from mesh.errors import (
    BadRequest,
    Forbidden,
    Internal,
    Invalid,
    MeshError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SandboxPort(Protocol):
    """The kernel side of sandboxed tasks, as the API sees it (the sandbox manager)."""

    # the timeout is the caller's budget, handed to the manager that does the waiting
    async def ready(self, task_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the task's sandbox and endpoints exist in the kernel; raise
        `SandboxFailed(reason)` when they could not be made (or not within `timeout`)."""
        ...


@dataclass(slots=True)
class Access:
    """The tokens the API accepts now: replaced whole when the token file is read
    again (SIGHUP); every request reads it afresh."""

    tokens: Tokens


@dataclass(frozen=True, slots=True)
class ApiDeps:
    control: Control
    node: str
    members: Callable[[], list[dict[str, Any]]]
    heartbeat: Callable[[str, bool, str], None]
    drain_grace: float
    #: the tokens and their scopes; none: the API is open (a loopback API without tokens)
    access: Access = field(default_factory=lambda: Access(Tokens()))
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
    #: the DNS server's labelled counts as flat names (`DnsService.metric_counts`), for
    #: the metrics; None without DNS
    dns_counts: Callable[[], dict[str, int | float]] | None = None
    #: the DNS workers' counters summed (`--dns-workers`), for the metrics; None without
    dns_worker_stats: Callable[[], dict[str, int | float]] | None = None
    #: the gossip keyring's control (install/use/remove); None when gossip is not encrypted
    keyring: KeyringControl | None = None
    #: the L4 table as the backend has it programmed; None when no backend runs
    lb: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: (pool, index, process figures) of every live worker process; None without workers
    worker_processes: Callable[[], list[tuple[str, int, dict[str, float]]]] | None = None
    #: the L4 backend's name and counters, read without the kernel (for the metrics)
    lb_counters: Callable[[], dict[str, Any]] | None = None
    #: refresh the L4 counters per service (reads the kernel for a kernel backend, at
    #: most once a second) before a scrape reads `lb_counters`
    lb_sample: Callable[[], Awaitable[None]] | None = None
    #: the HTTP routing mesh's counters; None when it does not run (--http none)
    http_stats: Callable[[], dict[str, Any]] | None = None
    #: every node this node's gossip knows of -> alive, suspect, dead or left
    node_statuses: Callable[[], dict[str, str]] | None = None
    #: makes sandboxes in the kernel; None: this agent lacks the privileges (422
    #: `needs_privileges` for driver-backed networks and sandboxed tasks)
    sandboxes: SandboxPort | None = None
    #: how long a sandboxed task's creation waits for its sandbox before it fails (503)
    sandbox_timeout: float = 30.0
    #: service -> its HRM route problems, as this node sees them (lb.http.problems)
    route_problems: Callable[[], dict[str, list[Problem]]] | None = None
    #: service -> this node's health for its published ports (lb.policy.healthz)
    lb_healthz: Callable[[str], LbHealth] | None = None

    #: service -> the L4 options this node's backend refuses or honours only in part
    #: (lb.policy.lb_problems): listed with the route problems, kind `lb`
    lb_problems: Callable[[], dict[str, list[Problem]]] | None = None

    def problems_of(self, service: str) -> list[Problem]:
        return self.problems().get(service, [])

    def problems(self) -> dict[str, list[Problem]]:
        """Every service's problems: its HRM routes', then its L4 options'."""
        merged = {} if self.route_problems is None else dict(self.route_problems())
        for name, more in ({} if self.lb_problems is None else self.lb_problems()).items():
            merged[name] = [*merged.get(name, []), *more]
        return merged

    def node_status(self) -> Callable[[str], str]:
        """node -> its status as seen now; this node is alive, a node gossip never
        heard of (before this agent rejoined, say) is `unknown`."""
        known = self.node_statuses() if self.node_statuses is not None else {}
        known[self.node] = "alive"
        return lambda node: known.get(node, "unknown")


DEPS = web.AppKey("deps", ApiDeps)

_JSON = "application/json"


def answer(body: BaseModel, status: int = 200) -> web.Response:
    """A JSON answer serialized from its `*Out` model: with `answer_list`, the one way
    a handler answers, so an answer cannot drift from its description.

    A field its source did not give is left out rather than sent as null or its
    default (a member's `suspicion` while it is not suspect, `workers` of an HTTP
    routing mesh without worker processes): the optional fields of docs/api.md."""
    return _json(body.model_dump_json(exclude_unset=True).encode(), status)


def answer_list(
    model: type[M], items: Iterable[M | Mapping[str, Any]], status: int = 200
) -> web.Response:
    """A JSON array of `model`: models, or dicts in its shape validated by it here, all
    in one call (a thousand tasks cost one pass, not a thousand)."""
    adapter = list_adapter(model)
    return _json(
        adapter.dump_json(adapter.validate_python(list(items)), exclude_unset=True), status
    )


@functools.cache
def list_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def _json(body: bytes, status: int) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, charset="utf-8")


def error_response(error: MeshError) -> web.Response:
    """The one error path: every error status, 401 and 405 included, is an `ErrorOut`."""
    response = answer(
        ErrorOut(error=ErrorDetail(code=error.code, message=error.message)), status=error.status
    )
    response.headers.update(error.headers)
    return response


#: aiohttp's own refusals (no route, wrong method, body too large), as the API's errors
_HTTP_ERRORS: dict[int, Callable[[web.HTTPException], MeshError]] = {
    403: lambda _exc: Forbidden("forbidden"),
    404: lambda _exc: NotFound("no such path"),
    # a 405 must say what is allowed (RFC 9110 §15.5.6)
    405: lambda exc: MethodNotAllowed(
        f"method not allowed; allowed: {exc.headers.get('Allow', '')}",
        headers={"Allow": exc.headers.get("Allow", "")},
    ),
    413: lambda _exc: PayloadTooLarge("request body too large"),
}


def _from_http_exception(exc: web.HTTPException) -> MeshError:
    known = _HTTP_ERRORS.get(exc.status)
    if known is not None:
        return known(exc)
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
        return error_response(_from_http_exception(exc))
    except Exception as exc:  # a bug: answer in shape, keep serving, leave a trace in the log
        event(log, "api_internal_error", logging.ERROR, path=request.path, error=repr(exc))
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(Internal("internal error; see the agent's log"))


def bearer_credentials(authorization: str) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` value, None for another
    scheme. The scheme is case-insensitive (RFC 9110 §11.1: `bearer`, `BEARER`), and
    is separated from the token by one or more spaces (§11.4, RFC 6750 §2.1)."""
    scheme, _, credentials = authorization.strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.lstrip(" ").encode("utf-8", "surrogateescape")  # any bytes sent


#: the routes open without the token: load-balancer probes, and the dashboard's page and
#: assets (a browser cannot send a bearer token when it navigates; they hold no data)
OPEN_PATHS = frozenset({"/v1/health", *PAGE_PATHS})


def _auth_middleware(access: Access) -> Middleware:
    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization")
            given = None if header is None else bearer_credentials(header)
            # Constant time over every token held (mesh.api_tokens): which one matched,
            # and how much of a guess did, must not show in the timing.
            decision = decide(access.tokens, request.method, given)
            if decision is Decision.UNAUTHENTICATED:
                # RFC 6750 §3.1: no error code when no credentials came at all.
                challenge = 'Bearer realm="meshplane"'
                if given is not None:
                    challenge += ', error="invalid_token"'
                raise Unauthorized(
                    "a valid 'Authorization: Bearer <token>' is required",
                    headers={"WWW-Authenticate": challenge},
                )
            if decision is Decision.INSUFFICIENT_SCOPE:
                raise Forbidden(
                    f"a read token may only GET; {request.method} needs a write token",
                    code="insufficient_scope",
                    headers={
                        "WWW-Authenticate": 'Bearer realm="meshplane", '
                        'error="insufficient_scope", scope="write"'
                    },
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
            f"the body may be at most {request.app[DEPS].max_body} bytes"
        ) from None
    except web.RequestPayloadError as exc:
        # The body's framing or encoding is broken (a corrupt gzip or deflate body, a
        # bad chunk): the client's fault, a 400, not a 500. aiohttp says why in `__cause__`.
        why = " ".join(str(getattr(exc.__cause__, "message", None) or exc).split())
        raise BadRequest(f"the body could not be read: {why}", code="malformed_json") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def make_app(deps: ApiDeps) -> web.Application:
    from mesh.api import dashboard, events, metrics, table

    middlewares: list[Middleware] = [_errors]
    if deps.access.tokens:
        middlewares.append(_auth_middleware(deps.access))
    app = web.Application(middlewares=middlewares, client_max_size=deps.max_body)
    app[DEPS] = deps
    app[table.OPENAPI] = table.OpenApiDocument(table.ROUTES)
    events.setup(app)
    dashboard.setup(app, auth=bool(deps.access.tokens), http=deps.http_stats is not None)
    metrics.setup(app)
    table.mount(app, table.ROUTES)
    return app
