"""`GET /`: the dashboard, a static page shipped in the package (mesh/api/static).

No build step and nothing from another origin: the page, its script and its
style sheet are read from the package once, when the app is made, and served
with a Content-Security-Policy that allows only this origin, so a label or a
name shown on the page can never run as script even if rendering had a bug.

The page and its assets are open without the API token (a browser cannot send
a bearer token when it navigates); they hold no data. Everything the page shows
it reads from /v1 (and /metrics) with the token the operator types into it.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from mesh.errors import NotFound

#: asset name -> content type; only these are served (no path is ever joined from a request)
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
PAGE_PATHS = frozenset({"/", *(f"/dashboard/{name}" for name in ASSETS if name != "index.html")})

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # a new agent version serves a new page: the browser asks again rather than guess
    "Cache-Control": "no-cache",
}

_BODIES = web.AppKey("dashboard_assets", dict[str, bytes])
_FEATURES = web.AppKey("dashboard_features", frozenset[str])
_RENDERED = web.AppKey("dashboard_page", dict[str, bytes])  # filled at the first request


def _asset(request: web.Request, name: str) -> web.Response:
    body = request.app[_BODIES].get(name)
    if body is None:
        raise NotFound("no such path")
    return web.Response(body=body, content_type=ASSETS[name], charset="utf-8", headers=_HEADERS)


async def index(request: web.Request) -> web.Response:
    """The page, told what this agent has: whether the API wants a token (so the page
    asks for it before its first request rather than after a 401), whether `/metrics`
    and the HTTP routing mesh's counters exist (so it never asks for what is not there).
    Rendered at the first request, when every route is mounted, and kept."""
    rendered = request.app[_RENDERED]
    if "index.html" not in rendered:
        base: frozenset[str] = request.app[_FEATURES]
        features = set(base)
        if any(resource.canonical == "/metrics" for resource in request.app.router.resources()):
            features.add("metrics")
        rendered["index.html"] = request.app[_BODIES]["index.html"].replace(
            b"@FEATURES@", " ".join(sorted(features)).encode()
        )
    return web.Response(
        body=rendered["index.html"], content_type="text/html", charset="utf-8", headers=_HEADERS
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name == "index.html":  # the page is `/`, where it learns the agent's features
        raise NotFound("no such path")
    return _asset(request, name)


def setup(app: web.Application, *, auth: bool, http: bool) -> None:
    """Read the assets once (`table` mounts `GET /` and `GET /dashboard/{name}`); `auth`:
    the API wants a bearer token, `http`: the HTTP routing mesh runs (`GET /v1/http`)."""
    static = resources.files("mesh.api") / "static"
    app[_BODIES] = {name: (static / name).read_bytes() for name in ASSETS}
    app[_FEATURES] = frozenset(name for name, on in (("auth", auth), ("http", http)) if on)
    app[_RENDERED] = {}
