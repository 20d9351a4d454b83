"""The HTTP routing mesh's route table: service labels to routes, fed by the change feed.

Sans-IO: `RouteTable` is loaded with records, then fed `Change`s one by one,
and answers `match(host, path)` (HTTP) and `match_sni(server_name)` (`sni://`
passthrough). What `match` returns is built when the state changes, never per
request: one `Match` per winning route, replaced only when that route's
endpoints change, so the router's hot path does two dict lookups and a short
prefix scan and allocates nothing for a Host header that arrives lower-case
without a port (the common case).

Label forms (DESIGN.md "HRM labels"; Swarm reference §5):

- `com.docker.ucp.mesh.http=8080=http://a.example.com,http://b.example.com`
  (Docker Datacenter HRM 1: each item `port=url`, a bare url keeps the
  previous port; the first may omit it when the service publishes one port);
- `mesh.http.hosts=a.example.com,b.example.com` + `mesh.http.port=8080`
  (Interlock's `com.docker.lb.hosts` + `com.docker.lb.port` read the same);
- `com.docker.ucp.mesh.http[.<any>]=external_route=http://host[/path],internal_port=8080
  [,sticky_sessions=<cookie>][,redirect=<url>][,include_forwarded_for=true]` (HRM 2);
  `external_route=sni://host` is a TLS passthrough route; an empty host
  (`http://`, `sni://`) is the catch-all for requests no host matches.
- Interlock's `com.docker.lb.context_root=/path` gives the path prefix of the
  service's HTTP routes that have none in their URL (`context_root_rewrite=true`
  strips it before forwarding), `com.docker.lb.sticky_session_cookie` a cookie.

A service with any invalid routing label gets no route at all (half a
configuration serving is worse than none) and every reason is kept for
`problems()`. Two services claiming one host and path: the older service
(created first; the name breaks a tie) serves it, the other is listed as a
conflict and takes over if the winner goes away.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from mesh.state.model import Change, Health, Record, Service, Task, TaskState

HRM_LABEL = "com.docker.ucp.mesh.http"
HOSTS_LABELS = ("mesh.http.hosts", "com.docker.lb.hosts")
PORT_LABELS = ("mesh.http.port", "com.docker.lb.port")
CONTEXT_ROOT = "com.docker.lb.context_root"
CONTEXT_ROOT_REWRITE = "com.docker.lb.context_root_rewrite"
STICKY_COOKIE = "com.docker.lb.sticky_session_cookie"
_SIMPLE_LABELS = (*HOSTS_LABELS, *PORT_LABELS, CONTEXT_ROOT, CONTEXT_ROOT_REWRITE, STICKY_COOKIE)
_V2_KEYS = frozenset({"external_route", "internal_port", "sticky_sessions", "redirect",
                      "include_forwarded_for"})

_HOST = re.compile(r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                   r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_COOKIE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")  # an RFC 6265 token
_BOUNDARY = frozenset("/?#")  # what may follow a path prefix inside a longer path


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One healthy, running task reachable for a route."""

    task_id: str
    address: str
    port: int  # the task's actual port for the route's target port


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


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    endpoints: tuple[Endpoint, ...]  # healthy, running; empty -> 503


class Problem(NamedTuple):
    """Why a service (or one of its routes) is not routed."""

    service: str
    label: str
    reason: str


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
            problems.append(Problem(service.name, route.label,
                                    f"{_describe(route.key)} is also routed by {first.label} "
                                    "with other settings"))
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
            raise LabelError(f"{url!r}: this form routes http:// only (sni:// needs "
                             "external_route=sni://...)")
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
            raise LabelError(f"{item!r}: expected key=value with a key among "
                             f"{', '.join(sorted(_V2_KEYS))}")
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
    port = (_port(port_text, port_label) if port_text is not None
            else _published_port(service, port_label))
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
                raise LabelError(f"{route.label} has its own path {path!r}: give the path "
                                 "once", CONTEXT_ROOT)
            path = prefix
        result.append(Route(route.service, route.host, path, route.target_port,
                            route.sticky_cookie or cookie, route.redirect, False,
                            strip_prefix=strip and path != "/", label=route.label))
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
    text = text.strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise LabelError(f"{what} {text!r} is not a port (1-65535)")
    return int(text)


def _published_port(service: Service, missing: str) -> int:
    """The target port when the service publishes exactly one TCP port (as HRM did)."""
    targets = {p.target_port for p in service.ports if p.protocol == "tcp"}
    if len(targets) != 1:
        raise LabelError(f"{missing} is required: the service publishes "
                         f"{len(targets) or 'no'} TCP ports")
    return targets.pop()


