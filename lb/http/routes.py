"""The HTTP routing mesh's route table: service labels to routes, fed by the change feed.

Sans-IO: `RouteTable` is loaded with records, then fed `Change`s one by one,
and answers `match(host, path)` (HTTP) and `match_sni(server_name)` (`sni://`
passthrough). What `match` returns is built when the state changes, never per
request: one `Match` per winning route, replaced only when that route's
endpoints change, so the router's hot path does two dict lookups and a short
prefix scan and allocates nothing for a Host header that arrives lower-case
without a port (the common case).

Label forms (docs/design.md "HRM labels"; Swarm reference §5):

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lb.http.labels import (
    LabelError,
    Problem,
    Route,
    RouteKey,
    describe_key,
    hosts_named,
    is_routing_label,
    routes_of,
)
from mesh.core.model import INGRESS, Change, Health, Record, Service, Task, TaskState

_BOUNDARY = frozenset("/?#")  # what may follow a path prefix inside a longer path

__all__ = [
    "Endpoint",
    "LabelError",
    "Match",
    "Problem",
    "Route",
    "RouteKey",
    "RouteTable",
    "cert_covers",
    "is_routing_label",
    "normalize_host",
    "routes_of",
    "serves_traffic",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One healthy, running task reachable for a route."""

    task_id: str
    address: str
    port: int  # the task's actual port for the route's target port


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    endpoints: tuple[Endpoint, ...]  # healthy, running; empty -> 503


# -- the table ------------------------------------------------------------------


def serves_traffic(task: Task) -> bool:
    """The rule DNS uses (dns/table.py): running and healthy; draining gets nothing new."""
    return task.state is TaskState.RUNNING and task.health is Health.HEALTHY


