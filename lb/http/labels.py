"""HRM routing labels to routes (sans-IO): what `RouteTable` is built from.

The label forms are listed in `lb/http/routes.py`; every parse error is a
`LabelError` whose message says why, so a bad label becomes a listed problem
of its service and never an exception in the router.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from mesh.core import net
from mesh.core.model import Service

HRM_LABEL = "com.docker.ucp.mesh.http"
HOSTS_LABELS = ("mesh.http.hosts", "com.docker.lb.hosts")
PORT_LABELS = ("mesh.http.port", "com.docker.lb.port")
CONTEXT_ROOT = "com.docker.lb.context_root"
CONTEXT_ROOT_REWRITE = "com.docker.lb.context_root_rewrite"
STICKY_COOKIE = "com.docker.lb.sticky_session_cookie"
_SIMPLE_LABELS = (*HOSTS_LABELS, *PORT_LABELS, CONTEXT_ROOT, CONTEXT_ROOT_REWRITE, STICKY_COOKIE)
_V2_KEYS = frozenset(
    {"external_route", "internal_port", "sticky_sessions", "redirect", "include_forwarded_for"}
)

_HOST = re.compile(
    r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_COOKIE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")  # an RFC 6265 token


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    host: str  # lower-case, no port; "" is the catch-all
    path_prefix: str  # "/" unless the URL or Interlock's context_root gives one
    target_port: int  # 0: none (a redirect-only route)
    sticky_cookie: str | None  # HRM 2 sticky_sessions=<cookie>
    redirect: str | None  # HRM 2 redirect target: answer 301 to it
    passthrough: bool  # sni:// route: raw TLS forwarded by SNI
    strip_prefix: bool = False  # Interlock context_root_rewrite: forward without the prefix
    label: str = ""  # the label it came from, for logs and problems

    @property
    def key(self) -> RouteKey:
        return RouteKey(self.passthrough, self.host, self.path_prefix)


class RouteKey(NamedTuple):
    """What two services may not both claim."""

    passthrough: bool
    host: str
    path_prefix: str


#: what kind of problem: a label that does not parse (the service is not routed), a
#: route lost to an older service, a target port no task serves, a host this node's
#: HTTPS has no certificate for
PROBLEM_KINDS = ("label", "conflict", "target_port", "certificate", "lb")


class Problem(NamedTuple):
    """Why a service (or one of its routes) is not routed, or not routed well."""

    service: str
    label: str
    reason: str
    kind: str = "label"  # one of PROBLEM_KINDS


class LabelError(ValueError):
    """A routing label that cannot be used; the message says why."""

    def __init__(self, reason: str, label: str | None = None) -> None:
        super().__init__(reason)
        self.label = label  # when it is not the label being parsed


# -- labels to routes ------------------------------------------------------------


def is_routing_label(key: str) -> bool:
    return key == HRM_LABEL or key.startswith(HRM_LABEL + ".") or key in _SIMPLE_LABELS


def routes_of(service: Service) -> tuple[list[Route], list[Problem]]:
    """The routes a service's labels ask for, or none and the reasons why."""
    routes: list[Route] = []
    problems: list[Problem] = []
    labels = service.labels

    def attempt(label: str, parse: Iterator[Route]) -> None:
        try:
            routes.extend(parse)
        except LabelError as error:
            problems.append(Problem(service.name, error.label or label, str(error)))

    for label in sorted(k for k in labels if k == HRM_LABEL or k.startswith(HRM_LABEL + ".")):
        attempt(label, _hrm_routes(service, label, labels[label]))
    for hosts_label, port_label in zip(HOSTS_LABELS, PORT_LABELS, strict=True):
        if hosts_label in labels:
            attempt(hosts_label, _hosts_routes(service, hosts_label, port_label))
        elif port_label in labels:
            problems.append(Problem(service.name, port_label, f"given without {hosts_label}"))
    try:
        routes = _apply_interlock_options(service, routes)
    except LabelError as error:
        problems.append(Problem(service.name, error.label or CONTEXT_ROOT, str(error)))
    unique: dict[RouteKey, Route] = {}
    for route in routes:
        first = unique.setdefault(route.key, route)
        if first is not route and _settings(first) != _settings(route):
            problems.append(
                Problem(
                    service.name,
                    route.label,
                    f"{describe_key(route.key)} is also routed by {first.label} "
                    "with other settings",
                )
            )
    if problems:
        return [], problems
    return list(unique.values()), []


