"""Traffic policy as the health check and the service problems show it (lb/policy.py)."""

from __future__ import annotations

import dataclasses

from lb.policy import healthz, lb_problems
from lb.view import LbView
from mesh.api.convert import lb_policy, service_model
from mesh.core.model import Health, PortConfig
from tests.unit.test_lb_view import NODE, put, service, task

LOCAL = (PortConfig(protocol="tcp", target_port=80, published_port=30080, traffic_policy="local"),)


def test_local_policy_serves_while_this_node_has_a_healthy_task() -> None:
    view = LbView(NODE)
    mine = task("a", "10.0.1.5")
    view.load([service(ports=LOCAL), mine, task("b", "10.0.1.6", node="n2")])
    answer = healthz(view, "web")
    assert answer.status == 200
    assert answer.body["traffic_policy"] == "local"
    assert (answer.body["local_healthy_tasks"], answer.body["healthy_tasks"]) == (1, 2)
    sick = dataclasses.replace(mine, health=Health.UNHEALTHY)
    view.on_change(put(mine, sick))
    answer = healthz(view, "WEB")  # names are case-insensitive, as in the state
    assert answer.status == 503
    assert answer.body == {
        "service": "web",
        "node": NODE,
        "traffic_policy": "local",
        "local_healthy_tasks": 0,
        "healthy_tasks": 1,
        "serving": False,
    }
    view.on_change(put(sick, mine))
    assert healthz(view, "web").status == 200


def test_cluster_policy_serves_while_any_node_has_a_healthy_task() -> None:
    view = LbView(NODE)
    remote = task("b", "10.0.1.6", node="n2")
    view.load([service(), remote])
    assert healthz(view, "web").status == 200
    view.on_change(put(remote, dataclasses.replace(remote, health=Health.STARTING)))
    assert healthz(view, "web").status == 503
    assert healthz(view, "nope").status == 404


def test_the_proxy_label_is_a_problem_on_a_kernel_backend_only() -> None:
    view = LbView(NODE, proxy_supported=False)
    view.load([service(labels={"mesh.lb.proxy_protocol": "v2"}), service("api", ports=())])
    for backend in ("nftables", "ipvs"):
        problems = lb_problems(view, backend)
        assert list(problems) == ["web"]
        (problem,) = problems["web"]
        assert (problem.kind, problem.label) == ("lb", "mesh.lb.proxy_protocol")
        assert backend in problem.reason and "--lb userspace" in problem.reason
    assert lb_problems(view, "userspace") == {}


def test_local_policy_is_a_problem_where_the_client_address_is_not_kept() -> None:
    view = LbView(NODE)
    view.load([service(ports=LOCAL), service("api")])
    assert lb_problems(view, "nftables") == lb_problems(view, "ipvs") == {}
    (problem,) = lb_problems(view, "userspace")["web"]
    assert (problem.kind, problem.label) == ("lb", "traffic_policy")
    assert "see this node's address" in problem.reason
    assert "proxy_protocol=v2" in problem.reason


def test_a_transparent_userspace_proxy_keeps_the_address_for_tcp_only() -> None:
    udp = (PortConfig(protocol="udp", target_port=53, published_port=5353, traffic_policy="local"),)
    view = LbView(NODE)
    view.load([service(ports=LOCAL), service("dns", ports=udp)])
    assert list(lb_problems(view, "userspace", transparent=True)) == ["dns"]
    assert sorted(lb_problems(view, "userspace")) == ["dns", "web"]
    assert lb_problems(view, "ipvs") == lb_problems(view, "nftables") == {}


def test_least_connections_is_a_problem_on_nftables_only() -> None:
    view = LbView(NODE)
    view.load([service(labels={"mesh.lb.scheduler": "lc"}), service("api")])
    (problem,) = lb_problems(view, "nftables")["web"]
    assert (problem.kind, problem.label) == ("lb", "mesh.lb.scheduler")
    assert "least connections" in problem.reason
    assert lb_problems(view, "ipvs") == lb_problems(view, "userspace") == {}


def test_inspect_shows_each_policy_the_labels_ask_for() -> None:
    labels = {
        "mesh.lb.scheduler": "maglev",
        "mesh.lb.affinity": "client-ip:600",
        "mesh.lb.locality": "prefer-local",
    }
    assert lb_policy(service(labels=labels)) == {
        "algorithm": "maglev",
        "affinity": "client-ip:600",
        "locality": "prefer-local",
        "proxy_protocol": False,
    }
    assert lb_policy(service()) == {
        "algorithm": "rr",
        "affinity": "none",
        "locality": "any",
        "proxy_protocol": False,
    }
    # the answer's model takes it (what the OpenAPI description says)
    out = service_model(service(labels={"mesh.lb.scheduler": "wrr"}))
    assert out.lb is not None and out.lb.algorithm == "wrr"
