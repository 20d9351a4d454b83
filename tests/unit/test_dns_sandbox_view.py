"""A sandbox's fixed view: several networks, network aliases, per-network task addresses.

The table and the responder only (no sockets): a sandbox listener hands its
view to `Responder.respond`, whatever the asker's source address.
"""

from __future__ import annotations

import random

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from dns.responder import FORWARD, DnsConfig, Responder
from dns.table import HOST_VIEW, NameTable, View, sandbox_view
from mesh.core.model import (
    Change,
    Endpoint,
    Health,
    Kind,
    Network,
    Record,
    Sandbox,
    Service,
    Task,
    Vip,
)

SOURCE = "127.0.0.1"  # what a sandbox's asker looks like to its 127.0.0.11 listener

NETS = (
    Network(name="a", id="na", driver="bridge", subnet="10.1.0.0/24", gateway="10.1.0.1"),
    Network(name="b", id="nb", driver="bridge", subnet="10.2.0.0/24", gateway="10.2.0.1"),
    Network(name="c", id="nc", driver="bridge", subnet="10.3.0.0/24", gateway="10.3.0.1"),
)


def vip(network: str, address: str) -> Vip:
    return Vip(network=network, address=address)


def sandboxed(task_id: str, service: str, slot: int, **addresses: str) -> Task:
    endpoints = tuple(
        Endpoint(network=n, address=a, mac="02:42:00:00:00:00", interface=f"eth{i}")
        for i, (n, a) in enumerate(addresses.items())
    )
    return Task(
        id=task_id,
        name=f"{service}.{slot}.{task_id}",
        service=service,
        slot=slot,
        node="n1",
        address=endpoints[0].address,
        health=Health.HEALTHY,
        sandbox=Sandbox(netns=f"/run/netns/mp-abcdef-{task_id}", endpoints=endpoints),
    )


def records() -> list[Record]:
    return [
        *NETS,
        # on a and b: each sandbox gets the VIP on its own network
        Service(
            name="web",
            id="s1",
            networks=("a", "b"),
            vips=(vip("a", "10.1.0.2"), vip("b", "10.2.0.2")),
            aliases={"a": ("front-door",), "b": ("back-door",)},
        ),
        Service(name="api", id="s2", networks=("a",), vips=(vip("a", "10.1.0.3"),)),
        Service(name="secret", id="s3", networks=("c",), vips=(vip("c", "10.3.0.3"),)),
        # dnsrr on a and b, with sandboxed tasks that have an address on each
        Service(
            name="db", id="s4", networks=("a", "b"), endpoint_mode="dnsrr", aliases={"b": ("pg",)}
        ),
        sandboxed("t1", "db", 1, a="10.1.0.21", b="10.2.0.21"),
        sandboxed("t2", "db", 2, a="10.1.0.22", b="10.2.0.22"),
        sandboxed("t3", "secret", 1, c="10.3.0.31"),
    ]


@pytest.fixture
def responder() -> Responder:
    table = NameTable()
    table.load(records())
    return Responder(table, DnsConfig(ttl=5), random.Random(1))


def ask(responder: Responder, name: str, view: View, qtype: str = "A") -> DNSRecord | object:
    query = DNSRecord.question(name, qtype)
    reply = responder.respond(bytes(query.pack()), SOURCE, tcp=False, view=view)
    if reply is FORWARD:
        return FORWARD
    assert isinstance(reply, bytes)
    return DNSRecord.parse(reply)


def a_records(reply: object) -> list[str]:
    assert isinstance(reply, DNSRecord), reply
    assert reply.header.rcode == RCODE.NOERROR
    return sorted(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)


def rcode(reply: object) -> int:
    assert isinstance(reply, DNSRecord), reply
    return int(reply.header.rcode)


A, B, C = sandbox_view(["a"]), sandbox_view(["b"]), sandbox_view(["c"])
AB, BA = sandbox_view(["a", "b"]), sandbox_view(["b", "a"])


def test_sandbox_view_is_lower_case_unique_and_never_ingress() -> None:
    assert sandbox_view(["B", "a", "b", "ingress"]) == ("b", "a")


def test_a_service_on_two_networks_answers_each_sandbox_with_its_own_vip(
    responder: Responder,
) -> None:
    assert a_records(ask(responder, "web", A)) == ["10.1.0.2"]
    assert a_records(ask(responder, "web", B)) == ["10.2.0.2"]
    # on both: the VIP on the first of the *sandbox's* networks, not the service's
    assert a_records(ask(responder, "web", AB)) == ["10.1.0.2"]
    assert a_records(ask(responder, "web", BA)) == ["10.2.0.2"]
    assert a_records(ask(responder, "web", HOST_VIEW)) == ["10.1.0.2"]