def _settings(route: Route) -> tuple[object, ...]:
    return (route.target_port, route.sticky_cookie, route.redirect, route.strip_prefix)


def _hrm_routes(service: Service, label: str, value: str) -> Iterator[Route]:
    items = [item.strip() for item in value.split(",")]
    if any(item.partition("=")[0].strip() in _V2_KEYS for item in items):
        yield _v2_route(service, label, items)
        return
    port: int | None = None  # HRM 1: a bare url keeps the previous item's port
    for item in items:
        if not item:
            raise LabelError("an empty item in the list")
        head, sep, url = item.partition("=")
        if not sep or "://" in head:
            head, url = "", item
        scheme, host, path = _url(url, allow_empty_host=False)
        if scheme != "http":
            raise LabelError(
                f"{url!r}: this form routes http:// only (sni:// needs external_route=sni://...)"
            )
        if head:
            port = _port(head, "port")
        elif port is None:
            port = _published_port(service, "a port before the first url (8080=http://...)")
        yield Route(service.name, host, path, port, None, None, False, label=label)


def _v2_route(service: Service, label: str, items: list[str]) -> Route:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _V2_KEYS:
            raise LabelError(
                f"{item!r}: expected key=value with a key among {', '.join(sorted(_V2_KEYS))}"
            )
        if key in options:
            raise LabelError(f"{key} given twice")
        options[key] = value
    if "external_route" not in options:
        raise LabelError("external_route is required")
    scheme, host, path = _url(options["external_route"], allow_empty_host=True)
    passthrough = scheme == "sni"
    if scheme not in ("http", "sni"):
        raise LabelError(f"external_route {options['external_route']!r}: http:// or sni:// only")
    if passthrough and path != "/":
        raise LabelError("an sni:// route cannot have a path: TLS is not terminated")
    sticky = options.get("sticky_sessions")
    redirect = options.get("redirect")
    if passthrough and (sticky is not None or redirect is not None):
        raise LabelError("sticky_sessions and redirect apply to http:// routes only")
    if sticky is not None and not _COOKIE.fullmatch(sticky):
        raise LabelError(f"sticky_sessions {sticky!r} is not a valid cookie name")
    if redirect is not None:
        redirect = _redirect(redirect)
    if options.get("include_forwarded_for", "true").lower() not in ("true", "false"):
        raise LabelError("include_forwarded_for must be true or false")
    if "internal_port" in options:
        port = _port(options["internal_port"], "internal_port")
    elif redirect is not None:
        port = 0  # nothing is forwarded: the route only redirects
    else:
        port = _published_port(service, "internal_port")
    return Route(service.name, host, path, port, sticky, redirect, passthrough, label=label)


def _hosts_routes(service: Service, hosts_label: str, port_label: str) -> Iterator[Route]:
    port_text = service.labels.get(port_label)
    port = (
        _port(port_text, port_label)
        if port_text is not None
        else _published_port(service, port_label)
    )
    hosts = [h.strip() for h in service.labels[hosts_label].split(",")]
    for host in hosts:
        yield Route(service.name, _host(host), "/", port, None, None, False, label=hosts_label)


def _apply_interlock_options(service: Service, routes: list[Route]) -> list[Route]:
    """Interlock's context_root, context_root_rewrite and sticky cookie, on the HTTP routes."""
    labels = service.labels
    root = labels.get(CONTEXT_ROOT)
    rewrite = labels.get(CONTEXT_ROOT_REWRITE)
    cookie = labels.get(STICKY_COOKIE)
    if rewrite is not None and rewrite.lower() not in ("true", "false"):
        raise LabelError("must be true or false", CONTEXT_ROOT_REWRITE)
    if rewrite is not None and root is None:
        raise LabelError(f"given without {CONTEXT_ROOT}", CONTEXT_ROOT_REWRITE)
    if cookie is not None and not _COOKIE.fullmatch(cookie):
        raise LabelError(f"{cookie!r} is not a valid cookie name", STICKY_COOKIE)
    given = [label for label in (CONTEXT_ROOT, STICKY_COOKIE) if label in labels]
    if given and not any(not route.passthrough for route in routes):
        raise LabelError("given, but the service has no http:// route", given[0])
    prefix = _path(root) if root is not None else "/"
    strip = rewrite is not None and rewrite.lower() == "true"
    result = []
    for route in routes:
        if route.passthrough:
            result.append(route)
            continue
        path = route.path_prefix
        if root is not None:
            if path != "/":
                raise LabelError(
                    f"{route.label} has its own path {path!r}: give the path once", CONTEXT_ROOT
                )
            path = prefix
        result.append(
            Route(
                route.service,
                route.host,
                path,
                route.target_port,
                route.sticky_cookie or cookie,
                route.redirect,
                False,
                strip_prefix=strip and path != "/",
                label=route.label,
            )
        )
    return result


