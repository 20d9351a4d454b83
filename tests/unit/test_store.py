"""The store: every rule of the state, checked without sockets, clocks or disks."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import random

import pytest

from mesh.core.model import (
    INGRESS,
    Health,
    HealthCheck,
    Kind,
    Network,
    Service,
    Task,
    TaskState,
    Version,
)
from mesh.errors import Conflict, Invalid, MeshError, NotFound
from mesh.ipam import Ipam, parse_pool
from mesh.state.specs import NetworkSpec, PortSpec, ServicePatch, ServiceSpec, TaskSpec
from mesh.state.store import Store, ingress_id, task_key

NOW = 1_000.0


def make_store(node: str = "n1", seed: int = 1) -> Store:
    store = Store(node, Ipam(parse_pool("127.64.0.0/12")), random.Random(seed))
    store.ensure_ingress()
    return store


def web(store: Store, **kw: object) -> Service:
    spec = ServiceSpec(name=str(kw.pop("name", "web")), **kw)  # type: ignore[arg-type]
    changes = store.create_service(spec, NOW)
    assert isinstance(changes[-1].after, Service)
    return changes[-1].after


def task(
    store: Store,
    service: str = "web",
    address: str = "127.0.0.1",
    ports: dict[int, int] | None = None,
) -> Task:
    changes = store.add_task(TaskSpec(service=service, address=address, ports=ports or {}), NOW)
    assert isinstance(changes[-1].after, Task)
    return changes[-1].after


def test_ingress_exists_with_one_id_on_every_node() -> None:
    a, b = make_store("a"), make_store("b")
    assert a.network(INGRESS).id == b.network(INGRESS).id == ingress_id()
    assert a.network(INGRESS).subnet == "127.64.0.0/16"  # a /16 of the pool: 65,533 VIPs
    assert a.ensure_ingress() == []


def test_service_gets_a_vip_per_network_and_one_on_ingress_when_published() -> None:
    store = make_store()
    store.create_network(NetworkSpec(name="backend", subnet="127.65.1.0/24"), NOW)
    service = web(
        store, networks=("backend",), ports=(PortSpec(target_port=80, published_port=8080),)
    )
    assert [(v.network, v.address) for v in service.vips] == [
        ("backend", "127.65.1.2"),
        (INGRESS, "127.64.0.2"),
    ]
    plain = web(store, name="api", networks=("backend",))
    assert [v.address for v in plain.vips] == ["127.65.1.3"]


def test_dnsrr_has_no_vip_and_refuses_ingress_ports() -> None:
    store = make_store()
    store.create_network(NetworkSpec(name="backend"), NOW)
    assert web(store, networks=("backend",), endpoint_mode="dnsrr").vips == ()
    with pytest.raises(Invalid):
        web(store, name="x", endpoint_mode="dnsrr", ports=(PortSpec(target_port=80),))


def test_omitted_published_port_comes_from_swarm_range() -> None:
    store = make_store()
    first = web(store, ports=(PortSpec(target_port=80),))
    second = web(store, name="two", ports=(PortSpec(target_port=80),))
    assert [p.published_port for p in (*first.ports, *second.ports)] == [30000, 30001]


@pytest.mark.parametrize(
    ("action", "error", "code"),
    [
        (lambda s: web(s), Conflict, "name_in_use"),
        (
            lambda s: web(s, name="b", ports=(PortSpec(target_port=1, published_port=8080),)),
            Conflict,
            "port_in_use",
        ),
        (lambda s: web(s, name="c", networks=("nope",)), Invalid, "unknown_network"),
        (lambda s: web(s, name="d", networks=(INGRESS,)), Invalid, "invalid_value"),
        (
            lambda s: s.create_network(NetworkSpec(name="x", subnet="127.65.0.0/16"), NOW),
            Conflict,
            "subnet_overlaps",
        ),
        (lambda s: s.create_network(NetworkSpec(name="backend"), NOW), Conflict, "name_in_use"),
        (lambda s: task(s, address="not-an-ip"), Invalid, "invalid_address"),
        (lambda s: task(s, address="0.0.0.0"), Invalid, "invalid_address"),
        (lambda s: task(s, ports={80: 31001}), Conflict, "endpoint_in_use"),
        (lambda s: task(s, service="nope"), NotFound, "not_found"),
        (lambda s: s.remove_network("backend", NOW), Conflict, "network_in_use"),
        (lambda s: s.remove_network(INGRESS, NOW), Conflict, "network_builtin"),
        (
            lambda s: s.update_service("web", ServicePatch(labels={}), NOW, expected_version=1),
            Conflict,
            "version_conflict",
        ),
    ],
)
def test_refused_changes_write_nothing(action, error: type[MeshError], code: str) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    store.create_network(NetworkSpec(name="backend", subnet="127.65.1.0/24"), NOW)
    web(store, networks=("backend",), ports=(PortSpec(target_port=80, published_port=8080),))
    task(store, ports={80: 31001})
    before = (store.clock, list(store.all_records()), repr(store.ipam))
    with pytest.raises(error) as info:
        action(store)
    assert info.value.code == code
    assert (store.clock, list(store.all_records()), repr(store.ipam)) == before


def test_same_address_other_ports_is_another_task() -> None:
    store = make_store()
    web(store)
    one = task(store, ports={80: 31001})
    two = task(store, ports={80: 31002})
    assert (one.slot, two.slot) == (1, 2)
    assert one.name == f"web.1.{one.id}"
    assert one.health is Health.HEALTHY  # no check: healthy once registered


def test_slots_and_endpoints_follow_removals_and_merges_without_a_scan() -> None:
    """The slot and endpoint indexes (O(1) registration) see what a scan of the
    service's tasks would: removed tasks free both, a peer's task holds both."""
    store, peer = make_store("n1"), make_store("n2")
    web(store)
    peer.merge(store.service("web"))
    one, two, three = (task(store, address=f"192.0.2.{i}") for i in (1, 2, 3))
    assert (one.slot, two.slot, three.slot) == (1, 2, 3)
    store.remove_task(two.id, NOW + 1)
    again = task(store, address="192.0.2.2")  # its endpoint and its slot are free again
    assert again.slot == 2
    theirs = peer.add_task(TaskSpec(service="web", address="192.0.2.9"), NOW)[-1].after
    assert isinstance(theirs, Task) and theirs.slot == 1
    store.merge(dataclasses.replace(theirs, slot=4))  # a peer's task at slot 4, 192.0.2.9
    assert task(store, address="192.0.2.5").slot == 5
    with pytest.raises(Conflict, match=f"already has task {theirs.name!r}") as info:
        task(store, address="192.0.2.9")
    assert info.value.code == "endpoint_in_use"
    store.merge(dataclasses.replace(theirs, slot=4, deleted=True, version=Version(10**6, "n2")))
    assert task(store, address="192.0.2.9").slot == 4


def test_task_pages_are_slices_of_the_sorted_list_by_cursor() -> None:
    """`iter_tasks(after=...)` continues the (service, slot, id) order from a cursor,
    whatever was added or removed before it, filtered by service and node."""
    store, peer = make_store("n1"), make_store("n2", seed=2)
    for name in ("api", "web", "db"):
        web(store, name=name)
        peer.merge(store.service(name))
    for i in range(30):
        task(store, service=("api", "web", "db")[i % 3], address=f"192.0.2.{i}")
    for i in range(6):
        theirs = peer.add_task(TaskSpec(service="web", address=f"198.51.100.{i}"), NOW)
        store.merge(theirs[-1].after)
    every = store.tasks()
    assert every == sorted(every, key=lambda t: (t.service, t.slot, t.id))
    assert len(every) == 36
    pages, cursor = [], None
    while True:
        page = list(itertools.islice(store.iter_tasks(after=cursor), 7))
        if not page:
            break
        pages.extend(page)
        cursor = task_key(page[-1])
    assert pages == every
    webs = store.tasks(service="web")
    assert [t.service for t in webs] == ["web"] * 16
    assert list(store.iter_tasks(service="web", after=task_key(webs[4]))) == webs[5:]
    assert list(store.iter_tasks(service="db", after=task_key(webs[4]))) == []  # db < web
    assert [t.node for t in store.tasks(node="n2")] == ["n2"] * 6
    store.remove_task(webs[5].id, NOW + 1)  # the page after webs[4] goes on without it
    assert list(store.iter_tasks(service="web", after=task_key(webs[4]))) == webs[6:]


def test_task_of_checked_service_starts_as_starting() -> None:
    store = make_store()
    web(store, ports=(PortSpec(target_port=80),), health_check=HealthCheck(type="http"))
    assert task(store).health is Health.STARTING


def test_http_check_without_any_port_is_invalid() -> None:
    with pytest.raises(Invalid):
        web(make_store(), health_check=HealthCheck(type="tcp"))


def test_remove_service_takes_its_tasks_and_frees_vip_and_port() -> None:
    store = make_store()
    store.create_network(NetworkSpec(name="backend"), NOW)
    first = web(
        store, networks=("backend",), ports=(PortSpec(target_port=80, published_port=8080),)
    )
    t = task(store)
    changes = store.remove_service("web", NOW)
    assert {c.key for c in changes} == {"web", t.id}
    assert all(c.after.deleted for c in changes)
    assert store.tasks() == []
    again = web(
        store,
        name="web2",
        networks=("backend",),
        ports=(PortSpec(target_port=80, published_port=8080),),
    )
    assert again.vips == first.vips


def test_update_keeps_vips_of_kept_networks() -> None:
    store = make_store()
    for name in ("a", "b"):
        store.create_network(NetworkSpec(name=name), NOW)
    service = web(store, networks=("a",))
    updated = store.update_service(
        "web", ServicePatch(networks=("a", "b")), NOW, expected_version=service.version.clock
    )[0].after
    assert isinstance(updated, Service)
    assert updated.vips[0] == service.vips[0]
    assert updated.vips[1].network == "b"
    shrunk = store.update_service("web", ServicePatch(networks=("b",)), NOW)[0].after
    assert isinstance(shrunk, Service)
    assert shrunk.vips == (updated.vips[1],)
    assert store.ipam.claimed_count("a") == 0


def test_update_can_clear_health_check_and_labels() -> None:
    store = make_store()
    web(
        store,
        ports=(PortSpec(target_port=80),),
        labels={"a": "1"},
        health_check=HealthCheck(type="tcp"),
    )
    updated = store.update_service("web", ServicePatch(labels={}, clear_health_check=True), NOW)[
        0
    ].after
    assert isinstance(updated, Service)
    assert (updated.labels, updated.health_check) == ({}, None)


def test_drain_then_reap() -> None:
    store = make_store()
    web(store)
    t = task(store)
    store.drain_task(t.id, NOW, grace=2.0)
    assert store.task(t.id).state is TaskState.DRAINING
    assert store.drain_task(t.id, NOW + 1, grace=2.0) == []  # already draining
    assert store.drained_tasks(NOW + 1.9) == []
    assert [d.id for d in store.drained_tasks(NOW + 2.0)] == [t.id]
    store.remove_task(t.id, NOW + 2.0)
    assert store.get_task(t.id) is None


def test_health_report_that_changes_nothing_writes_nothing() -> None:
    store = make_store()
    web(store)
    t = task(store)
    assert store.set_health(t.id, Health.HEALTHY, "", NOW) == []
    assert len(store.set_health(t.id, Health.UNHEALTHY, "down", NOW)) == 1


def test_merge_is_last_writer_wins() -> None:
    a, b = make_store("a", seed=1), make_store("b", seed=2)
    created = a.create_network(NetworkSpec(name="x"), NOW)[0].after
    assert b.merge(created) != []
    assert b.merge(created) == []  # same version: nothing new
    assert b.clock >= created.version.clock
    removed = b.remove_network("x", NOW)[0].after
    assert a.merge(removed) != []
    assert a.get(Kind.NETWORK, "x") is None
    assert a.merge(created) == []  # an older copy cannot resurrect it


def test_version_ties_break_by_node_name() -> None:
    assert Version(5, "b") > Version(5, "a") > Version(4, "z")


def test_reload_restores_everything() -> None:
    store = make_store()
    store.create_network(NetworkSpec(name="backend"), NOW)
    web(store, networks=("backend",), ports=(PortSpec(target_port=80),))
    task(store)
    store.remove_service("web", NOW)
    web(store, name="api", networks=("backend",))
    copy = Store("n1", Ipam(parse_pool("127.64.0.0/12")))
    copy.load(store.all_records(), store.clock)
    assert list(copy.all_records()) == list(store.all_records())
    assert copy.clock == store.clock
    assert repr(copy.ipam) == repr(store.ipam)


def test_forget_drops_only_tombstones() -> None:
    store = make_store()
    store.create_network(NetworkSpec(name="x"), NOW)
    assert store.forget(Kind.NETWORK, "x") is False  # live: kept
    store.remove_network("x", NOW)
    assert store.tombstones() == [(Kind.NETWORK, "x")]
    assert store.forget(Kind.NETWORK, "x") is True
    assert store.tombstones() == []


def test_identity_port_mapping_is_the_same_endpoint_as_none() -> None:
    store = make_store()
    web(store)
    task(store, ports={})
    with pytest.raises(Conflict):
        task(store, ports={80: 80})


def test_names_with_a_trailing_newline_are_not_labels() -> None:
    from mesh.names import is_dns_label

    assert is_dns_label("web")
    assert not is_dns_label("web\n")


def test_a_vip_handed_out_twice_by_two_nodes_is_repaired_once() -> None:
    a, b = make_store("a", seed=1), make_store("b", seed=2)
    net = a.create_network(NetworkSpec(name="front", subnet="127.65.1.0/24"), NOW)[0].after
    b.merge(net)
    one = a.create_service(ServiceSpec(name="one", networks=("front",)), 1.0)[0].after
    two = b.create_service(ServiceSpec(name="two", networks=("front",)), 2.0)[0].after
    assert isinstance(one, Service) and isinstance(two, Service)
    assert one.vips == two.vips  # created at the same moment on two nodes
    repaired = [c.after for c in b.merge(one)]  # b wrote the younger one: b repairs it
    assert [r.key for r in repaired] == ["one", "two"]
    assert [c.key for c in a.merge(two)] == ["two"]  # a sees the clash but leaves it ...
    assert a.vip_conflicts() == [("front", "127.65.1.2", ["one", "two"])]
    a.merge(repaired[1])  # ... until the repair arrives
    assert a.vip_conflicts() == [] and b.vip_conflicts() == []
    assert a.service("two").vips == b.service("two").vips != one.vips
    assert a.ipam.is_claimed("front", ipaddress.IPv4Address("127.65.1.2"))


def test_ingress_size_follows_the_pool_and_other_networks_are_carved_after_it() -> None:
    for pool, ingress, first in (
        ("10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/24"),
        ("127.16.0.0/12", "127.16.0.0/16", "127.17.0.0/24"),
        ("10.0.0.0/20", "10.0.0.0/21", "10.0.8.0/24"),
        ("10.0.0.0/24", "10.0.0.0/24", None),
    ):
        store = Store("n", Ipam(parse_pool(pool)), random.Random(1))
        store.ensure_ingress()
        assert store.network(INGRESS).subnet == ingress
        if first is None:
            with pytest.raises(Conflict) as info:
                store.create_network(NetworkSpec(name="backend"), NOW)
            assert info.value.code == "pool_exhausted" and pool in info.value.message
        else:
            created = store.create_network(NetworkSpec(name="backend"), NOW)[-1].after
            assert getattr(created, "subnet", None) == first


def test_ingress_subnet_given_is_used_and_must_not_overlap() -> None:
    store = Store("n", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    store.ensure_ingress("127.80.0.0/14")
    assert store.network(INGRESS).subnet == "127.80.0.0/14"
    assert store.ingress_mismatch("127.80.0.0/14") is None
    assert store.ingress_mismatch(None) is None

    other = Store("n", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    other.load(
        [
            Network(
                name="backend",
                id="b" * 25,
                driver="overlay",
                subnet="127.80.1.0/24",
                gateway="127.80.1.1",
                version=Version(1, "n"),
            )
        ]
    )
    with pytest.raises(Conflict) as info:
        other.ensure_ingress("127.80.0.0/16")
    assert "overlaps network 'backend'" in info.value.message
    with pytest.raises(Invalid):
        other.ensure_ingress("127.80.0.1/16")  # not a network address


def test_an_existing_24_ingress_is_kept_never_renumbered() -> None:
    """A data dir of an older agent holds a /24 ingress with VIPs in it: it stays."""
    old = Store("n", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    old.ensure_ingress("127.64.0.0/24")
    web(old, ports=(PortSpec(target_port=80, published_port=8080),))
    store = Store("n", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    store.load(old.all_records(), old.clock)
    assert store.ensure_ingress() == []
    assert store.network(INGRESS).subnet == "127.64.0.0/24"
    assert store.ingress_mismatch(None) is None
    why = store.ingress_mismatch("127.64.0.0/16")
    assert why is not None and "127.64.0.0/24" in why and "renumbered" in why


def test_a_full_network_says_which_and_its_subnet() -> None:
    store = Store("n", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    store.ensure_ingress("127.64.0.0/29")  # 5 VIPs: .2 to .6
    for i in range(5):
        web(store, name=f"s{i}", ports=(PortSpec(target_port=80, published_port=8000 + i),))
    with pytest.raises(Conflict) as info:
        web(store, name="s5", ports=(PortSpec(target_port=80, published_port=8005),))
    assert info.value.code == "no_free_address"
    assert info.value.message.startswith("network ingress (127.64.0.0/29) has no free address")
    assert store.get(Kind.SERVICE, "s5") is None  # nothing half-made
    store.remove_service("s2", NOW)
    assert [
        v.address
        for v in web(store, name="s5", ports=(PortSpec(target_port=80, published_port=8005),)).vips
    ] == ["127.64.0.4"]


def test_a_full_published_port_range_names_the_range() -> None:
    store = make_store()
    store._published.update({("tcp", p): "x" for p in range(30000, 32768)})
    with pytest.raises(Conflict) as info:
        web(store, ports=(PortSpec(target_port=80),))
    assert info.value.code == "port_in_use"
    assert "no free tcp port left in 30000-32767" in info.value.message


def test_a_merged_network_that_overlaps_one_here_is_kept_not_raised() -> None:
    """An older node's /24 ingress carved its networks inside this node's /16 ingress
    (or two nodes carved one /24 at once): the merge keeps the record and the IPAM."""
    old = Store("a", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    old.ensure_ingress("127.64.0.0/24")
    back = old.create_network(NetworkSpec(name="back"), NOW)[0].after
    assert getattr(back, "subnet", None) == "127.64.1.0/24"
    new = make_store("b")
    assert [c.after for c in new.merge(back)] == [back]
    assert new.network("back").subnet == "127.64.1.0/24"
    service = old.create_service(ServiceSpec(name="web", networks=("back",)), NOW)[0].after
    new.merge(service)
    assert new.ipam.is_claimed("back", ipaddress.IPv4Address("127.64.1.2"))
    assert new.network(INGRESS).subnet == "127.64.0.0/16"


def test_name_check_is_an_index_look_up_kept_with_the_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_check_name_free` reads the lower-cased name index, not every live record."""
    store = make_store()
    web(store, name="Web")
    store.create_network(NetworkSpec(name="Back"), NOW)

    def check(kind: Kind, name: str) -> None:
        def no_scan(kind: Kind) -> None:
            raise AssertionError(f"a name check scanned the {kind.value}s")

        with monkeypatch.context() as patch:
            patch.setattr(store, "live", no_scan)
            store._check_name_free(kind, name)

    with pytest.raises(Conflict, match="as 'Web'") as taken:
        check(Kind.SERVICE, "web")
    assert taken.value.code == "name_in_use"
    with pytest.raises(Conflict, match="'back' already exists as 'Back'"):
        check(Kind.NETWORK, "back")
    with pytest.raises(Conflict, match=r"'Web' already exists$"):
        check(Kind.SERVICE, "Web")
    check(Kind.SERVICE, "back")  # each kind has its own names
    store.remove_service("Web", NOW)
    store.remove_network("Back", NOW)
    check(Kind.SERVICE, "WEB")  # freed by the removal
    check(Kind.NETWORK, "back")
    # A record merged from another node (or loaded from disk) takes its name too,
    # and a tombstone merged over it frees the name again.
    other = make_store("n2", seed=2)
    store.merge(web(other, name="api"))
    with pytest.raises(Conflict, match="as 'api'"):
        check(Kind.SERVICE, "API")
    store.merge(other.remove_service("api", NOW)[-1].after)
    check(Kind.SERVICE, "API")
    store.create_network(NetworkSpec(name="back"), NOW)
    loaded = make_store("n3", seed=3)
    loaded.load(store.all_records())
    with pytest.raises(Conflict, match="as 'back'"):
        loaded._check_name_free(Kind.NETWORK, "BACK")