def _describe(key: RouteKey) -> str:
    if key.passthrough:
        return f"sni://{key.host}"
    return f"http://{key.host}{'' if key.path_prefix == '/' else key.path_prefix}"


# -- the table ------------------------------------------------------------------


def serves_traffic(task: Task) -> bool:
    """The rule DNS uses (dns/table.py): running and healthy; draining gets nothing new."""
    return task.state is TaskState.RUNNING and task.health is Health.HEALTHY


def _endpoint_facts(task: Task | None) -> object:
    """What of a task a route's endpoints depend on; equal facts need no rebuild."""
    if task is None or task.deleted or not serves_traffic(task):
        return None
    return task.service, task.slot, task.address, tuple(sorted(task.ports.items()))


@dataclass(slots=True)
class _Host:
    """One host's HTTP routes, longest path prefix first."""

    entries: tuple[tuple[str, int, Match], ...] = ()  # (prefix, len(prefix), match)


@dataclass(slots=True)
class _Claims:
    """Every service claiming one route key; the winner serves it."""

    by_service: dict[str, Route] = field(default_factory=dict)
    winner: str | None = None


class RouteTable:
    """Routes by host (and path prefix), with their healthy endpoints; fed changes."""

    def __init__(self) -> None:
        #: bumped whenever what `match`/`match_sni` answer may have changed.
        self.generation = 0
        self._clear()

    def _clear(self) -> None:
        self._services: dict[str, Service] = {}
        self._routes: dict[str, list[Route]] = {}  # service -> its valid routes
        self._label_problems: dict[str, list[Problem]] = {}
        self._tasks: dict[str, dict[str, Task]] = {}  # service -> task id -> task
        self._claims: dict[RouteKey, _Claims] = {}
        self._matches: dict[RouteKey, Match] = {}  # winning routes only
        self._prefixes: dict[str, dict[str, Match]] = {}  # host -> path prefix -> match
        self._http: dict[str, _Host] = {}  # what `match` reads, built from _prefixes
        self._sni: dict[str, Match] = {}

    def __repr__(self) -> str:
        return (f"<RouteTable routes={len(self._matches)} services={len(self._routes)} "
                f"generation={self.generation}>")

    # -- feeding ----------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Take a snapshot, replacing what the table held (a first load, or after a gap).

        Tasks go in first, so that each route is built once, with its endpoints.
        """
        self._clear()
        records = list(records)
        for record in records:
            if isinstance(record, Task) and not record.deleted:
                self._tasks.setdefault(record.service, {})[record.id] = record
        for record in records:
            if isinstance(record, Service) and not record.deleted:
                self._put_service(record)
        self.generation += 1

    def on_change(self, change: Change) -> None:
        before, after = change.before, change.after
        if isinstance(after, Service):
            old = before if isinstance(before, Service) and not before.deleted else None
            if after.deleted:
                if old is not None or after.name in self._services:
                    self._drop_service(after.name)
                    self.generation += 1
            elif old is None or _routing_view(old) != _routing_view(after):
                self._drop_service(after.name)
                self._put_service(after)
                self.generation += 1
            else:
                self._services[after.name] = after
        elif isinstance(after, Task):
            self._on_task(before if isinstance(before, Task) else None, after)

    def _on_task(self, before: Task | None, after: Task) -> None:
        old = self._tasks.get(after.service, {}).get(after.id) if before is None else before
        if before is not None and before.service != after.service:
            self._tasks.get(before.service, {}).pop(before.id, None)
        if after.deleted:
            self._tasks.get(after.service, {}).pop(after.id, None)
        else:
            self._tasks.setdefault(after.service, {})[after.id] = after
        if old is not None and old.service != after.service:
            self._refresh_service(old.service)
        if _endpoint_facts(old) != _endpoint_facts(after):
            self._refresh_service(after.service)

    def _put_service(self, service: Service) -> None:
        self._services[service.name] = service
        routes, problems = routes_of(service)
        if problems:
            self._label_problems[service.name] = problems
        if routes:
            self._routes[service.name] = routes
        for route in routes:
            claims = self._claims.setdefault(route.key, _Claims())
            claims.by_service[service.name] = route
            self._elect(route.key, claims)

    def _drop_service(self, name: str) -> None:
        self._services.pop(name, None)
        self._label_problems.pop(name, None)
        for route in self._routes.pop(name, []):
            claims = self._claims[route.key]
            del claims.by_service[name]
            self._elect(route.key, claims)

    def _elect(self, key: RouteKey, claims: _Claims) -> None:
        """Give the route to the oldest claimant; rebuild it if the winner changed."""
        winner = min(claims.by_service, key=self._age, default=None)
        if winner == claims.winner and winner is not None and claims.by_service[winner] is \
                self._matches[key].route:
            return
        claims.winner = winner
        if winner is None:
            del self._claims[key]
            self._matches.pop(key, None)
        else:
            self._matches[key] = self._build(claims.by_service[winner])
        self._publish(key)

    def _age(self, name: str) -> tuple[float, str]:
        return self._services[name].created_at, name

    def _refresh_service(self, name: str) -> None:
        """A task of `name` changed: rebuild the matches it wins, nothing else."""
        changed = False
        for route in self._routes.get(name, ()):
            if self._claims[route.key].winner == name:
                match = self._build(route)
                if match != self._matches[route.key]:
                    self._matches[route.key] = match
                    self._publish(route.key)
                    changed = True
        if changed:
            self.generation += 1

    def _build(self, route: Route) -> Match:
        tasks = sorted((t for t in self._tasks.get(route.service, {}).values()
                        if serves_traffic(t)), key=lambda t: (t.slot, t.id))
        return Match(route, tuple(Endpoint(t.id, t.address, t.actual_port(route.target_port))
                                  for t in tasks))

    def _publish(self, key: RouteKey) -> None:
        """Refresh the lookup structure `match`/`match_sni` read, for one route's host."""
        match = self._matches.get(key)
        if key.passthrough:
            if match is None:
                self._sni.pop(key.host, None)
            else:
                self._sni[key.host] = match
            return
        prefixes = self._prefixes.setdefault(key.host, {})
        if match is None:
            prefixes.pop(key.path_prefix, None)
        else:
            prefixes[key.path_prefix] = match
        if not prefixes:
            del self._prefixes[key.host]
            self._http.pop(key.host, None)
            return
        ordered = sorted(prefixes.items(), key=lambda pm: (-len(pm[0]), pm[0]))
        self._http[key.host] = _Host(tuple((p, len(p), m) for p, m in ordered))

    # -- the hot path -----------------------------------------------------------

    def match(self, host: str, path: str) -> Match | None:
        """The route for a request's Host header (as received) and path, or None (404).

        The longest path prefix of the host wins, on a segment boundary; a
        host with no route for the path falls back to the catch-all host.
        """
        entry = self._http.get(host)
        if entry is None:
            entry = self._http.get(normalize_host(host))
        if entry is not None:
            found = _longest_prefix(entry, path)
            if found is not None:
                return found
        default = self._http.get("")
        return None if default is None or entry is default else _longest_prefix(default, path)

    def match_sni(self, server_name: str) -> Match | None:
        """The passthrough route for a TLS ClientHello's server name, or the sni:// catch-all."""
        found = self._sni.get(server_name)
        if found is None:
            found = self._sni.get(normalize_host(server_name))
        return found if found is not None else self._sni.get("")

    # -- inspection -------------------------------------------------------------

    def matches(self) -> dict[RouteKey, Match]:
        """Every route being served and its endpoints (a copy)."""
        return dict(self._matches)

    def routes(self) -> list[Route]:
        return [self._matches[key].route for key in sorted(self._matches)]

    def problems(self) -> list[Problem]:
        """Invalid labels and lost conflicts: (service, label, reason), sorted."""
        found = [p for problems in self._label_problems.values() for p in problems]
        for key, claims in self._claims.items():
            for name, route in claims.by_service.items():
                if name != claims.winner:
                    found.append(Problem(name, route.label,
                                         f"{_describe(key)} is already routed to the older "
                                         f"service {claims.winner}"))
        return sorted(found)


def normalize_host(host: str) -> str:
    """A Host header or SNI name as routes are keyed: lower-case, no :port, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, maybe with a port
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, _, _port_text = host.partition(":")
    return name.rstrip(".")


def _longest_prefix(entry: _Host, path: str) -> Match | None:
    for prefix, length, match in entry.entries:
        if length == 1 or (path.startswith(prefix)
                           and (len(path) == length or path[length] in _BOUNDARY)):
            return match
    return None


def _routing_view(service: Service) -> tuple[object, ...]:
    """What of a service its routes depend on; an update changing none of it is free."""
    labels = tuple(sorted((k, v) for k, v in service.labels.items() if is_routing_label(k)))
    ports = tuple(sorted(p.target_port for p in service.ports if p.protocol == "tcp"))
    return labels, ports, service.created_at
