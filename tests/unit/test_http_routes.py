"""The HTTP route table: labels to routes, matching, health, conflicts, incremental updates."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lb.http.routes import Endpoint, Match, Problem, Route, RouteTable, normalize_host
from mesh.core.model import (
    Change,
    Health,
    Kind,
    PortConfig,
    Record,
    Service,
    Task,
    TaskState,
)

HRM = "com.docker.ucp.mesh.http"


def service(
    name: str, labels: dict[str, str], *, created: float = 0.0, published: tuple[int, ...] = ()
) -> Service:
    ports = tuple(
        PortConfig(protocol="tcp", target_port=p, published_port=30000 + p) for p in published
    )
    return Service(name=name, id=f"id-{name}", labels=labels, ports=ports, created_at=created)


def task(
    task_id: str,
    service_name: str,
    address: str = "10.0.0.2",
    *,
    slot: int = 1,
    ports: dict[int, int] | None = None,
    health: Health = Health.HEALTHY,
    state: TaskState = TaskState.RUNNING,
) -> Task:
    return Task(
        id=task_id,
        name=f"{service_name}.{slot}.{task_id}",
        service=service_name,
        slot=slot,
        node="node-1",
        address=address,
        ports=ports or {},
        health=health,
        state=state,
    )


def table_of(*records: Record) -> RouteTable:
    table = RouteTable()
    table.load(records)
    return table


def put(table: RouteTable, before: Record | None, after: Record) -> None:
    kind = Kind.SERVICE if isinstance(after, Service) else Kind.TASK
    table.on_change(Change(kind, after.key, before, after))


def delete(table: RouteTable, record: Service | Task) -> None:
    put(table, record, dataclasses.replace(record, deleted=True))


def routed(table: RouteTable, host: str, path: str = "/") -> str | None:
    found = table.match(host, path)
    return None if found is None else found.route.service


# -- label forms ------------------------------------------------------------------


def test_hrm1_form_items_keep_the_previous_port() -> None:
    table = table_of(
        service(
            "web", {HRM: "8080=http://a.example.com,http://b.example.com,9090=http://c.example.com"}
        )
    )
    ports = {r.host: r.target_port for r in table.routes()}
    assert ports == {"a.example.com": 8080, "b.example.com": 8080, "c.example.com": 9090}
    assert table.problems() == []


def test_hrm1_form_first_url_without_port_takes_the_one_published_port() -> None:
    table = table_of(service("web", {HRM: "http://a.example.com"}, published=(8000,)))
    assert [r.target_port for r in table.routes()] == [8000]


def test_hrm1_form_without_any_port_is_a_problem_when_several_are_published() -> None:
    table = table_of(service("web", {HRM: "http://a.example.com"}, published=(80, 81)))
    assert table.routes() == []
    [problem] = table.problems()
    assert problem.service == "web" and problem.label == HRM
    assert "required" in problem.reason


def test_mesh_http_hosts_and_port() -> None:
    table = table_of(
        service(
            "api",
            {"mesh.http.hosts": "API.example.com, api2.example.com", "mesh.http.port": "8080"},
        )
    )
    assert [(r.host, r.path_prefix, r.target_port) for r in table.routes()] == [
        ("api.example.com", "/", 8080),
        ("api2.example.com", "/", 8080),
    ]


def test_mesh_http_hosts_without_port_uses_the_published_port() -> None:
    table = table_of(service("api", {"mesh.http.hosts": "a.example.com"}, published=(5000,)))
    assert [r.target_port for r in table.routes()] == [5000]


def test_interlock_hosts_read_like_mesh_http_hosts() -> None:
    table = table_of(
        service("api", {"com.docker.lb.hosts": "a.example.com", "com.docker.lb.port": "8080"})
    )
    assert [(r.host, r.target_port) for r in table.routes()] == [("a.example.com", 8080)]


def test_hrm2_form_with_sticky_sessions_and_path() -> None:
    labels = {
        f"{HRM}.8080": "external_route=http://App.example.com/shop/,internal_port=8080,"
        "sticky_sessions=JSESSIONID,include_forwarded_for=true"
    }
    [route] = table_of(service("shop", labels)).routes()
    assert route == Route(
        "shop", "app.example.com", "/shop", 8080, "JSESSIONID", None, False, label=f"{HRM}.8080"
    )


def test_hrm2_several_numbered_labels_give_several_routes() -> None:
    labels = {
        f"{HRM}.1": "external_route=http://a.example.com,internal_port=80",
        f"{HRM}.2": "external_route=sni://a.example.com,internal_port=443",
    }
    routes = table_of(service("web", labels)).routes()
    assert [(r.passthrough, r.target_port) for r in routes] == [(False, 80), (True, 443)]


def test_hrm2_internal_port_defaults_to_the_one_published_port() -> None:
    [route] = table_of(
        service("web", {HRM: "external_route=http://a.example.com"}, published=(3000,))
    ).routes()
    assert route.target_port == 3000


def test_hrm2_redirect_route_needs_no_port() -> None:
    labels = {
        f"{HRM}.1": "external_route=http://a.example.com,redirect=https://a.example.com:8443",
        f"{HRM}.2": "external_route=sni://a.example.com,internal_port=443",
    }
    table = table_of(service("web", labels))
    found = table.match("a.example.com", "/")
    assert found is not None
    assert found.route.redirect == "https://a.example.com:8443"
    assert found.route.target_port == 0
    assert table.problems() == []


def test_sni_route_is_matched_by_sni_only_and_http_route_by_host_only() -> None:
    labels = {
        f"{HRM}.1": "external_route=sni://secure.example.com,internal_port=443",
        f"{HRM}.2": "external_route=http://plain.example.com,internal_port=80",
    }
    table = table_of(service("web", labels), task("t1", "web", ports={443: 8443}))
    sni = table.match_sni("Secure.Example.com")
    assert sni is not None and sni.route.passthrough
    assert sni.endpoints == (Endpoint("t1", "10.0.0.2", 8443),)
    assert table.match("secure.example.com", "/") is None
    assert table.match_sni("plain.example.com") is None


def test_empty_host_is_the_catch_all() -> None:
    table = table_of(
        service("default", {HRM: "external_route=http://,internal_port=80"}),
        service("tls-default", {HRM: "external_route=sni://,internal_port=443"}),
        service("known", {"mesh.http.hosts": "known.example.com", "mesh.http.port": "80"}),
    )
    assert routed(table, "known.example.com") == "known"
    assert routed(table, "other.example.com:8080") == "default"
    assert routed(table, "") == "default"
    found = table.match_sni("anything.example.com")
    assert found is not None and found.route.service == "tls-default"


def test_interlock_context_root_sets_the_prefix_and_rewrite_strips_it() -> None:
    labels = {
        "com.docker.lb.hosts": "a.example.com",
        "com.docker.lb.port": "80",
        "com.docker.lb.context_root": "/app/",
        "com.docker.lb.context_root_rewrite": "true",
        "com.docker.lb.sticky_session_cookie": "sid",
    }
    [route] = table_of(service("web", labels)).routes()
    assert (route.path_prefix, route.strip_prefix, route.sticky_cookie) == ("/app", True, "sid")


def test_service_without_routing_labels_has_no_route_and_no_problem() -> None:
    table = table_of(service("db", {"owner": "team-a"}), task("t1", "db"))
    assert table.routes() == [] and table.problems() == []


# -- invalid labels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({HRM: "garbage"}, "not a URL"),
        ({HRM: "99999=http://a.example.com"}, "not a port"),
        ({HRM: "80=ftp://a.example.com"}, "http:// only"),
        ({HRM: "80=http://a.example.com,"}, "empty item"),
        ({HRM: "80=http://a.example.com:8080"}, "no port here"),
        ({HRM: "80=http://a.example.com/?q=1"}, "no user, query or fragment"),
        ({HRM: "80=http://bad_host!.com"}, "not a host name"),
        ({HRM: "80=http://a.example.com/a/../b"}, "no . or .. segments"),
        ({HRM: "external_route=http://a.example.com,internal_port=80,color=blue"}, "key=value"),
        ({HRM: "internal_port=80"}, "external_route is required"),
        (
            {HRM: "external_route=http://a.example.com,internal_port=80,internal_port=81"},
            "given twice",
        ),
        ({HRM: "external_route=tcp://a.example.com,internal_port=80"}, "http:// or sni://"),
        ({HRM: "external_route=sni://a.example.com/x,internal_port=443"}, "cannot have a path"),
        (
            {HRM: "external_route=sni://a.example.com,internal_port=443,sticky_sessions=s"},
            "http:// routes only",
        ),
        (
            {HRM: "external_route=http://a.example.com,internal_port=80,sticky_sessions=a b"},
            "not a valid cookie name",
        ),
        ({HRM: "external_route=http://a.example.com,redirect=ftp://b.example.com"}, "redirect"),
        ({HRM: "external_route=http://a.example.com,internal_port=0"}, "not a port"),
        (
            {
                HRM: "external_route=http://a.example.com,internal_port=80,include_forwarded_for=maybe"
            },
            "true or false",
        ),
        ({HRM: "external_route=http://a.example.com"}, "internal_port is required"),
        ({"mesh.http.port": "80"}, "without mesh.http.hosts"),
        ({"mesh.http.hosts": "a.example.com", "mesh.http.port": "http"}, "not a port"),
        ({"mesh.http.hosts": "a.example.com,", "mesh.http.port": "80"}, "not a host name"),
        ({"com.docker.lb.context_root": "/app"}, "no http:// route"),
        (
            {
                "mesh.http.hosts": "a.example.com",
                "mesh.http.port": "80",
                "com.docker.lb.context_root": "app",
            },
            "not a path prefix",
        ),
        (
            {
                "mesh.http.hosts": "a.example.com",
                "mesh.http.port": "80",
                "com.docker.lb.context_root_rewrite": "true",
            },
            "without com.docker.lb.context_root",
        ),
        (
            {HRM: "80=http://a.example.com/x", "com.docker.lb.context_root": "/y"},
            "give the path once",
        ),
        (
            {
                HRM: "80=http://a.example.com",
                "mesh.http.hosts": "a.example.com",
                "mesh.http.port": "81",
            },
            "with other settings",
        ),
    ],
)
def test_invalid_label_gives_no_route_and_a_reason(labels: dict[str, str], reason: str) -> None:
    table = table_of(service("web", labels), task("t1", "web"))
    assert table.routes() == []
    assert table.match("a.example.com", "/") is None
    problems = table.problems()
    assert problems, "an invalid label must be reported"
    assert all(p.service == "web" for p in problems)
    assert any(reason in p.reason for p in problems), problems


label_keys = st.sampled_from(
    [
        HRM,
        f"{HRM}.1",
        "mesh.http.hosts",
        "mesh.http.port",
        "com.docker.lb.hosts",
        "com.docker.lb.context_root",
        "com.docker.lb.context_root_rewrite",
        "com.docker.lb.sticky_session_cookie",
    ]
)
label_text = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(
            [
                "80=",
                "http://",
                "sni://",
                "external_route=",
                "internal_port=",
                "sticky_sessions=",
                "redirect=",
                "a.example.com",
                "/p",
                ":8",
                ",",
                "=",
                "[::1]",
                "%",
                " ",
                "\u00e9",
                "80",
            ]
        ),
        max_size=8,
    ).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(label_keys, label_text, max_size=4))
@example({"mesh.http.hosts": "a.example.com", "mesh.http.port": "\u00b2"})  # isdigit, not int
@example({HRM: "\u0663=http://a.example.com"})  # isdigit, and int() would read it as 3
def test_any_label_value_gives_routes_or_reasons_never_an_exception(labels: dict[str, str]) -> None:
    table = table_of(service("web", labels, published=(80,)), task("t1", "web"))
    routes, problems = table.routes(), table.problems()
    assert not (routes and problems)
    for route in routes:
        assert route.host == route.host.lower() and ":" not in route.host
        assert route.path_prefix.startswith("/")
        assert route.path_prefix == "/" or not route.path_prefix.endswith("/")
        assert 0 <= route.target_port < 65536
    for problem in problems:
        assert problem.service == "web" and problem.label in labels and problem.reason


def test_one_bad_label_takes_the_whole_service_off_and_names_the_label() -> None:
    labels = {
        f"{HRM}.good": "external_route=http://a.example.com,internal_port=80",
        f"{HRM}.bad": "external_route=http://b.example.com,internal_port=x",
    }
    table = table_of(service("web", labels))
    assert table.routes() == []
    assert [p.label for p in table.problems()] == [f"{HRM}.bad"]


def test_the_same_route_twice_with_the_same_settings_is_fine() -> None:
    table = table_of(
        service(
            "web",
            {
                HRM: "80=http://a.example.com",
                "mesh.http.hosts": "a.example.com",
                "mesh.http.port": "80",
            },
        )
    )
    assert len(table.routes()) == 1 and table.problems() == []


def test_fixing_a_bad_label_brings_the_route_and_clears_the_problem() -> None:
    bad = service("web", {HRM: "80=http://a.example.com:99"})
    table = table_of(bad, task("t1", "web"))
    assert table.problems()
    put(table, bad, service("web", {HRM: "80=http://a.example.com"}))
    assert routed(table, "a.example.com") == "web"
    assert table.problems() == []


# -- conflicts --------------------------------------------------------------------


def test_two_services_on_one_host_the_older_wins_in_any_load_order() -> None:
    old = service("zeta", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}, created=1.0)
    new = service("alpha", {HRM: "80=http://a.example.com"}, created=2.0)
    for records in ([old, new], [new, old]):
        table = table_of(*records)
        assert routed(table, "a.example.com") == "zeta"
        assert table.problems() == [
            Problem(
                "alpha",
                HRM,
                "http://a.example.com is already routed to the older service zeta",
                "conflict",
            )
        ]


def test_a_tie_in_age_goes_to_the_first_name() -> None:
    labels = {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}
    table = table_of(service("b", labels), service("a", labels))
    assert routed(table, "a.example.com") == "a"


def test_the_loser_takes_over_when_the_winner_goes() -> None:
    old = service("old", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}, created=1.0)
    new = service("new", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}, created=2.0)
    table = table_of(old, new, task("t-new", "new", "10.0.0.9"))
    delete(table, old)
    found = table.match("a.example.com", "/")
    assert found is not None and found.route.service == "new"
    assert found.endpoints == (Endpoint("t-new", "10.0.0.9", 80),)
    assert table.problems() == []


def test_different_paths_of_one_host_do_not_conflict() -> None:
    table = table_of(
        service("site", {HRM: "80=http://a.example.com"}),
        service("api", {HRM: "80=http://a.example.com/api"}),
    )
    assert routed(table, "a.example.com", "/api/users") == "api"
    assert routed(table, "a.example.com", "/index.html") == "site"
    assert table.problems() == []


# -- matching ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "a.example.com",
        "A.Example.COM",
        "a.example.com:8080",
        "a.example.com.",
        "A.EXAMPLE.COM.:80",
        " a.example.com ",
    ],
)
def test_host_matches_case_insensitively_without_port(host: str) -> None:
    table = table_of(service("web", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}))
    assert routed(table, host) == "web"


@pytest.mark.parametrize(
    "host",
    ["b.example.com", "example.com", "a.example.com.evil", "[::1]:80", "[::1", ":80", "", "\x00"],
)
def test_other_hosts_do_not_match(host: str) -> None:
    table = table_of(service("web", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}))
    assert table.match(host, "/") is None


def test_normalize_host() -> None:
    assert normalize_host("[::1]:8080") == "[::1]"
    assert normalize_host("Example.COM:443") == "example.com"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "root"),
        ("/api", "api"),
        ("/api/", "api"),
        ("/api?x=1", "api"),
        ("/api#f", "api"),
        ("/apix", "root"),
        ("/api/v2", "v2"),
        ("/api/v2/items", "v2"),
        ("/api/v22", "api"),
        ("/API", "root"),
        ("*", "root"),
        ("", "root"),
    ],
)
def test_longest_path_prefix_wins_on_segment_boundaries(path: str, expected: str) -> None:
    table = table_of(
        service("root", {HRM: "80=http://a.example.com"}),
        service("api", {HRM: "80=http://a.example.com/api"}),
        service("v2", {HRM: "80=http://a.example.com/api/v2/"}),
    )
    assert routed(table, "a.example.com", path) == expected


def test_a_host_without_a_route_for_the_path_falls_back_to_the_catch_all() -> None:
    table = table_of(
        service("api", {HRM: "80=http://a.example.com/api"}),
        service("default", {HRM: "external_route=http://,internal_port=80"}),
    )
    assert routed(table, "a.example.com", "/api/x") == "api"
    assert routed(table, "a.example.com", "/other") == "default"


def test_no_route_is_none() -> None:
    table = table_of(service("api", {HRM: "80=http://a.example.com/api"}))
    assert table.match("a.example.com", "/other") is None
    assert table.match("b.example.com", "/api") is None
    assert table.match_sni("a.example.com") is None


def test_match_returns_the_prebuilt_object_every_time() -> None:
    table = table_of(service("web", {HRM: "80=http://a.example.com"}), task("t1", "web"))
    first = table.match("a.example.com", "/x")
    assert first is not None
    assert table.match("a.example.com", "/y") is first
    assert table.match("A.example.com:80", "/") is first


# -- endpoints and health -----------------------------------------------------------


WEB = service("web", {HRM: "8080=http://a.example.com"})


def endpoints(table: RouteTable) -> tuple[Endpoint, ...]:
    found = table.match("a.example.com", "/")
    assert found is not None
    return found.endpoints


def test_endpoints_are_healthy_running_tasks_at_their_actual_port_in_slot_order() -> None:
    table = table_of(
        WEB,
        task("t2", "web", "10.0.0.3", slot=2),
        task("t1", "web", "10.0.0.2", slot=1, ports={8080: 31000}),
        task("t3", "web", "10.0.0.4", slot=3, health=Health.UNHEALTHY),
        task("t4", "web", "10.0.0.5", slot=4, health=Health.STARTING),
        task("t5", "web", "10.0.0.6", slot=5, state=TaskState.DRAINING),
        task("other", "api", "10.0.0.7"),
    )
    assert endpoints(table) == (Endpoint("t1", "10.0.0.2", 31000), Endpoint("t2", "10.0.0.3", 8080))


def test_a_service_without_healthy_tasks_matches_with_no_endpoints() -> None:
    table = table_of(WEB, task("t1", "web", health=Health.UNHEALTHY))
    assert endpoints(table) == ()


def test_health_transitions_move_a_task_in_and_out() -> None:
    table = table_of(WEB)
    starting = task("t1", "web", health=Health.STARTING)
    put(table, None, starting)
    assert endpoints(table) == ()
    healthy = dataclasses.replace(starting, health=Health.HEALTHY)
    put(table, starting, healthy)
    assert endpoints(table) == (Endpoint("t1", "10.0.0.2", 8080),)
    unhealthy = dataclasses.replace(healthy, health=Health.UNHEALTHY)
    put(table, healthy, unhealthy)
    assert endpoints(table) == ()
    put(table, unhealthy, healthy)
    draining = dataclasses.replace(healthy, state=TaskState.DRAINING, drain_until=5.0)
    put(table, healthy, draining)
    assert endpoints(table) == ()
    put(table, draining, healthy)
    delete(table, healthy)
    assert endpoints(table) == ()


def test_tasks_known_before_their_service_are_routed_when_it_arrives() -> None:
    table = RouteTable()
    put(table, None, task("t1", "web"))
    put(table, None, WEB)
    assert endpoints(table) == (Endpoint("t1", "10.0.0.2", 8080),)
    delete(table, WEB)
    assert table.match("a.example.com", "/") is None
    put(table, None, WEB)
    assert endpoints(table) == (Endpoint("t1", "10.0.0.2", 8080),)


def test_a_task_moving_to_another_service_leaves_the_first() -> None:
    api = service("api", {HRM: "80=http://b.example.com"})
    t1 = task("t1", "web")
    table = table_of(WEB, api, t1)
    put(table, t1, dataclasses.replace(t1, service="api"))
    assert endpoints(table) == ()
    found = table.match("b.example.com", "/")
    assert found is not None and [e.task_id for e in found.endpoints] == ["t1"]


def test_a_changed_target_port_remaps_the_endpoints() -> None:
    table = table_of(WEB, task("t1", "web", ports={8080: 31000, 9090: 32000}))
    put(table, WEB, service("web", {HRM: "9090=http://a.example.com"}))
    assert endpoints(table) == (Endpoint("t1", "10.0.0.2", 32000),)


# -- incremental ----------------------------------------------------------------------


def test_a_task_change_rebuilds_only_its_own_services_matches() -> None:
    api = service("api", {HRM: "80=http://b.example.com"})
    t_web, t_api = task("t1", "web"), task("t2", "api")
    table = table_of(WEB, api, t_web, t_api)
    web_before, api_before = table.match("a.example.com", "/"), table.match("b.example.com", "/")
    generation = table.generation
    put(table, t_web, dataclasses.replace(t_web, health=Health.UNHEALTHY))
    assert table.match("b.example.com", "/") is api_before
    assert table.match("a.example.com", "/") is not web_before
    assert table.generation == generation + 1


def test_a_task_change_that_routing_does_not_see_changes_nothing() -> None:
    t1 = task("t1", "web")
    table = table_of(WEB, t1)
    before, generation = table.match("a.example.com", "/"), table.generation
    put(table, t1, dataclasses.replace(t1, health_output="ok again", updated_at=9.0))
    unhealthy = task("t9", "web", "10.0.0.9", health=Health.UNHEALTHY)
    put(table, None, unhealthy)
    put(table, unhealthy, dataclasses.replace(unhealthy, health=Health.STARTING))
    assert table.match("a.example.com", "/") is before
    assert table.generation == generation


def test_a_service_update_outside_its_routing_labels_keeps_the_match() -> None:
    table = table_of(WEB, task("t1", "web"))
    before, generation = table.match("a.example.com", "/"), table.generation
    put(
        table,
        WEB,
        dataclasses.replace(WEB, labels={**WEB.labels, "owner": "team-b"}, updated_at=5.0),
    )
    assert table.match("a.example.com", "/") is before
    assert table.generation == generation


def test_load_replaces_what_the_table_held() -> None:
    table = table_of(WEB, task("t1", "web"))
    table.load([service("api", {HRM: "80=http://b.example.com"})])
    assert [r.service for r in table.routes()] == ["api"]


# -- incremental equals from scratch (property) -------------------------------------

# Few services, hosts and tasks, so that sequences often collide: two services on
# one host (conflicts), a task moving between services, a service losing its labels.
LABEL_SETS = [
    {},
    {"mesh.http.hosts": "x.com", "mesh.http.port": "80"},
    {HRM: "80=http://x.com/api,http://y.com"},
    {
        f"{HRM}.1": "external_route=sni://x.com,internal_port=443",
        f"{HRM}.2": "external_route=http://x.com,redirect=https://x.com",
    },
    {HRM: "external_route=http://,internal_port=80,sticky_sessions=sid"},
    {"mesh.http.hosts": "x.com", "mesh.http.port": "8080", "com.docker.lb.context_root": "/api"},
    {HRM: "bad"},
    {"mesh.http.hosts": "x.com", "mesh.http.port": "x"},  # names x.com, does not parse
    {HRM: "external_route=http://y.com,internal_port=nope"},
]
PROBES = [(h, p) for h in ("x.com", "Y.COM:80", "z.com") for p in ("/", "/api", "/api/v1", "/apix")]

removals = st.sampled_from([False, False, False, True])  # mostly puts: richer states
service_ops = st.tuples(
    st.just("service"),
    st.sampled_from("abc"),
    st.integers(0, len(LABEL_SETS) - 1),
    st.sampled_from([0.0, 1.0, 2.0]),
    removals,
)
task_ops = st.tuples(
    st.just("task"),
    st.sampled_from(["t1", "t2", "t3"]),
    st.tuples(
        st.sampled_from("ab"),
        st.sampled_from([Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY, Health.STARTING]),
        st.sampled_from([TaskState.RUNNING, TaskState.RUNNING, TaskState.DRAINING]),
        st.sampled_from(["10.0.0.2", "10.0.0.3"]),
        st.sampled_from([{}, {80: 31080}, {8080: 31808, 443: 31443}]),
    ),
    st.just(0.0),
    removals,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(service_ops, task_ops), max_size=30))
def test_incremental_changes_equal_a_table_built_from_scratch(ops: list[tuple[Any, ...]]) -> None:
    live: dict[tuple[str, str], Service | Task] = {}
    table = RouteTable()
    for op, key, spec, created, remove in ops:
        before = live.get((op, key))
        if remove:
            if before is None:
                continue
            after: Service | Task = dataclasses.replace(before, deleted=True)
            del live[(op, key)]
        elif op == "service":
            after = service(key, LABEL_SETS[spec], created=created)
            live[(op, key)] = after
        else:
            owner, health, state, address, ports = spec
            after = task(key, owner, address, ports=ports, health=health, state=state)
            live[(op, key)] = after
        put(table, before, after)
        scratch = table_of(*live.values())
        assert table.matches() == scratch.matches()
        assert table.problems() == scratch.problems()
        assert table.problems(["x.com"]) == scratch.problems(["x.com"])
        for host, _ in PROBES:
            assert table.problem_for(host) == scratch.problem_for(host)
        for host, path in PROBES:
            assert table.match(host, path) == scratch.match(host, path)
            assert table.match_sni(host) == scratch.match_sni(host)


def test_match_objects_are_values() -> None:
    route = Route("web", "a.example.com", "/", 80, None, None, False)
    assert Match(route, ()) == Match(route, ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.host = "b"  # type: ignore[misc]


# -- problems, by kind (what the API, `mesh doctor` and the 404 body show) --------------


def test_problem_kind_label_for_bad_syntax() -> None:
    table = table_of(service("web", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "x"}))
    [problem] = table.problems()
    assert problem.kind == "label" and problem.label == "mesh.http.hosts"
    assert "mesh.http.port 'x' is not a port" in problem.reason


def test_problem_kind_conflict_for_a_host_claimed_twice() -> None:
    labels = {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"}
    table = table_of(service("old", labels, created=1.0), service("new", labels, created=2.0))
    [problem] = table.problems()
    assert problem.kind == "conflict" and problem.service == "new"
    assert "older service old" in problem.reason


def test_problem_kind_target_port_when_every_task_maps_other_ports() -> None:
    labels = {"mesh.http.hosts": "a.example.com", "mesh.http.port": "8080"}
    table = table_of(service("web", labels), task("t1", "web", ports={80: 31000}))
    [problem] = table.problems()
    assert problem.kind == "target_port" and problem.label == "mesh.http.hosts"
    assert "target port 8080 is served by no task (they map 80)" in problem.reason
    # a task mapping it, a task that maps nothing (serves every port as is), or the
    # service declaring the port: no problem
    for fixed in (
        table_of(service("web", labels), task("t1", "web", ports={8080: 31000})),
        table_of(service("web", labels), task("t1", "web", ports={80: 1}), task("t2", "web")),
        table_of(service("web", labels, published=(8080,)), task("t1", "web", ports={80: 1})),
        table_of(service("web", labels)),
    ):
        assert fixed.problems() == []


def test_problem_kind_target_port_follows_task_changes() -> None:
    labels = {"mesh.http.hosts": "a.example.com", "mesh.http.port": "8080"}
    table = table_of(service("web", labels))
    first = task("t1", "web", ports={80: 31000})
    put(table, None, first)
    assert [p.kind for p in table.problems()] == ["target_port"]
    put(table, first, dataclasses.replace(first, ports={8080: 31000}))
    assert table.problems() == []


def test_problem_kind_certificate_for_a_host_no_certificate_covers() -> None:
    labels = {"mesh.http.hosts": "a.example.com,b.other.test,c.other.test", "mesh.http.port": "80"}
    table = table_of(service("web", labels))
    assert table.problems() == []  # no HTTPS listener: no certificate needed
    problems = table.problems(cert_hosts=["*.other.test"])
    assert [(p.kind, p.reason) for p in problems] == [
        (
            "certificate",
            "no TLS certificate for a.example.com on this node: "
            "HTTPS clients get the default certificate (*.other.test)",
        )
    ]
    closed = table.problems(cert_hosts=[])
    assert len(closed) == 3
    assert all(p.reason.endswith("HTTPS connections for it are closed") for p in closed)
    # a passthrough route needs none: the task terminates TLS
    sni = table_of(service("tls", {HRM: "external_route=sni://s.example.com,internal_port=443"}))
    assert sni.problems(cert_hosts=["x.test"]) == []


def test_problem_for_names_the_broken_label_of_a_host_until_it_is_fixed() -> None:
    bad = service("web", {"mesh.http.hosts": "A.example.com:8000", "mesh.http.port": "x"})
    table = table_of(bad)
    assert table.match("a.example.com", "/") is None
    problem = table.problem_for("A.Example.com:80")
    assert problem is not None and problem.service == "web"
    assert problem.label == "mesh.http.hosts" and "'x' is not a port" in problem.reason
    assert table.problem_for("b.example.com") is None
    hrm = service("h", {HRM: "external_route=http://h.example.com/x,internal_port=nope"})
    put(table, None, hrm)
    found = table.problem_for("h.example.com")
    assert found is not None and found.service == "h"
    good = dataclasses.replace(bad, labels={"mesh.http.hosts": "a.example.com"}, ports=())
    put(table, bad, dataclasses.replace(good, labels={**good.labels, "mesh.http.port": "80"}))
    assert table.problem_for("a.example.com") is None
    delete(table, hrm)
    assert table.problem_for("h.example.com") is None


def test_route_problems_view_groups_by_service_with_this_nodes_certificates() -> None:
    from lb.http.problems import RouteProblems

    view = RouteProblems(cert_hosts=["a.example.com"])
    good = service("good", {"mesh.http.hosts": "a.example.com", "mesh.http.port": "80"})
    view.load([good, service("bad", {"mesh.http.port": "80"})])
    assert {name: [p.kind for p in ps] for name, ps in view.by_service().items()} == {
        "bad": ["label"]
    }
    moved = dataclasses.replace(good, labels={**good.labels, "mesh.http.hosts": "b.example.com"})
    view.on_change(Change(Kind.SERVICE, "good", good, moved))
    assert [(p.service, p.kind) for p in view.route_problems()] == [
        ("bad", "label"),
        ("good", "certificate"),
    ]
