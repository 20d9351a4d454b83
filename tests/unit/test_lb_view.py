"""The L4 view: this node's table from the change feed, one change at a time."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
    apply_ops,
)
from lb.view import LbView, build_table, parse_affinity
from mesh.core.model import (
    Change,
    Health,
    Kind,
    PortConfig,
    Record,
    Service,
    Task,
    TaskState,
    Vip,
)

NODE = "n1"


def service(
    name: str = "web",
    *,
    mode: str = "vip",
    labels: dict[str, str] | None = None,
    ports: tuple[PortConfig, ...] | None = None,
    vips: tuple[Vip, ...] | None = None,
) -> Service:
    if ports is None:
        ports = (PortConfig(protocol="tcp", target_port=80, published_port=30080),)
    if vips is None:
        vips = (
            Vip(network="front", address="10.0.1.2"),
            Vip(network="ingress", address="10.0.0.2"),
        )
    return Service(
        name=name,
        id=f"id-{name}",
        endpoint_mode=mode,  # type: ignore[arg-type]
        ports=ports,
        vips=vips if mode == "vip" else (),
        labels=labels or {},
    )


def task(
    task_id: str,
    address: str,
    *,
    svc: str = "web",
    node: str = NODE,
    health: Health = Health.HEALTHY,
    state: TaskState = TaskState.RUNNING,
    ports: dict[int, int] | None = None,
    weight: int = 1,
) -> Task:
    return Task(
        weight=weight,
        id=task_id,
        name=f"{svc}.1.{task_id}",
        service=svc,
        slot=1,
        node=node,
        address=address,
        ports=ports or {},
        health=health,
        state=state,
    )


def kind_of(record: Record) -> Kind:
    return Kind.SERVICE if isinstance(record, Service) else Kind.TASK


def put(before: Record | None, after: Record) -> Change:
    return Change(kind_of(after), after.key, before, after)


def delete(before: Record) -> Change:
    return Change(kind_of(before), before.key, before, dataclasses.replace(before, deleted=True))


VIP_FRONT = VirtualKey("tcp", "10.0.1.2", 80)
VIP_INGRESS = VirtualKey("tcp", "10.0.0.2", 80)
PUBLISHED = VirtualKey("tcp", ANY_ADDRESS, 30080)


def test_vips_and_published_port_over_healthy_tasks() -> None:
    view = LbView(NODE)
    ops = view.load(
        [
            service(),
            task("a", "10.0.1.5", ports={80: 8080}),
            task("b", "10.0.1.6", node="n2"),
            task("c", "10.0.1.7", health=Health.STARTING),
            task("d", "10.0.1.8", health=Health.UNHEALTHY),
            task("e", "10.0.1.9", state=TaskState.DRAINING),
        ]
    )
    reals = {Real("10.0.1.5", 8080): 1, Real("10.0.1.6", 80): 1, Real("10.0.1.9", 80): 0}
    expected = {
        key: VirtualService(key, ServiceOptions(), reals)
        for key in (VIP_FRONT, VIP_INGRESS, PUBLISHED)
    }
    assert view.table() == expected
    assert apply_ops({}, ops) == expected


def test_one_task_turning_healthy_costs_one_op_per_key() -> None:
    view = LbView(NODE)
    starting = task("a", "10.0.1.5")
    starting = dataclasses.replace(starting, health=Health.STARTING)
    view.load([service(), starting])
    healthy = dataclasses.replace(starting, health=Health.HEALTHY)
    ops = view.on_change(put(starting, healthy))
    assert sorted(ops, key=str) == sorted(
        [PutReal(k, Real("10.0.1.5", 80), 1) for k in (VIP_FRONT, VIP_INGRESS, PUBLISHED)], key=str
    )
    draining = dataclasses.replace(healthy, state=TaskState.DRAINING)
    assert len(view.on_change(put(healthy, draining))) == 3
    assert all(v.reals == {Real("10.0.1.5", 80): 0} for v in view.table().values())
    ops = view.on_change(delete(draining))
    assert {type(op) for op in ops} == {DeleteReal}
    assert all(v.reals == {} for v in view.table().values())


def test_dnsrr_gets_published_ports_but_no_vips() -> None:
    view = LbView(NODE)
    view.load([service(mode="dnsrr"), task("a", "10.0.1.5")])
    assert set(view.table()) == {PUBLISHED}


def test_host_mode_port_only_over_this_nodes_tasks_and_only_while_it_has_one() -> None:
    ports = (PortConfig(protocol="udp", target_port=53, published_port=5300, publish_mode="host"),)
    key = VirtualKey("udp", ANY_ADDRESS, 5300)
    view = LbView(NODE)
    remote = task("b", "10.0.1.6", node="n2")
    view.load([service(ports=ports, vips=()), remote])
    assert view.table() == {}
    local = task("a", "10.0.1.5")
    ops = view.on_change(put(None, local))
    assert ops == [PutService(key), PutReal(key, Real("10.0.1.5", 53), 1)]
    ops = view.on_change(delete(local))
    assert ops == [DeleteReal(key, Real("10.0.1.5", 53)), DeleteService(key)]
    assert view.table() == {}


def test_local_traffic_policy_only_over_this_nodes_tasks_and_refusing_without_one() -> None:
    """`traffic-policy=local`: this node's healthy tasks only, flagged `local` (the
    backends do not masquerade it); with none the key stays, empty: the node refuses
    rather than forward elsewhere. The VIPs stay cluster-wide."""
    ports = (
        PortConfig(protocol="tcp", target_port=80, published_port=30080, traffic_policy="local"),
    )
    view = LbView(NODE)
    remote = task("b", "10.0.1.6", node="n2")
    view.load([service(ports=ports), remote])
    table = view.table()
    assert table[PUBLISHED] == VirtualService(PUBLISHED, ServiceOptions(local=True), {})
    assert table[VIP_FRONT].reals == {Real("10.0.1.6", 80): 1}
    assert not table[VIP_FRONT].options.local
    local = task("a", "10.0.1.5")
    ops = view.on_change(put(None, local))
    assert PutReal(PUBLISHED, Real("10.0.1.5", 80), 1) in ops
    assert view.table()[PUBLISHED].reals == {Real("10.0.1.5", 80): 1}
    unhealthy = dataclasses.replace(local, health=Health.UNHEALTHY)
    view.on_change(put(local, unhealthy))
    assert view.table()[PUBLISHED].reals == {}
    assert view.healthy_tasks("web") == (0, 1)
    assert view.table() == build_table([service(ports=ports), remote, unhealthy], NODE)


def test_switching_a_port_to_local_drops_the_other_nodes_tasks() -> None:
    view = LbView(NODE)
    tasks_ = [task("a", "10.0.1.5"), task("b", "10.0.1.6", node="n2")]
    before = service()
    view.load([before, *tasks_])
    assert len(view.table()[PUBLISHED].reals) == 2
    after = dataclasses.replace(
        before,
        ports=(
            PortConfig(
                protocol="tcp", target_port=80, published_port=30080, traffic_policy="local"
            ),
        ),
    )
    ops = view.on_change(put(before, after))
    assert PutService(PUBLISHED, ServiceOptions(local=True)) in ops
    assert view.table()[PUBLISHED].reals == {Real("10.0.1.5", 80): 1}


def test_a_kernel_backend_refuses_the_proxy_label() -> None:
    labels = {"mesh.lb.proxy_protocol": "v2"}
    view = LbView(NODE, proxy_supported=False)
    view.load([service(labels=labels)])
    assert not view.table()[PUBLISHED].options.proxy_protocol
    assert build_table([service(labels=labels)], NODE, proxy_supported=False) == view.table()
    assert LbView(NODE).load([service(labels=labels)])[0] == PutService(
        PUBLISHED, ServiceOptions(proxy_protocol=True)
    )


def test_labels_choose_the_options_and_bad_values_are_counted() -> None:
    view = LbView(NODE)
    view.load(
        [
            service(labels={"mesh.lb.scheduler": "lc", "mesh.lb.proxy_protocol": "v2"}),
            service(
                "api",
                labels={"mesh.lb.scheduler": "fastest"},
                ports=(PortConfig(protocol="tcp", target_port=81, published_port=30081),),
                vips=(),
            ),
        ]
    )
    table = view.table()
    assert table[PUBLISHED].options == ServiceOptions(Scheduler.LEAST_CONNECTIONS, True)
    assert table[VirtualKey("tcp", ANY_ADDRESS, 30081)].options == ServiceOptions()
    assert view.invalid_labels["mesh.lb.scheduler"] == 1


def test_service_update_changes_options_and_moves_ports() -> None:
    view = LbView(NODE)
    old = service()
    view.load([old, task("a", "10.0.1.5")])
    new = service(
        labels={"mesh.lb.scheduler": "wrr"},
        ports=(PortConfig(protocol="tcp", target_port=80, published_port=30090),),
    )
    ops = view.on_change(put(old, new))
    moved = VirtualKey("tcp", ANY_ADDRESS, 30090)
    assert DeleteService(PUBLISHED) in ops
    assert PutService(moved, ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)) in ops
    assert PutService(VIP_FRONT, ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)) in ops
    assert view.table() == build_table([new, task("a", "10.0.1.5")], NODE)
    ops = view.on_change(delete(new))
    assert {type(op) for op in ops} == {DeleteService}
    assert view.table() == {}


def test_task_before_its_service_is_kept_until_the_service_arrives() -> None:
    view = LbView(NODE)
    assert view.on_change(put(None, task("a", "10.0.1.5"))) == []
    ops = view.on_change(put(None, service()))
    assert apply_ops({}, ops) == view.table()
    assert view.table()[PUBLISHED].reals == {Real("10.0.1.5", 80): 1}


def test_changing_one_task_among_ten_thousand_costs_a_constant_number_of_ops() -> None:
    view = LbView(NODE)
    tasks = [task(f"t{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(10_000)]
    view.load([service(), *tasks])
    assert len(view.table()[PUBLISHED].reals) == 10_000
    one = tasks[5000]
    sick = dataclasses.replace(one, health=Health.UNHEALTHY)
    assert len(view.on_change(put(one, sick))) == 3  # one DeleteReal per key
    assert len(view.on_change(put(sick, one))) == 3
    assert len(view.on_change(delete(one))) == 3


# -- the incremental table always equals a build from scratch -----------------------------

SERVICE_NAMES = ("web", "api", "db")
ADDRESSES = ("10.0.1.5", "10.0.1.6", "10.0.1.7")


@st.composite
def services(draw: st.DrawFn) -> Service:
    name = draw(st.sampled_from(SERVICE_NAMES))
    mode = draw(st.sampled_from(["vip", "dnsrr"]))
    ports = tuple(
        draw(
            st.lists(
                st.builds(
                    lambda proto, target, published, host, policy: PortConfig(
                        protocol=proto,
                        target_port=target,
                        published_port=published,
                        publish_mode="host" if host else "ingress",
                        traffic_policy=policy,
                    ),
                    st.sampled_from(["tcp", "udp"]),
                    st.sampled_from([80, 443]),
                    st.sampled_from([30080, 30081, 30082]),
                    st.booleans(),
                    st.sampled_from(["cluster", "local"]),
                ),
                max_size=2,
            )
        )
    )
    vips = tuple(
        draw(
            st.lists(
                st.builds(
                    lambda last: Vip(network=f"net{last}", address=f"10.0.9.{last}"),
                    st.integers(2, 4),
                ),
                max_size=2,
                unique_by=lambda v: v.address,
            )
        )
    )
    labels = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "mesh.lb.scheduler": st.sampled_from(["rr", "wrr", "lc", "bogus"]),
                "mesh.lb.proxy_protocol": st.sampled_from(["v2", "off", "v9"]),
                "mesh.lb.locality": st.sampled_from(["prefer-local", "any", "nearby"]),
            },
        )
    )
    overrides = draw(
        st.dictionaries(st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 1000), max_size=2)
    )
    made = service(name, mode=mode, ports=ports, vips=vips, labels=labels)
    return dataclasses.replace(made, weights=overrides)


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    return task(
        draw(st.sampled_from(["t1", "t2", "t3", "t4", "t5"])),
        draw(st.sampled_from(ADDRESSES)),
        svc=draw(st.sampled_from(SERVICE_NAMES)),
        node=draw(st.sampled_from([NODE, "n2"])),
        health=draw(st.sampled_from(list(Health))),
        state=draw(st.sampled_from(list(TaskState))),
        ports=draw(st.sampled_from([{}, {80: 8080}, {443: 80}])),
        weight=draw(st.sampled_from([0, 1, 3, 1000])),
    )


steps = st.lists(st.tuples(st.booleans(), st.one_of(services(), tasks())), max_size=30)


@settings(max_examples=300, deadline=None)
@given(initial=st.lists(st.one_of(services(), tasks()), max_size=6), steps=steps)
def test_incremental_table_equals_a_build_from_scratch(
    initial: list[Record], steps: list[tuple[bool, Any]]
) -> None:
    current: dict[tuple[Kind, str], Record] = {}
    for record in initial:
        current[(kind_of(record), record.key)] = record
    view = LbView(NODE)
    programmed: Table = apply_ops({}, view.load(current.values()))
    assert programmed == view.table() == build_table(current.values(), NODE)
    for remove, record in steps:
        slot = (kind_of(record), record.key)
        before = current.get(slot)
        if remove:
            if before is None:
                continue
            change = delete(before)
            del current[slot]
        else:
            change = put(before, record)
            current[slot] = record
        ops = view.on_change(change)
        programmed = apply_ops(programmed, ops)  # raises on a PutReal before its PutService
        expected = build_table(current.values(), NODE)
        assert programmed == expected
        assert view.table() == expected


def test_affinity_and_maglev_labels() -> None:
    cases = {
        "client-ip": 10800,
        "client-ip:60": 60,
        "Client-IP:90s": 90,
        "none": 0,
    }
    for text, seconds in cases.items():
        assert parse_affinity(text) == seconds
    for bad in ("client-ip:0", "client-ip:x", "cookie", "client-ip:86401"):
        with pytest.raises(ValueError, match="affinity"):
            parse_affinity(bad)
    view = LbView(NODE)
    view.load(
        [
            service(labels={"mesh.lb.scheduler": "maglev", "mesh.lb.affinity": "client-ip:60"}),
            service(
                "api",
                labels={"mesh.lb.affinity": "sticky"},
                ports=(PortConfig(protocol="tcp", target_port=81, published_port=30081),),
                vips=(),
            ),
        ]
    )
    table = view.table()
    assert table[PUBLISHED].options == ServiceOptions(Scheduler.MAGLEV, affinity=60)
    assert table[VirtualKey("tcp", ANY_ADDRESS, 30081)].options == ServiceOptions()
    assert view.invalid_labels["mesh.lb.affinity"] == 1


# -- weights and locality (issue 19) ----------------------------------------------------


def test_a_tasks_weight_is_its_reals_weight_and_the_services_override_wins() -> None:
    view = LbView(NODE)
    svc = service(labels={"mesh.lb.scheduler": "wrr"})
    canary = task("a", "10.0.1.5", weight=1)
    stable = task("b", "10.0.1.6", node="n2", weight=3)
    view.load([svc, canary, stable])
    assert view.table()[VIP_FRONT].reals == {Real("10.0.1.5", 80): 1, Real("10.0.1.6", 80): 3}
    # `mesh service update --weight a=0`: the service's override drains the canary
    # everywhere (a task is written by its node only; the service by any node).
    drained = dataclasses.replace(svc, weights={"a": 0, "b": 1000})
    ops = view.on_change(put(svc, drained))
    assert PutReal(VIP_FRONT, Real("10.0.1.5", 80), 0) in ops
    assert view.table()[PUBLISHED].reals == {Real("10.0.1.5", 80): 0, Real("10.0.1.6", 80): 1000}
    # a draining task stays at 0 whatever its weight; an unhealthy one leaves
    gone = dataclasses.replace(stable, health=Health.UNHEALTHY)
    view.on_change(put(stable, gone))
    assert view.table()[VIP_FRONT].reals == {Real("10.0.1.5", 80): 0}


def test_prefer_local_sends_vip_traffic_to_this_nodes_tasks_while_it_has_one() -> None:
    view = LbView(NODE)
    svc = service(labels={"mesh.lb.locality": "prefer-local"})
    here = task("a", "10.0.1.5")
    there = [task("b", "10.0.1.6", node="n2"), task("c", "10.0.1.7", node="n3")]
    view.load([svc, here, *there])
    local, b, c = Real("10.0.1.5", 80), Real("10.0.1.6", 80), Real("10.0.1.7", 80)
    # the others keep the connections they have (weight 0), take no new ones
    for key in (VIP_FRONT, VIP_INGRESS):
        assert view.table()[key].reals == {local: 1, b: 0, c: 0}
    # the routing mesh (published port) is not a VIP: every task as before
    assert view.table()[PUBLISHED].reals == {local: 1, b: 1, c: 1}
    # the local task unhealthy: fall back to the others, at their weights
    sick = dataclasses.replace(here, health=Health.UNHEALTHY)
    ops = view.on_change(put(here, sick))
    assert view.table()[VIP_FRONT].reals == {b: 1, c: 1}
    assert PutReal(VIP_FRONT, b, 1) in ops and DeleteReal(VIP_FRONT, local) in ops
    # and back when it recovers
    view.on_change(put(sick, here))
    assert view.table()[VIP_FRONT].reals == {local: 1, b: 0, c: 0}
    # a local task that is draining (weight 0) does not count as taking traffic
    draining = dataclasses.replace(here, state=TaskState.DRAINING)
    view.on_change(put(here, draining))
    assert view.table()[VIP_FRONT].reals == {local: 0, b: 1, c: 1}
    # the label removed: every task again
    plain = service()
    view.on_change(put(draining, here))
    view.on_change(put(svc, plain))
    assert view.table()[VIP_FRONT].reals == {local: 1, b: 1, c: 1}


def test_prefer_local_on_another_node_sees_its_own_tasks_first() -> None:
    records = [
        service(labels={"mesh.lb.locality": "prefer-local"}),
        task("a", "10.0.1.5"),
        task("b", "10.0.1.6", node="n2"),
    ]
    table = build_table(records, "n2")
    assert table[VIP_FRONT].reals == {Real("10.0.1.5", 80): 0, Real("10.0.1.6", 80): 1}
    view = LbView("n3")  # a node with no task of its own: every task
    view.load(records)
    assert view.table()[VIP_FRONT].reals == {Real("10.0.1.5", 80): 1, Real("10.0.1.6", 80): 1}


def test_a_bad_locality_value_is_ignored_and_counted() -> None:
    view = LbView(NODE)
    view.load([service(labels={"mesh.lb.locality": "nearby"}), task("a", "10.0.1.5")])
    assert view.invalid_labels["mesh.lb.locality"] == 1
