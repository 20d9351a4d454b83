"""`mesh service update`: the PATCH body computed from the current service and the flags."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.cli.errors import CliError, UsageError
from mesh.cli.update import ServiceChanges, compute_patch, version_of


def service(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web",
        "id": "abc",
        "networks": ["front", "back"],
        "endpoint_mode": "vip",
        "ports": [
            {
                "protocol": "tcp",
                "target_port": 80,
                "published_port": 8080,
                "publish_mode": "ingress",
                "extra": "dropped",
            }
        ],
        "labels": {"tier": "web", "team": "a"},
        "vips": [{"network": "front", "address": "10.0.1.2"}],
        "health_check": {"type": "tcp", "port": 80},
        "version": 7,
    }
    return base | fields


PORT_8080 = {
    "protocol": "tcp",
    "target_port": 80,
    "published_port": 8080,
    "publish_mode": "ingress",
}


@pytest.mark.parametrize(
    ("changes", "patch"),
    [
        (ServiceChanges(network_add=("db",)), {"networks": ["front", "back", "db"]}),
        (ServiceChanges(network_rm=("front",)), {"networks": ["back"]}),
        (
            ServiceChanges(network_rm=("front",), network_add=("front",)),
            {"networks": ["back", "front"]},
        ),
        (
            ServiceChanges(label_add={"team": "b", "new": ""}),
            {"labels": {"tier": "web", "team": "b", "new": ""}},
        ),
        (ServiceChanges(label_rm=("team",)), {"labels": {"tier": "web"}}),
        (ServiceChanges(endpoint_mode="dnsrr"), {"endpoint_mode": "dnsrr"}),
        (ServiceChanges(clear_health_check=True), {"health_check": None}),
        (ServiceChanges(health_check={"type": "http"}), {"health_check": {"type": "http"}}),
        (ServiceChanges(publish_rm=((8080, "tcp"),)), {"ports": []}),
        (
            ServiceChanges(publish_add=({"target_port": 53, "protocol": "udp"},)),
            {"ports": [PORT_8080, {"target_port": 53, "protocol": "udp"}]},
        ),
        (ServiceChanges(weights={"web.1.abc": 0}), {"weights": {"web.1.abc": 0}}),
        (  # --locality any: the label dropped when present, no error when absent
            ServiceChanges(label_drop=("mesh.lb.locality", "absent")),
            {"labels": {"tier": "web", "team": "a"}},
        ),
    ],
)
def test_patch(changes: ServiceChanges, patch: dict[str, Any]) -> None:
    assert compute_patch(service(), changes) == patch


def test_removals_come_before_additions() -> None:
    changes = ServiceChanges(
        publish_rm=((8080, "tcp"),),
        publish_add=({"target_port": 81, "published_port": 8080, "protocol": "tcp"},),
    )
    assert compute_patch(service(), changes) == {
        "ports": [{"target_port": 81, "published_port": 8080, "protocol": "tcp"}]
    }


@pytest.mark.parametrize(
    "port",
    [
        {"target_port": 80, "published_port": 8080, "protocol": "tcp"},
        {"target_port": 80, "protocol": "tcp"},  # auto: the existing 8080 already serves 80
        {"target_port": 80, "published_port": 8080, "protocol": "tcp", "publish_mode": "ingress"},
        {"target_port": 80, "published_port": 8080, "traffic_policy": "cluster"},
    ],
)
def test_adding_a_port_already_published_changes_nothing(port: dict[str, Any]) -> None:
    assert compute_patch(service(), ServiceChanges(publish_add=(port,))) == {"ports": [PORT_8080]}


@pytest.mark.parametrize(
    "port",
    [
        {"target_port": 80, "published_port": 8080, "protocol": "udp"},
        {"target_port": 80, "published_port": 8080, "protocol": "tcp", "publish_mode": "host"},
        {"target_port": 81, "published_port": 8080, "protocol": "tcp"},  # the agent refuses it
    ],
)
def test_adding_a_different_port_appends_it(port: dict[str, Any]) -> None:
    assert compute_patch(service(), ServiceChanges(publish_add=(port,))) == {
        "ports": [PORT_8080, port]
    }


def test_a_port_switches_to_local_traffic_policy_by_removal_and_addition() -> None:
    """`--publish-rm 8080 --publish-add 8080:80,traffic-policy=local`; the policy of a
    port read from the agent is kept by a patch that touches other ports."""
    local = {"target_port": 80, "published_port": 8080, "protocol": "tcp"}
    local["traffic_policy"] = "local"
    changes = ServiceChanges(publish_rm=((8080, "tcp"),), publish_add=(local,))
    assert compute_patch(service(), changes) == {"ports": [local]}
    current = service(ports=[PORT_8080 | {"traffic_policy": "local"}])
    more = {"target_port": 81, "published_port": 8081, "protocol": "tcp"}
    assert compute_patch(current, ServiceChanges(publish_add=(more,))) == {
        "ports": [PORT_8080 | {"traffic_policy": "local"}, more]
    }


def test_several_fields_at_once_and_the_rest_left_out() -> None:
    changes = ServiceChanges(
        network_add=("db",),
        label_rm=("tier",),
        endpoint_mode="vip",
        health_check={"type": "ttl", "ttl": 10},
    )
    assert compute_patch(service(), changes) == {
        "networks": ["front", "back", "db"],
        "labels": {"team": "a"},
        "endpoint_mode": "vip",
        "health_check": {"type": "ttl", "ttl": 10},
    }


def test_the_service_is_not_modified() -> None:
    current = service()
    compute_patch(
        current,
        ServiceChanges(network_rm=("front",), label_rm=("team",), publish_rm=((8080, "tcp"),)),
    )
    assert current == service()


def test_a_service_without_optional_fields() -> None:
    bare = {"name": "web", "networks": None, "ports": None, "labels": None}
    changes = ServiceChanges(
        network_add=("a",),
        label_add={"k": "v"},
        publish_add=({"target_port": 80, "protocol": "tcp"},),
    )
    assert compute_patch(bare, changes) == {
        "networks": ["a"],
        "labels": {"k": "v"},
        "ports": [{"target_port": 80, "protocol": "tcp"}],
    }


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (ServiceChanges(network_rm=("db",)), "service 'web' is not attached to network 'db'"),
        (
            ServiceChanges(network_add=("front",)),
            "service 'web' is already attached to network 'front'",
        ),
        (ServiceChanges(publish_rm=((8080, "udp"),)), "service 'web' does not publish 8080/udp"),
        (ServiceChanges(publish_rm=((9090, "tcp"),)), "service 'web' does not publish 9090/tcp"),
        (ServiceChanges(label_rm=("nope",)), "service 'web' has no label 'nope'"),
    ],
)
def test_a_removal_that_misses_is_an_error(changes: ServiceChanges, reason: str) -> None:
    with pytest.raises(CliError) as caught:
        compute_patch(service(), changes)
    assert str(caught.value) == reason
    assert caught.value.exit_code == 1


def test_nothing_to_update_is_a_usage_error() -> None:
    assert ServiceChanges().is_empty()
    assert not ServiceChanges(label_add={"a": "b"}).is_empty()
    with pytest.raises(UsageError, match="nothing to update"):
        compute_patch(service(), ServiceChanges())


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (7, "7"),
        ([12, "node-a"], "12"),
        ({"clock": 3, "node": "n"}, "3"),
        ("9", "9"),
        (None, None),
        ([], None),
        (True, None),
        (1.5, None),
    ],
)
def test_version_of(version: Any, expected: str | None) -> None:
    assert version_of(service(version=version)) == expected
    assert version_of({"name": "web"}) is None


def test_each_route_problem_of_the_answer_is_one_warning_line() -> None:
    from mesh.cli.service import problem_warnings

    assert problem_warnings(service()) == []
    problem = {"kind": "label", "label": "mesh.http.hosts", "reason": "'x' is not a port"}
    assert problem_warnings(service(problems=[problem])) == [
        "service web: label problem in label mesh.http.hosts: 'x' is not a port"
    ]


def test_weight_and_locality_flags() -> None:
    import argparse

    from mesh.cli import spec
    from mesh.cli.errors import SpecError

    assert spec.parse_task_weights(["web.1.abc=0", "d41d=1000"]) == {"web.1.abc": 0, "d41d": 1000}
    for bad in (["web.1.abc"], ["=3"], ["a=1001"], ["a=-1"], ["a=x"]):
        with pytest.raises(SpecError):
            spec.parse_task_weights(bad)
    assert spec.parse_weight("7") == 7
    with pytest.raises(argparse.ArgumentTypeError):
        spec.parse_weight("1001")
