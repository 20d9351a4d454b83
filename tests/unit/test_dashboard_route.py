"""`GET /` and its assets, through the real app (aiohttp's test server, stub deps): served
from the package, with a policy that allows nothing from another origin, open without
the token while /v1 stays closed, and no file served that is not one of the three."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mesh.api import app as api
from mesh.api_tokens import Scope, tokens
from mesh.control import Control

TOKEN = "s3cret"


def _features(html: str) -> set[str]:
    """What the page is told this agent has (the `mesh-features` meta tag)."""
    found = re.search(r'<meta name="mesh-features" content="([a-z ]*)">', html)
    assert found is not None, "the page's features were not filled in"
    return set(found.group(1).split())


MakeClient = Callable[..., "AsyncIterator[TestClient[Any, Any]]"]


def _app(**overrides: Any) -> web.Application:
    fields: dict[str, Any] = {
        "control": cast(Control, None),
        "node": "node-1",
        "members": list,
        "heartbeat": lambda *_: None,
        "drain_grace": 1.0,
        **overrides,
    }
    return api.make_app(api.ApiDeps(**fields))


async def _client(app: web.Application) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def clients() -> AsyncIterator[list[TestClient[Any, Any]]]:
    made: list[TestClient[Any, Any]] = []
    yield made
    for client in made:
        await client.close()


async def test_the_page_and_its_assets_come_from_the_package(
    clients: list[TestClient[Any, Any]],
) -> None:
    client = await _client(_app())
    clients.append(client)
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = await page.text()
    assert not _features(html) & {"auth", "http"}  # no token, no HTTP routing mesh
    # Nothing from another origin: no CDN, no web font, no absolute URL at all.
    for path, kind in (
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ):
        asset = await client.get(path)
        assert asset.status == 200, path
        assert asset.content_type == kind
        assert asset.headers["Content-Security-Policy"] == policy
        body = await asset.text()
        assert not re.search(r"https?://|//[a-z]|@import|url\(", body), path
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


@pytest.mark.parametrize(
    "path", ["/dashboard/index.html", "/dashboard/nope.js", "/dashboard/..%2fapp.py", "/index.html"]
)
async def test_no_other_file_is_served(clients: list[TestClient[Any, Any]], path: str) -> None:
    client = await _client(_app())
    clients.append(client)
    response = await client.get(path)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_the_page_is_open_without_the_token_and_the_api_is_not(
    clients: list[TestClient[Any, Any]],
) -> None:
    client = await _client(_app(access=api.Access(tokens([(Scope.WRITE, TOKEN)])), http_stats=dict))
    clients.append(client)
    page = await client.get("/")
    assert page.status == 200
    # The page knows before its first request that it must ask for the token.
    assert {"auth", "http"} <= _features(await page.text())
    assert (await client.get("/dashboard/app.js")).status == 200
    assert (await client.get("/v1/members")).status == 401
    assert (await client.get("/dashboard/nope.js")).status == 401  # only the assets are open
    members = await client.get("/v1/members", headers={"Authorization": f"Bearer {TOKEN}"})
    assert members.status == 200


async def test_the_page_polls_metrics_only_where_the_agent_serves_them(
    clients: list[TestClient[Any, Any]],
) -> None:
    app = _app()

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text="")

    app.router.add_get("/metrics", metrics)
    client = await _client(app)
    clients.append(client)
    assert "metrics" in _features(await (await client.get("/")).text())
