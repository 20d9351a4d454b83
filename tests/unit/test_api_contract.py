"""The API's contract written once: the route table, the answers, the error path.

No agent and no socket: the app is built from stub dependencies and the
middlewares are called with mocked requests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request

from mesh.api import app as api
from mesh.api import models as m
from mesh.api.openapi import build_openapi
from mesh.api.table import ROUTES
from mesh.api_tokens import Scope, tokens
from mesh.control import Control
from mesh.errors import Conflict, MeshError, Unauthorized, Unavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _deps(**overrides: Any) -> api.ApiDeps:
    fields: dict[str, Any] = {
        "control": cast(Control, None),
        "node": "node-1",
        "members": list,
        "heartbeat": lambda *_: None,
        "drain_grace": 1.0,
        **overrides,
    }
    return api.ApiDeps(**fields)


def _body(response: web.StreamResponse) -> Any:
    assert isinstance(response, web.Response)
    assert response.body is not None
    return json.loads(bytes(cast(bytes, response.body)))


def _raising(exc: BaseException) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        raise exc

    return handler


# -- one route table ----------------------------------------------------------------


def test_router_and_description_come_from_one_table() -> None:
    app = api.make_app(_deps())
    mounted = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    described = {
        (method, path) for path, item in build_openapi()["paths"].items() for method in item
    }
    table = {(route.method, route.path) for route in ROUTES}
    assert len(table) == len(ROUTES), "a route is in the table twice"
    assert mounted == table == described


def test_every_get_answers_head_too() -> None:
    app = api.make_app(_deps())
    heads = {
        r.resource.canonical
        for r in app.router.routes()
        if r.resource is not None and r.method == "HEAD"
    }
    assert heads == {route.path for route in ROUTES if route.method == "get"}


def test_each_route_says_what_it_answers() -> None:
    for route in ROUTES:
        if route.status == 204:
            assert route.answer is None and route.raw_answer is None, route.path
        else:
            assert (route.answer is None) != (route.raw_answer is None), route.path
        assert not (route.body is not None and route.method == "get"), route.path


# -- answers from the models ------------------------------------------------------------


def test_answer_is_the_model_json_without_fields_the_source_left_out() -> None:
    alive = {"name": "a", "address": "127.0.0.1", "port": 7946, "status": "alive", "incarnation": 1}
    response = api.answer_list(m.MemberOut, [alive], status=200)
    assert response.content_type == "application/json"
    assert response.charset == "utf-8"
    assert _body(response) == [alive]
    suspect = m.MemberOut.model_validate(
        {
            "name": "b",
            "address": "127.0.0.1",
            "port": 1,
            "status": "suspect",
            "incarnation": 2,
            "suspicion": {"dead_in": 1.5, "confirmations": 0},
        }
    )
    assert _body(api.answer(suspect))["suspicion"] == {"dead_in": 1.5, "confirmations": 0}
    # models and dicts in the model's shape mix
    assert _body(api.answer_list(m.MemberOut, [suspect, alive]))[1] == alive


def test_an_empty_list_is_an_empty_json_array() -> None:
    assert _body(api.answer_list(m.TaskOut, [])) == []


def test_a_list_item_out_of_shape_is_a_bug_not_an_answer() -> None:
    """An answer that breaks its model is refused here (and so answered as a logged
    500 by the error path), never sent out of its description."""
    with pytest.raises(ValueError, match="status"):
        api.answer_list(
            m.MemberOut,
            [{"name": "a", "address": "x", "port": 1, "status": "gone", "incarnation": 1}],
        )


def test_record_fields_are_their_models_shape() -> None:
    from lb.http.routes import Problem
    from mesh.api import convert
    from mesh.core.model import HealthCheck, Network, PortConfig, Service, Task, Version, Vip

    version = Version(3, "node-1")
    network = Network(
        name="front",
        id="n1",
        driver="overlay",
        subnet="10.1.0.0/24",
        gateway="10.1.0.1",
        created_at=1.0,
        version=version,
    )
    service = Service(
        name="web",
        id="s1",
        networks=("front",),
        ports=(PortConfig(protocol="tcp", target_port=80, published_port=30000),),
        vips=(Vip(network="front", address="10.1.0.2"),),
        health_check=HealthCheck(type="ttl"),
        created_at=1.0,
        updated_at=2.0,
        version=version,
    )
    task = Task(
        id="t1",
        name="web.1.t1",
        service="web",
        slot=1,
        node="node-1",
        address="10.0.0.5",
        ports={80: 31080},
        created_at=1.0,
        updated_at=2.0,
        version=version,
    )
    cases: list[tuple[type[m.BaseModel], dict[str, Any]]] = [
        (m.NetworkOut, convert.network_fields(network)),
        (m.ServiceOut, convert.service_fields(service)),
        (m.TaskOut, convert.task_fields(task, "alive")),
    ]
    for model, fields in cases:
        assert model.model_validate(fields).model_dump(mode="json") == fields
    assert convert.task_out(task, "dead")["node_status"] == "dead"
    assert convert.service_out(service)["vips"] == [{"network": "front", "address": "10.1.0.2"}]
    problem = Problem("web", "mesh.http.hosts", "mesh.http.port 'x' is not a port", "label")
    with_problems = convert.service_fields(service, [problem])
    assert with_problems["problems"] == [
        {"kind": "label", "label": "mesh.http.hosts", "reason": "mesh.http.port 'x' is not a port"}
    ]
    assert m.ServiceOut.model_validate(with_problems).model_dump(mode="json") == with_problems
    # the event stream's service carries none: they depend on more than the one record
    assert "problems" not in convert.service_out(service)


# -- one error path ---------------------------------------------------------------------


async def _through_errors(exc: BaseException) -> web.StreamResponse:
    return await api._errors(make_mocked_request("GET", "/v1/x"), _raising(exc))


def _assert_error(response: web.StreamResponse, status: int, code: str) -> None:
    assert response.status == status
    body = _body(response)
    assert m.ErrorOut.model_validate(body).error.code == code
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (Conflict("taken", code="name_in_use"), 409, "name_in_use"),
        (Unavailable("disk"), 503, "unavailable"),
        (web.HTTPNotFound(), 404, "not_found"),
        (web.HTTPForbidden(), 403, "forbidden"),
        (web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), 413, "payload_too_large"),
        (web.HTTPBadRequest(), 400, "http_error"),
        (ZeroDivisionError("a bug"), 500, "internal"),
    ],
)
async def test_every_error_status_has_the_one_shape(
    exc: BaseException, status: int, code: str
) -> None:
    _assert_error(await _through_errors(exc), status, code)


async def test_405_carries_allow() -> None:
    response = await _through_errors(web.HTTPMethodNotAllowed("PUT", ["GET", "POST"]))
    _assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET,POST"


async def test_401_goes_through_the_error_path_with_its_challenge() -> None:
    async def reached(_request: web.Request) -> web.StreamResponse:
        raise AssertionError("the handler ran without the token")

    auth = api._auth_middleware(api.Access(tokens([(Scope.WRITE, "s3cret")])))

    async def guarded(request: web.Request) -> web.StreamResponse:
        return await auth(request, reached)

    for headers, challenge in (
        ({}, 'Bearer realm="meshplane"'),
        ({"Authorization": "Basic czNjcmV0"}, 'Bearer realm="meshplane"'),
        ({"Authorization": "Bearer nope"}, 'Bearer realm="meshplane", error="invalid_token"'),
    ):
        request = make_mocked_request("GET", "/v1/networks", headers=headers)
        response = await api._errors(request, guarded)
        _assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == challenge


async def test_403_for_a_read_token_carries_the_scope_it_lacks() -> None:
    async def reached(_request: web.Request) -> web.StreamResponse:
        raise AssertionError("the handler ran for a read token's write")

    auth = api._auth_middleware(api.Access(tokens([(Scope.READ, "r3ad")])))

    async def guarded(request: web.Request) -> web.StreamResponse:
        return await auth(request, reached)

    request = make_mocked_request("POST", "/v1/networks", headers={"Authorization": "Bearer r3ad"})
    response = await api._errors(request, guarded)
    _assert_error(response, 403, "insufficient_scope")
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="meshplane", error="insufficient_scope", scope="write"'
    )


def test_error_headers_are_the_errors_own() -> None:
    first = Unauthorized("no", headers={"WWW-Authenticate": "Bearer"})
    assert MeshError("x").headers == {}
    assert api.error_response(first).headers["WWW-Authenticate"] == "Bearer"


# -- the 500 that was: a body aiohttp cannot decode ------------------------------------


async def test_a_body_that_cannot_be_decoded_is_400_not_500() -> None:
    """A corrupt gzip or deflate body (`Content-Encoding`) made `request.read()` raise
    aiohttp's RequestPayloadError, which no handler expected: a 500."""
    app = web.Application()
    app[api.DEPS] = _deps()
    protocol = mock.Mock(_reading_paused=False)
    payload = StreamReader(protocol, 2**16, loop=mock.Mock())
    error = web.RequestPayloadError("400, message: Can not decode content-encoding: gzip")
    error.__cause__ = ContentEncodingError("Can not decode content-encoding: gzip")
    payload.set_exception(error)
    request = make_mocked_request(
        "POST", "/v1/networks", app=app, payload=payload, headers={"Content-Encoding": "gzip"}
    )

    async def handler(req: web.Request) -> web.StreamResponse:
        await api.read_model(req, m.NetworkCreate)
        raise AssertionError("a body was read")

    response = await api._errors(request, handler)
    _assert_error(response, 400, "malformed_json")
    message = _body(response)["error"]["message"]
    assert message == "the body could not be read: Can not decode content-encoding: gzip"
