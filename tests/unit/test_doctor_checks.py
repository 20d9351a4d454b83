"""mesh doctor's conclusions from facts (no I/O): each fault named, healthy facts all ok."""

from __future__ import annotations

from lb.table import ANY_ADDRESS, Real, Scheduler, ServiceOptions, VirtualKey, VirtualService
from mesh.core.sockets import address_of as _address
from mesh.doctor.checks import Facts, Listener, check_all, lb_drift, summary

KEY = VirtualKey("tcp", ANY_ADDRESS, 8080)
A, B = Real("10.0.0.5", 80), Real("10.0.0.6", 80)


def healthy() -> Facts:
    table = {KEY: VirtualService(KEY, ServiceOptions(), {A: 1})}
    return Facts(
        node="n1",
        agent_pid=10,
        agent_pids={10, 11},
        listeners=[Listener("gossip", "udp", "10.0.0.1", 7946, True)],
        dns={"web": (["10.0.1.2"], ["10.0.1.2"])},
        lb_backend="nftables",
        lb_programmed=table,
        lb_desired=dict(table),
        local_tasks={("web.1.x", "10.0.0.5", 80): None},
        members=[
            {"name": "n1", "status": "alive"},
            {"name": "n2", "status": "alive", "address": "10.0.0.2", "port": 7946},
        ],
        published=[("tcp", 8080, True)],
    )


def failures(facts: Facts) -> list[str]:
    return [f.message for f in check_all(facts) if f.status == "fail"]


def test_a_healthy_node_has_no_failure() -> None:
    findings = check_all(healthy())
    assert summary(findings)[1] == 0
    assert {f.check for f in findings} == {"listen", "dns", "lb", "tasks", "gossip", "routes"}


def test_each_fault_is_named() -> None:
    facts = healthy()
    facts.listeners.append(
        Listener("published port of api", "tcp", ANY_ADDRESS, 9090, False, 4242, "python3")
    )
    facts.local_tasks[("web.2.y", "10.0.0.6", 80)] = "Connection refused"
    facts.members.append({"name": "n3", "status": "dead", "address": "10.0.0.3", "port": 7946})
    assert facts.lb_programmed is not None
    facts.lb_programmed[KEY] = facts.lb_programmed[KEY].with_real(B, 1)
    facts.dns["tasks.web"] = (["10.0.0.5"], ["10.0.0.5", "10.0.0.6"])
    facts.digest_mismatch = {"n2": ("a" * 32, "b" * 32)}
    found = failures(facts)
    assert any("9090/tcp is held by python3 (pid 4242)" in m for m in found)
    assert any("web.2.y does not answer on 10.0.0.6:80: Connection refused" in m for m in found)
    assert any("n3" in m and "dead" in m for m in found)
    assert any("stale real server 10.0.0.6:80" in m for m in found)
    assert any("tasks.web resolves to 10.0.0.5, 10.0.0.6" in m for m in found)
    assert any("n2's tables differ" in m for m in found)
    assert len(found) == 6


def test_lb_drift_words() -> None:
    other = VirtualKey("udp", "10.0.1.2", 53)
    programmed = {
        KEY: VirtualService(KEY, ServiceOptions(), {A: 1}),
        other: VirtualService(other, ServiceOptions(), {}),
    }
    desired = {KEY: VirtualService(KEY, ServiceOptions(), {A: 0, B: 1})}
    assert lb_drift(programmed, desired) == [
        "stale virtual service udp/10.0.1.2:53: programmed, but nothing in the state wants it",
        "real server 10.0.0.5:80 under tcp/0.0.0.0:8080 has weight 1, the state says 0",
        "missing real server 10.0.0.6:80 under tcp/0.0.0.0:8080",
    ]


def test_a_kernel_backend_needs_no_socket_but_a_userspace_one_does() -> None:
    facts = healthy()
    facts.listeners = [
        Listener("published port", "tcp", ANY_ADDRESS, 8080, False, required_listener=False)
    ]
    assert failures(facts) == []
    facts.listeners = [Listener("published port", "tcp", ANY_ADDRESS, 8080, False)]
    assert failures(facts) == ["nothing listens for published port on 0.0.0.0:8080/tcp"]


def test_proc_net_addresses() -> None:
    assert _address("0100007F") == "127.0.0.1"
    assert _address("00000000000000000000000000000000") == "::"
    assert _address("0000000000000000FFFF00000B00000A") == "10.0.0.11"