# -- weights (issue 19) -----------------------------------------------------------------


def test_a_task_has_a_weight_0_to_1000_and_the_service_can_override_it() -> None:
    store = make_store()
    web(store)
    changes = store.add_task(TaskSpec(service="web", address="127.0.0.1", weight=3), NOW)
    canary = changes[-1].after
    assert isinstance(canary, Task) and canary.weight == 3
    other = task(store, address="127.0.0.2")
    assert other.weight == 1
    with pytest.raises(Invalid):
        store.add_task(TaskSpec(service="web", address="127.0.0.3", weight=1001), NOW)
    # by id or by name; merged; null removes one
    store.update_service("web", ServicePatch(weights={canary.id: 0, other.name: 7}), NOW)
    service = store.service("web")
    assert service.weights == {canary.id: 0, other.id: 7}
    assert service.weight_of(canary) == 0 and service.weight_of(other) == 7
    store.update_service("web", ServicePatch(weights={canary.id: None}), NOW)
    assert store.service("web").weights == {other.id: 7}
    assert store.service("web").weight_of(canary) == 3
    for bad in ({"no-such-task": 1}, {other.id: 1001}):
        with pytest.raises(Invalid):
            store.update_service("web", ServicePatch(weights=bad), NOW)  # type: ignore[arg-type]
    assert store.service("web").weights == {other.id: 7}


def test_weights_survive_the_codec() -> None:
    from mesh.core.codec import record_from_dict, record_to_dict

    store = make_store()
    web(store)
    canary = store.add_task(TaskSpec(service="web", address="127.0.0.1", weight=250), NOW)[-1].after
    assert isinstance(canary, Task)
    store.update_service("web", ServicePatch(weights={canary.id: 750}), NOW)
    for record in (canary, store.service("web")):
        assert record_from_dict(record_to_dict(record)) == record
    # an older record has neither: weight 1, no overrides
    data = record_to_dict(canary)
    del data["weight"]
    assert record_from_dict(data) == dataclasses.replace(canary, weight=1)
    data["weight"] = 5000
    with pytest.raises(ValueError, match=r"not in 0\.\.1000"):
        record_from_dict(data)