def test_a_sandbox_sees_only_the_services_of_its_networks(responder: Responder) -> None:
    assert a_records(ask(responder, "api", A)) == ["10.1.0.3"]
    assert ask(responder, "api", B) is FORWARD  # not a name here: as if the mesh had none
    assert ask(responder, "secret", AB) is FORWARD
    assert rcode(ask(responder, "tasks.secret", AB)) == RCODE.NXDOMAIN
    assert rcode(ask(responder, "secret.c", AB)) == RCODE.NXDOMAIN  # another network: no
    assert rcode(ask(responder, "api.b", BA)) == RCODE.NXDOMAIN
    assert a_records(ask(responder, "secret", C)) == ["10.3.0.3"]
    assert a_records(ask(responder, "web.b", AB)) == ["10.2.0.2"]
    assert a_records(ask(responder, "tasks.secret", C)) == ["10.3.0.31"]


def test_tasks_in_sandboxes_answer_with_their_address_on_the_askers_network(
    responder: Responder,
) -> None:
    assert a_records(ask(responder, "db", A)) == ["10.1.0.21", "10.1.0.22"]
    assert a_records(ask(responder, "db", B)) == ["10.2.0.21", "10.2.0.22"]
    assert a_records(ask(responder, "tasks.db", BA)) == ["10.2.0.21", "10.2.0.22"]
    assert a_records(ask(responder, "tasks.db.a", BA)) == ["10.1.0.21", "10.1.0.22"]
    assert a_records(ask(responder, "db.1.t1", B)) == ["10.2.0.21"]
    # the host sees the first address (eth0) as before
    assert a_records(ask(responder, "db", HOST_VIEW)) == ["10.1.0.21", "10.1.0.22"]


def test_aliases_resolve_on_their_network_only(responder: Responder) -> None:
    assert a_records(ask(responder, "front-door", A)) == ["10.1.0.2"]
    assert ask(responder, "front-door", B) is FORWARD
    assert a_records(ask(responder, "back-door", B)) == ["10.2.0.2"]
    assert ask(responder, "back-door", A) is FORWARD
    assert a_records(ask(responder, "back-door", AB)) == ["10.2.0.2"]  # b is in the view
    assert a_records(ask(responder, "front-door.a", AB)) == ["10.1.0.2"]
    assert rcode(ask(responder, "front-door.b", AB)) == RCODE.NXDOMAIN  # not an alias on b
    assert ask(responder, "front-door", C) is FORWARD
    # dnsrr: the tasks' addresses on the alias's network, whatever the view's order
    assert a_records(ask(responder, "pg", AB)) == ["10.2.0.21", "10.2.0.22"]
    assert ask(responder, "pg", A) is FORWARD


def test_reverse_names_only_inside_the_sandboxs_networks(responder: Responder) -> None:
    def ptr(address: str, view: View) -> tuple[int, list[str]]:
        name = ".".join(reversed(address.split("."))) + ".in-addr.arpa"
        reply = ask(responder, name, view, "PTR")
        assert isinstance(reply, DNSRecord)
        return int(reply.header.rcode), [str(r.rdata) for r in reply.rr]

    assert ptr("10.2.0.2", B) == (RCODE.NOERROR, ["web.b."])
    assert ptr("10.2.0.2", A)[0] == RCODE.NXDOMAIN  # web's VIP on b, asked from a
    assert ptr("10.2.0.21", B) == (RCODE.NOERROR, ["db.1.t1.b."])
    assert ptr("10.2.0.21", A)[0] == RCODE.NXDOMAIN
    assert ptr("10.1.0.21", AB) == (RCODE.NOERROR, ["db.1.t1.a."])
    assert ptr("10.3.0.31", AB)[0] == RCODE.NXDOMAIN  # a task on another network


def test_changes_reach_sandbox_views_through_the_cache(responder: Responder) -> None:
    assert ask(responder, "new-alias", B) is FORWARD  # the miss is cached
    before = next(r for r in records() if isinstance(r, Service) and r.name == "api")
    after = Service(
        name="api",
        id="s2",
        networks=("a", "b"),
        vips=(vip("a", "10.1.0.3"), vip("b", "10.2.0.3")),
        aliases={"b": ("new-alias",)},
    )
    responder.on_change(Change(Kind.SERVICE, "api", before, after))
    assert a_records(ask(responder, "new-alias", B)) == ["10.2.0.3"]
    assert a_records(ask(responder, "api", B)) == ["10.2.0.3"]
    responder.on_change(Change(Kind.SERVICE, "api", after, before))
    assert ask(responder, "new-alias", B) is FORWARD
    assert ask(responder, "api", B) is FORWARD


def test_a_sandbox_view_ignores_the_askers_source_address(responder: Responder) -> None:
    # 10.3.0.50 is on c: by address it would see `secret`; a sandbox's listener says a.
    query = bytes(DNSRecord.question("secret").pack())
    assert responder.respond(query, "10.3.0.50", view=A) is FORWARD
    assert isinstance(responder.respond(query, "10.3.0.50"), bytes)


def test_inspect_records_of_a_sandbox_view(responder: Responder) -> None:
    names = {(n, v) for n, t, v in responder.table.records(B) if t == "A"}
    assert ("back-door", "10.2.0.2") in names
    assert ("pg", "10.2.0.21") in names
    assert all(n != "front-door" and n != "api" and n != "secret" for n, _ in names)
