"""The sandbox manager's decisions (mesh/sandbox/plan.py): what each change needs, and
what the start's reconciliation removes and makes, from records alone."""

from __future__ import annotations

import dataclasses

from mesh.core.model import Endpoint, Network, Sandbox, Task
from mesh.sandbox.names import bridge_name, netns_name, netns_prefix, veth_name
from mesh.sandbox.plan import (
    CreateNetwork,
    DeleteNamespace,
    DeleteNetwork,
    DeleteVeth,
    EnsureSandbox,
    Found,
    Leave,
    RemoveSandbox,
    network_transition,
    network_want,
    reconcile,
    sandbox_transition,
    sandbox_want,
)

NODE = "n1"


def net(name: str, net_id: str, subnet: str, **kw: object) -> Network:
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    fields: dict[str, object] = dict(
        name=name, id=net_id, driver="bridge", subnet=subnet, gateway=gateway, scope="local"
    )
    fields.update(node=NODE)
    fields.update(kw)
    return Network(**fields)  # type: ignore[arg-type]


A = net("a", "aaaaaaaa1111", "10.0.1.0/24")
B = net("b", "bbbbbbbb2222", "10.0.2.0/24", internal=True)
C = net("c", "cccccccc3333", "10.0.3.0/24")
NETS = {n.name: n for n in (A, B, C)}


def task(task_id: str, *networks: str, adopted: str | None = None, node: str = NODE) -> Task:
    endpoints = tuple(
        Endpoint(
            network=n,
            address=NETS[n].subnet.rsplit(".", 1)[0] + f".{10 + i}",
            mac=f"02:42:0a:00:0{i}:0a",
            interface=f"eth{i}",
        )
        for i, n in enumerate(networks)
    )
    sandbox = Sandbox(
        netns=adopted or f"/run/netns/{netns_name(node, task_id)}",
        adopted=adopted is not None,
        endpoints=endpoints,
    )
    return Task(
        id=task_id,
        name=f"web.1.{task_id}",
        service="web",
        slot=1,
        node=node,
        address=endpoints[0].address if endpoints else "",
        sandbox=sandbox,
    )


def test_only_this_nodes_bridge_networks_are_made() -> None:
    assert network_want(A, NODE) is not None
    assert network_want(A, "n2") is None  # a bridge network of another node
    assert network_want(dataclasses.replace(A, driver="overlay"), NODE) is None
    assert network_want(dataclasses.replace(A, deleted=True), NODE) is None


def test_a_sandbox_has_its_endpoints_in_order_and_one_default_route() -> None:
    want = sandbox_want(task("t1aaaaaaaaaa", "b", "a", "c"), NODE, NETS)
    assert want is not None
    assert want.name == netns_name(NODE, "t1aaaaaaaaaa")
    assert want.netns == f"/run/netns/{want.name}"
    assert want.networks == ("b", "a", "c")
    assert [e.endpoint.index for e in want.endpoints] == [0, 1, 2]
    assert [e.endpoint.interface for e in want.endpoints] == ["eth0", "eth1", "eth2"]
    # b is internal: the route leaves by a, the first network with a way out, and only there.
    assert [e.endpoint.gateway for e in want.endpoints] == [None, "10.0.1.1", None]
    assert {e.endpoint.prefixlen for e in want.endpoints} == {24}
    assert want.veths == {veth_name("t1aaaaaaaaaa", i) for i in range(3)}


def test_no_sandbox_for_other_nodes_plain_tasks_or_removed_tasks() -> None:
    assert sandbox_want(task("t1", "a", node="n2"), NODE, NETS) is None
    assert sandbox_want(dataclasses.replace(task("t1", "a"), sandbox=None), NODE, NETS) is None
    assert sandbox_want(dataclasses.replace(task("t1", "a"), deleted=True), NODE, NETS) is None


def test_an_adopted_namespace_is_used_as_given_and_never_named_ours() -> None:
    want = sandbox_want(task("t1", "a", adopted="/proc/4242/ns/net"), NODE, NETS)
    assert want is not None
    assert want.adopted and want.name is None
    assert want.netns == "/proc/4242/ns/net"