def test_a_full_or_nearly_full_network_is_a_finding_with_a_hint() -> None:
    facts = healthy()
    facts.networks = [
        ("ingress", "127.16.0.0/16", 12),
        ("back", "10.0.1.0/24", 253),
        ("front", "10.0.2.0/24", 228),
        ("mid", "10.0.3.0/24", 227),
    ]
    findings = {f.message: f for f in check_all(facts) if f.check == "network"}
    full = findings["network back (10.0.1.0/24) is full: all 253 addresses are VIPs of services"]
    nearly = findings[
        "network front (10.0.2.0/24) is nearly full: 228 of 253 addresses are VIPs (90%)"
    ]
    assert full.status == nearly.status == "fail"
    assert "larger --subnet" in full.hint and "back" in full.hint
    assert findings["network mid (10.0.3.0/24): 227 of 253 addresses in use"].status == "ok"
    assert findings["network ingress (127.16.0.0/16): 12 of 65533 addresses in use"].status == "ok"
    facts.networks = [("ingress", "127.16.0.0/24", 253)]
    (ingress,) = [f for f in check_all(facts) if f.check == "network"]
    assert ingress.status == "fail" and "--ingress-subnet" in ingress.hint


def test_a_nearly_used_up_auto_port_range_is_a_finding() -> None:
    facts = healthy()
    facts.auto_ports = {"tcp": 2500, "udp": 3}
    found = [f for f in check_all(facts) if f.check == "network"]
    assert [(f.status, f.message) for f in found] == [
        (
            "fail",
            "2500 of the 2768 tcp ports of 30000-32767 (where a published port left out "
            "is picked) are published",
        )
    ]
    assert "published_port" in found[0].hint


def test_each_route_problem_is_a_failure_with_a_hint_for_its_kind() -> None:
    facts = healthy()
    facts.route_problems = [
        ("web", "label", "mesh.http.hosts", "mesh.http.port 'x' is not a port (1-65535)"),
        ("new", "conflict", "mesh.http.hosts", "http://a is already routed to the older service"),
    ]
    found = [f for f in check_all(facts) if f.check == "routes"]
    assert [(f.status, f.message) for f in found] == [
        (
            "fail",
            "service new: conflict problem in label mesh.http.hosts: http://a is already "
            "routed to the older service",
        ),
        (
            "fail",
            "service web: label problem in label mesh.http.hosts: mesh.http.port 'x' is "
            "not a port (1-65535)",
        ),
    ]
    assert all(f.hint for f in found)


def test_the_lb_check_shows_each_local_port_and_refused_options() -> None:
    facts = healthy()
    local = VirtualKey("tcp", ANY_ADDRESS, 9443)
    empty = VirtualKey("tcp", ANY_ADDRESS, 9444)
    for key, reals in ((local, {A: 1, B: 0}), (empty, {})):
        service = VirtualService(key, ServiceOptions(local=True), reals)
        assert facts.lb_programmed is not None and facts.lb_desired is not None
        facts.lb_programmed[key] = facts.lb_desired[key] = service
    facts.lb_problems = [("web", "mesh.lb.proxy_protocol", "the nftables backend cannot")]
    facts.route_problems = [("web", "lb", "mesh.lb.proxy_protocol", "the nftables backend cannot")]
    lb = [(f.status, f.message) for f in check_all(facts) if f.check == "lb"]
    assert (
        "ok",
        "published port tcp/9443 (traffic-policy=local): 1 task(s) of this node take its "
        "connections",
    ) in lb
    assert any(
        s == "fail" and "tcp/9444 (traffic-policy=local): no healthy task" in m for s, m in lb
    )
    assert (
        "fail",
        "service web: label mesh.lb.proxy_protocol refused: the nftables backend cannot",
    ) in lb
    # an L4 problem is the lb check's, not the HRM routes'
    assert [f.status for f in check_all(facts) if f.check == "routes"] == ["ok"]


def test_the_lb_check_names_each_virtual_services_policies() -> None:
    facts = healthy()
    key = VirtualKey("tcp", ANY_ADDRESS, 9445)
    options = ServiceOptions(Scheduler.MAGLEV, affinity=600)
    assert facts.lb_programmed is not None and facts.lb_desired is not None
    facts.lb_programmed[key] = facts.lb_desired[key] = VirtualService(key, options, {A: 1})
    lb = [(f.status, f.message) for f in check_all(facts) if f.check == "lb"]
    assert (
        "ok",
        f"virtual service {key}: maglev (consistent hashing), affinity client-ip:600",
    ) in lb