def _endpoint_facts(task: Task | None) -> object:
    """What of a task a route's endpoints depend on; equal facts need no rebuild."""
    if task is None or task.deleted or not serves_traffic(task):
        return None
    return (
        task.service,
        task.slot,
        task.address_on(INGRESS),
        tuple(sorted(task.ports.items())),
    )


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
        #: host -> services whose labels name it but do not parse (for the 404's body)
        self._broken_hosts: dict[str, set[str]] = {}
        self._tasks: dict[str, dict[str, Task]] = {}  # service -> task id -> task
        self._claims: dict[RouteKey, _Claims] = {}
        self._matches: dict[RouteKey, Match] = {}  # winning routes only
        self._prefixes: dict[str, dict[str, Match]] = {}  # host -> path prefix -> match
        self._http: dict[str, _Host] = {}  # what `match` reads, built from _prefixes
        self._sni: dict[str, Match] = {}

    def __repr__(self) -> str:
        return (
            f"<RouteTable routes={len(self._matches)} services={len(self._routes)} "
            f"generation={self.generation}>"
        )

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
            for host in hosts_named(service):
                self._broken_hosts.setdefault(host, set()).add(service.name)
        if routes:
            self._routes[service.name] = routes
        for route in routes:
            claims = self._claims.setdefault(route.key, _Claims())
            claims.by_service[service.name] = route
            self._elect(route.key, claims)

    def _drop_service(self, name: str) -> None:
        service = self._services.pop(name, None)
        if self._label_problems.pop(name, None) is not None and service is not None:
            for host in hosts_named(service):
                names = self._broken_hosts.get(host)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._broken_hosts[host]
        for route in self._routes.pop(name, []):
            claims = self._claims[route.key]
            del claims.by_service[name]
            self._elect(route.key, claims)

    def _elect(self, key: RouteKey, claims: _Claims) -> None:
        """Give the route to the oldest claimant; rebuild it if the winner changed."""
        winner = min(claims.by_service, key=self._age, default=None)
        if (
            winner == claims.winner
            and winner is not None
            and claims.by_service[winner] is self._matches[key].route
        ):
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
        tasks = sorted(
            (t for t in self._tasks.get(route.service, {}).values() if serves_traffic(t)),
            key=lambda t: (t.slot, t.id),
        )
        return Match(
            route,
            tuple(
                # a sandboxed task's ingress endpoint, which every node reaches (the overlay)
                Endpoint(t.id, t.address_on(INGRESS), t.actual_port(route.target_port))
                for t in tasks
            ),
        )

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

    def problems(self, cert_hosts: Sequence[str] | None = None) -> list[Problem]:
        """Every route problem: (service, label, reason, kind), sorted.

        Invalid labels (the service is not routed), lost conflicts, target ports
        no task serves and, given `cert_hosts` (this node's HTTPS certificates'
        hosts; None: no HTTPS listener), hosts with no certificate.
        """
        found = [p for problems in self._label_problems.values() for p in problems]
        for key, claims in self._claims.items():
            for name, route in claims.by_service.items():
                if name != claims.winner:
                    found.append(
                        Problem(
                            name,
                            route.label,
                            f"{describe_key(key)} is already routed to the older "
                            f"service {claims.winner}",
                            "conflict",
                        )
                    )
        found += self._port_problems()
        if cert_hosts is not None:
            found += self._cert_problems(cert_hosts)
        return sorted(set(found))

    def problem_for(self, host: str) -> Problem | None:
        """Why a host no route serves has none: a service's label naming it does not
        parse (first by service name), or None. Read on the 404 path only."""
        names = self._broken_hosts.get(host) or self._broken_hosts.get(normalize_host(host))
        if not names:
            return None
        return min(self._label_problems[min(names)])

    def _port_problems(self) -> list[Problem]:
        """Routes to a target port that no task serves: every task of the service maps
        its ports and none maps this one, and the service does not declare it. (A task
        with no port map serves every port as is.)"""
        found = []
        for name, routes in self._routes.items():
            tasks = self._tasks.get(name, {}).values()
            if not tasks or any(not t.ports for t in tasks):
                continue
            declared = {p.target_port for p in self._services[name].ports}
            mapped = sorted({port for t in tasks for port in t.ports})
            for route in routes:
                port = route.target_port
                if port and port not in declared and all(port not in t.ports for t in tasks):
                    found.append(
                        Problem(
                            name,
                            route.label,
                            f"{describe_key(route.key)}: target port {port} is served by no "
                            f"task (they map {', '.join(map(str, mapped))})",
                            "target_port",
                        )
                    )
        return found

    def _cert_problems(self, cert_hosts: Sequence[str]) -> list[Problem]:
        """HTTP routes whose host no HTTPS certificate of this node covers."""
        found = []
        for name, routes in self._routes.items():
            for route in routes:
                if route.passthrough or not route.host or cert_covers(cert_hosts, route.host):
                    continue
                effect = (
                    f"HTTPS clients get the default certificate ({cert_hosts[0]})"
                    if cert_hosts
                    else "HTTPS connections for it are closed"
                )
                found.append(
                    Problem(
                        name,
                        route.label,
                        f"no TLS certificate for {route.host} on this node: {effect}",
                        "certificate",
                    )
                )
        return found


def cert_covers(cert_hosts: Sequence[str], host: str) -> bool:
    """A certificate for `host` exactly or for `*.parent` (as the HTTPS listener picks)."""
    return host in cert_hosts or ("." in host and "*." + host.split(".", 1)[1] in cert_hosts)


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
        if length == 1 or (
            path.startswith(prefix) and (len(path) == length or path[length] in _BOUNDARY)
        ):
            return match
    return None


def _routing_view(service: Service) -> tuple[object, ...]:
    """What of a service its routes depend on; an update changing none of it is free."""
    labels = tuple(sorted((k, v) for k, v in service.labels.items() if is_routing_label(k)))
    ports = tuple(sorted(p.target_port for p in service.ports if p.protocol == "tcp"))
    return labels, ports, service.created_at