def test_transitions_of_a_task() -> None:
    one = sandbox_want(task("t1", "a"), NODE, NETS)
    two = sandbox_want(task("t1", "a", "c"), NODE, NETS)
    assert one is not None and two is not None
    assert sandbox_transition(None, one) == [EnsureSandbox(one)]
    assert sandbox_transition(one, one) == []  # health, drain: nothing for the kernel
    assert sandbox_transition(one, None) == [RemoveSandbox(one)]
    # Endpoints that went are left before the rest is ensured.
    assert sandbox_transition(two, one) == [Leave(two, two.endpoints[1]), EnsureSandbox(one)]


def test_transitions_of_a_network() -> None:
    want = network_want(A, NODE)
    assert want is not None
    assert network_transition(None, want) == [CreateNetwork(want)]
    assert network_transition(want, want) == []
    assert network_transition(want, None) == [DeleteNetwork("bridge", A.id)]


def test_reconcile_removes_orphans_first_and_ensures_everything_the_state_owns() -> None:
    kept = sandbox_want(task("t1aaaaaaaaaa", "a"), NODE, NETS)
    lacking = sandbox_want(task("t2bbbbbbbbbb", "a", "c"), NODE, NETS)
    assert kept is not None and lacking is not None
    orphan_ns = f"{netns_prefix(NODE)}t9zzzzzzzzzz"
    found = Found(
        # the kernel reports a network by its bridge's short id; c's bridge is gone,
        # and a bridge of a removed network is left over
        networks={"bridge": frozenset({A.id[:8], "dddddddd"})},
        veths={
            # t2's second veth was deleted by hand; an orphan veth of a gone task is left
            "bridge": frozenset(
                {veth_name("t1aaaaaaaaaa", 0), veth_name("t2bbbbbbbbbb", 0), "mpvt9zzzzzz0"}
            )
        },
        namespaces=frozenset({kept.name or "", lacking.name or "", orphan_ns}),
    )
    nets = [w for w in (network_want(A, NODE), network_want(C, NODE)) if w is not None]
    plan = reconcile(nets, [kept, lacking], found)
    removals = list(plan.removed)
    assert removals == [
        DeleteNamespace(orphan_ns),
        DeleteVeth("mpvt9zzzzzz0"),
        DeleteNetwork("bridge", "dddddddd"),
    ]
    # The removals come before anything is made.
    assert list(plan.jobs[: len(removals)]) == removals
    assert plan.jobs[len(removals) :] == (
        CreateNetwork(nets[0]),
        CreateNetwork(nets[1]),
        EnsureSandbox(kept),
        EnsureSandbox(lacking),
    )
    assert plan.created == {"c"}
    assert plan.repaired == {"t2bbbbbbbbbb"}


def test_reconcile_of_a_kernel_in_step_removes_nothing() -> None:
    want = sandbox_want(task("t1aaaaaaaaaa", "a"), NODE, NETS)
    assert want is not None and want.name is not None
    found = Found(
        networks={"bridge": frozenset({A.id[:8]})},
        veths={"bridge": want.veths},
        namespaces=frozenset({want.name}),
    )
    netw = network_want(A, NODE)
    assert netw is not None
    plan = reconcile([netw], [want], found)
    assert plan.removed == ()
    assert plan.repaired == frozenset() and plan.created == frozenset()


def test_reconcile_keeps_an_adopted_namespace_and_repairs_a_lost_one() -> None:
    adopted = sandbox_want(task("t1aaaaaaaaaa", "a", adopted="/proc/1/ns/net"), NODE, NETS)
    ours = sandbox_want(task("t2bbbbbbbbbb", "a"), NODE, NETS)
    assert adopted is not None and ours is not None
    # After a reboot /run/netns is empty: our namespace is made again.
    found = Found(networks={}, veths={}, namespaces=frozenset())
    plan = reconcile([], [adopted, ours], found)
    assert plan.removed == ()
    assert plan.repaired == {"t1aaaaaaaaaa", "t2bbbbbbbbbb"}


def test_bridge_names_compare_by_the_short_id() -> None:
    # The kernel knows a network only by its bridge's name.
    assert bridge_name("aaaaaaaa1111") == bridge_name("aaaaaaaa")
