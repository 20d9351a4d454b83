"""The overlay peer table (mesh.sandbox.peers): records in, each overlay's remote
endpoints out, for one node. Issue 16, interface 5. Sans-IO: stores stand for nodes."""

from __future__ import annotations

import dataclasses

from mesh.core.model import INGRESS, Network, Node, Task
from mesh.liveness import Liveness
from mesh.sandbox.names import mac_of
from mesh.sandbox.peers import PeerEntry, PeerTable
from mesh.state.store import Store
from tests.unit.test_overlay_state import exchange, node, overlay, service, task

VTEPS = {"n1": "192.0.2.1", "n2": "192.0.2.2", "n3": "192.0.2.3"}


def cluster() -> tuple[list[Store], dict[str, Task]]:
    stores = [node(name, vtep) for name, vtep in VTEPS.items()]
    overlay(stores[0], "app", subnet="10.50.0.0/24")
    service(stores[0], "web", "app")
    exchange(*stores)
    tasks = {s.node: task(s, "web") for s in stores}
    exchange(*stores)
    return stores, {n: stores[0].task(t.id) for n, t in tasks.items()}


def table_of(store: Store) -> PeerTable:
    table = PeerTable(store.node)
    table.load(list(store.all_records()))
    return table


def entry_of(t: Task, vtep: str) -> PeerEntry:
    return PeerEntry(mac_of(t.address), t.address, vtep)


def node_entry(store: Store, name: str, network: str) -> PeerEntry:
    record = store.node_record(name)
    assert record is not None
    address = record.addresses[network]
    return PeerEntry(mac_of(address), address, record.vtep)


def test_the_table_holds_every_remote_task_and_node_address_not_the_local_ones() -> None:
    stores, tasks = cluster()
    n1 = stores[0]
    peers = table_of(n1).table()
    assert set(peers) == {INGRESS, "app"}
    assert peers["app"] == {
        entry_of(tasks["n2"], VTEPS["n2"]),
        entry_of(tasks["n3"], VTEPS["n3"]),
        node_entry(n1, "n2", "app"),
        node_entry(n1, "n3", "app"),
    }
    # ingress: no task joins it; the other nodes' own addresses there
    assert peers[INGRESS] == {node_entry(n1, "n2", INGRESS), node_entry(n1, "n3", INGRESS)}
    # every node derives the same table up to its own point of view
    n3_peers = table_of(stores[2]).peers("app")
    assert entry_of(tasks["n1"], VTEPS["n1"]) in n3_peers
    assert entry_of(tasks["n3"], VTEPS["n3"]) not in n3_peers


def test_a_dead_node_leaves_the_table_with_its_tasks_and_comes_back() -> None:
    stores, tasks = cluster()
    n1 = stores[0]
    table = table_of(n1)
    liveness = Liveness(n1)
    touched: set[str] = set()
    for change in liveness.node_down("n3"):
        touched |= table.update(change.after)
    assert "app" in touched
    assert table.peers("app") == {entry_of(tasks["n2"], VTEPS["n2"]), node_entry(n1, "n2", "app")}
    for change in liveness.node_up("n3"):
        table.update(change.after)
    assert entry_of(tasks["n3"], VTEPS["n3"]) in table.peers("app")


def test_a_task_of_a_node_whose_vtep_is_unknown_has_no_entry() -> None:
    stores, tasks = cluster()
    table = PeerTable("n1")
    table.load([r for r in stores[0].all_records() if not isinstance(r, Node)])
    assert table.peers("app") == frozenset()
    # its node's record arrives: every overlay is touched, the entries appear
    n2 = stores[0].node_record("n2")
    assert n2 is not None
    assert table.update(n2) == {INGRESS, "app"}
    assert entry_of(tasks["n2"], VTEPS["n2"]) in table.peers("app")


def test_updates_answer_the_networks_they_touch() -> None:
    stores, tasks = cluster()
    table = table_of(stores[0])
    moved = dataclasses.replace(tasks["n2"], deleted=True)
    assert table.update(moved) == {"app"}
    assert entry_of(tasks["n2"], VTEPS["n2"]) not in table.peers("app")
    gone = dataclasses.replace(stores[0].network("app"), deleted=True)
    assert table.update(gone) == {"app"}
    assert table.peers("app") == frozenset()
    assert set(table.table()) == {INGRESS}
    bridge = Network(name="br", id="x", driver="bridge", subnet="10.9.0.0/24", gateway="10.9.0.1")
    assert table.update(bridge) == frozenset()


def test_an_address_two_hold_at_one_moment_gives_the_entry_the_repair_keeps() -> None:
    stores, tasks = cluster()
    table = table_of(stores[0])
    older, younger = tasks["n2"], tasks["n3"]
    # n3's task takes n2's address for a moment (before the store's repair)
    first, second = sorted((older, younger), key=lambda t: (t.created_at, t.id))
    assert second.sandbox is not None
    clash = dataclasses.replace(
        second,
        address=first.address,
        sandbox=dataclasses.replace(
            second.sandbox,
            endpoints=tuple(
                dataclasses.replace(e, address=first.address, mac=mac_of(first.address))
                for e in second.sandbox.endpoints
            ),
        ),
    )
    table.update(clash)
    at_address = [p for p in table.peers("app") if p.address == first.address]
    assert at_address == [entry_of(first, VTEPS[first.node])]
    # a node address held by a task too: the task's entry
    n2 = stores[0].node_record("n2")
    assert n2 is not None
    table.update(dataclasses.replace(n2, addresses={"app": first.address}))
    at_address = [p for p in table.peers("app") if p.address == first.address]
    assert at_address == [entry_of(first, VTEPS[first.node])]


def test_a_holder_outside_the_subnet_or_with_a_taken_mac_has_no_entry() -> None:
    stores, tasks = cluster()
    table = table_of(stores[0])
    n2 = stores[0].node_record("n2")
    assert n2 is not None
    table.update(dataclasses.replace(n2, addresses={"app": "10.99.0.5"}))  # another subnet
    assert all(p.address != "10.99.0.5" for p in table.peers("app"))
    t3 = tasks["n3"]
    assert t3.sandbox is not None
    same_mac = dataclasses.replace(
        t3,
        sandbox=dataclasses.replace(
            t3.sandbox,
            endpoints=tuple(
                dataclasses.replace(e, mac=mac_of(tasks["n2"].address))
                for e in t3.sandbox.endpoints
            ),
        ),
    )
    table.update(same_mac)
    macs = [p.mac for p in table.peers("app")]
    assert len(macs) == len(set(macs))
