"""mesh doctor's conclusions about sandboxes (no I/O): a healthy one all ok, each fault named."""

from __future__ import annotations

import dataclasses

from mesh.doctor.checks import (
    Facts,
    InterfaceSeen,
    SandboxEndpoint,
    SandboxFacts,
    check_sandboxes,
)
from mesh.doctor.probes import gateway_of

NETNS = "/run/netns/mp-abcdef-t1"


def healthy() -> SandboxFacts:
    return SandboxFacts(
        task="web.1.t1",
        netns=NETNS,
        endpoints=(
            SandboxEndpoint("a", "eth0", "10.0.1.5"),
            SandboxEndpoint("b", "eth1", "10.0.2.5"),
        ),
        want_gateway="10.0.1.1",
        interfaces={
            "lo": InterfaceSeen(True, ("127.0.0.1",)),
            "eth0": InterfaceSeen(True, ("10.0.1.5",)),
            "eth1": InterfaceSeen(True, ("10.0.2.5",)),
        },
        default_gateway="10.0.1.1",
        nameservers=["127.0.0.11"],
        dns={"api": (["10.0.1.2"], ["10.0.1.2"])},
        vips={("api", "10.0.1.2", 80): None},
    )


def facts(*sandboxes: SandboxFacts) -> Facts:
    return Facts(node="n1", agent_pid=1, agent_pids={1}, sandboxes=list(sandboxes))


def failures(sandbox: SandboxFacts) -> list[str]:
    return [f.message for f in check_sandboxes(facts(sandbox)) if f.status == "fail"]


def test_a_healthy_sandbox_is_all_ok() -> None:
    findings = list(check_sandboxes(facts(healthy())))
    assert [f.status for f in findings] == ["ok"] * 5, findings
    assert {f.check for f in findings} == {"sandbox"}


def test_no_sandbox_report_from_an_agent_without_them() -> None:
    assert list(check_sandboxes(Facts(node="n1", agent_pid=1, agent_pids={1}))) == []
    assert [f.status for f in check_sandboxes(facts())] == ["skip"]


def test_each_fault_is_named() -> None:
    sb = healthy()
    assert failures(dataclasses.replace(sb, exists=False)) == [
        f"sandbox of web.1.t1: its namespace {NETNS} does not exist"
    ]
    down = dataclasses.replace(
        sb, interfaces={**sb.interfaces, "eth1": InterfaceSeen(False, ("10.0.2.5",))}
    )
    assert failures(down) == ["sandbox of web.1.t1: eth1 is down"]
    moved = dataclasses.replace(
        sb, interfaces={**sb.interfaces, "eth0": InterfaceSeen(True, ("10.0.1.9",))}
    )
    assert failures(moved) == ["sandbox of web.1.t1: eth0 has 10.0.1.9, the state says 10.0.1.5"]
    gone = dataclasses.replace(
        sb, interfaces={k: v for k, v in sb.interfaces.items() if k != "eth1"}
    )
    assert failures(gone) == ["sandbox of web.1.t1: eth1 (network b) is missing"]
    assert failures(dataclasses.replace(sb, default_gateway=None)) == [
        "sandbox of web.1.t1: default route none, want via 10.0.1.1"
    ]
    assert failures(dataclasses.replace(sb, nameservers=["8.8.8.8"])) == [
        "sandbox of web.1.t1: resolv.conf names 8.8.8.8, not 127.0.0.11"
    ]
    assert failures(dataclasses.replace(sb, nameservers=None)) == [
        f"sandbox of web.1.t1: no /etc/netns resolv.conf for {NETNS}"
    ]
    assert failures(dataclasses.replace(sb, dns={"api": (["10.0.1.2"], None)})) == [
        "sandbox of web.1.t1: the DNS at 127.0.0.11 does not answer for api"
    ]
    assert failures(dataclasses.replace(sb, dns={"api": (["10.0.1.2"], ["10.0.2.2"])})) == [
        "sandbox of web.1.t1: api resolves to 10.0.2.2, want 10.0.1.2"
    ]
    assert failures(dataclasses.replace(sb, vips={("api", "10.0.1.2", 80): "Timed out"})) == [
        "sandbox of web.1.t1: VIP of api 10.0.1.2:80 does not answer: Timed out"
    ]


def test_internal_networks_only_want_no_default_route() -> None:
    internal = dataclasses.replace(healthy(), want_gateway=None, default_gateway=None)
    assert failures(internal) == []
    leaky = dataclasses.replace(internal, default_gateway="10.0.1.1")
    assert failures(leaky) == [
        "sandbox of web.1.t1: a default route via 10.0.1.1 on internal networks only"
    ]


def test_an_adopted_namespace_has_no_resolver_file_to_check() -> None:
    adopted = dataclasses.replace(healthy(), netns="/proc/42/ns/net", nameservers=None)
    assert failures(adopted) == []


def test_the_gateway_is_the_recorded_one_else_the_first_host() -> None:
    assert gateway_of({"subnet": "10.0.1.0/24", "gateway": "10.0.1.254"}) == "10.0.1.254"
    assert gateway_of({"subnet": "10.0.1.0/24"}) == "10.0.1.1"
    # an overlay sandbox leaves by this node's own address there (no node has the gateway)
    overlay = {"name": "app", "driver": "overlay", "subnet": "10.0.1.0/24", "gateway": "10.0.1.1"}
    assert gateway_of(overlay, {"app": "10.0.1.7"}) == "10.0.1.7"
    assert gateway_of(overlay, {}) == "10.0.1.1"


def test_a_vip_not_tried_is_a_skip_with_the_reason() -> None:
    sb = dataclasses.replace(healthy(), vips_skipped={("sq", "10.0.4.2"): "netq has icc=false"})
    findings = list(check_sandboxes(facts(sb)))
    assert [f.message for f in findings if f.status == "skip"] == [
        "sandbox of web.1.t1: VIP of sq 10.0.4.2 not tried: netq has icc=false"
    ]
    assert failures(sb) == []