def _url(url: str, *, allow_empty_host: bool) -> tuple[str, str, str]:
    """(scheme, host, path prefix) of a route or redirect URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise LabelError(f"{url!r}: {error}") from None
    if not parts.scheme or "://" not in url:
        raise LabelError(f"{url!r} is not a URL (expected scheme://host)")
    if parts.query or parts.fragment or parts.username is not None:
        raise LabelError(f"{url!r}: no user, query or fragment here")
    if port is not None:
        raise LabelError(f"{url!r}: no port here; the router matches Host without its port")
    hostname = parts.hostname or ""
    if not hostname and not allow_empty_host:
        raise LabelError(f"{url!r} has no host")
    return parts.scheme.lower(), _host(hostname) if hostname else "", _path(parts.path or "/")


def _redirect(url: str) -> str:
    """A redirect target: an absolute http(s) URL with a host (a port is fine here)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as error:
        raise LabelError(f"redirect {url!r}: {error}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise LabelError(f"redirect {url!r}: expected http(s)://host[:port][/path]")
    if parts.username is not None or any(c.isspace() or ord(c) < 32 for c in url):
        raise LabelError(f"redirect {url!r}: no user or white space here")
    _host(parts.hostname)
    return url


def _host(text: str) -> str:
    host = text.strip().lower().rstrip(".")
    if not _HOST.fullmatch(host):
        raise LabelError(f"{text!r} is not a host name")
    return host


def _path(text: str) -> str:
    """A path prefix: starts with /, no trailing / (but "/" itself), no query."""
    path = text.strip()
    if not _PATH.fullmatch(path) or "//" in path:
        raise LabelError(f"{text!r} is not a path prefix (/segment[/segment...])")
    if "/../" in path + "/" or "/./" in path + "/":
        raise LabelError(f"{text!r}: no . or .. segments")
    return path.rstrip("/") or "/"


def _port(text: str, what: str) -> int:
    port = net.port_or_none(text.strip())
    if port is None:
        raise LabelError(f"{what} {text.strip()!r} is not a port (1-65535)")
    return port


def _published_port(service: Service, missing: str) -> int:
    """The target port when the service publishes exactly one TCP port (as HRM did)."""
    targets = {p.target_port for p in service.ports if p.protocol == "tcp"}
    if len(targets) != 1:
        raise LabelError(
            f"{missing} is required: the service publishes {len(targets) or 'no'} TCP ports"
        )
    return targets.pop()


_URL_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/,=\s]*)")


def hosts_named(service: Service) -> set[str]:
    """The hosts a service's routing labels name, read loosely (lower-case, no port).

    For a service whose labels do not parse: a request for one of these hosts is
    answered 404 with the label's problem, rather than a bare 404.
    """
    hosts: set[str] = set()
    for key, value in service.labels.items():
        if key in HOSTS_LABELS:
            hosts.update(item for item in value.split(","))
        elif is_routing_label(key):
            hosts.update(_URL_HOST.findall(value))
    found = set()
    for host in hosts:
        host = host.strip().lower()
        if host.startswith("["):
            found.add(host[: host.find("]") + 1] if "]" in host else host)
        else:
            found.add(host.partition(":")[0].rstrip("."))
    found.discard("")
    return found


def describe_key(key: RouteKey) -> str:
    if key.passthrough:
        return f"sni://{key.host}"
    return f"http://{key.host}{'' if key.path_prefix == '/' else key.path_prefix}"
