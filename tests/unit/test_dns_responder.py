"""The DNS responder over a real store: names, views, health, caching, malformed packets."""

from __future__ import annotations

import random

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from dns.responder import FORWARD, DnsConfig, Responder, error_reply, reverse_address
from dns.table import NameTable
from mesh.core.model import Change, Health
from mesh.ipam import Ipam, parse_pool
from mesh.state.specs import NetworkSpec, PortSpec, ServiceSpec, TaskSpec
from mesh.state.store import Store

HOST = "127.0.0.1"
NOW = 1.0


class World:
    """A store whose every change goes straight to a responder, as the feed does."""

    def __init__(self, domain: str | None = None) -> None:
        self.store = Store("n1", Ipam(parse_pool("10.0.0.0/8")), random.Random(1))
        self.responder = Responder(
            NameTable(domain), DnsConfig(ttl=5, domain=domain), random.Random(2)
        )
        self.apply(self.store.ensure_ingress())
        self.apply(self.store.create_network(NetworkSpec(name="front", subnet="10.1.0.0/24"), NOW))
        self.apply(self.store.create_network(NetworkSpec(name="back", subnet="10.2.0.0/24"), NOW))

    def apply(self, changes: list[Change]) -> list[Change]:
        for change in changes:
            self.responder.on_change(change)
        return changes

    def service(self, name: str, **kw: object) -> None:
        self.apply(self.store.create_service(ServiceSpec(name=name, **kw), NOW))  # type: ignore[arg-type]

    def task(self, service: str, address: str, ports: dict[int, int] | None = None) -> str:
        changes = self.apply(
            self.store.add_task(TaskSpec(service=service, address=address, ports=ports or {}), NOW)
        )
        return changes[0].key

    def ask(
        self, name: str, qtype: str = "A", source: str = HOST, tcp: bool = False, edns: bool = False
    ) -> DNSRecord | object:
        query = DNSRecord.question(name, qtype)
        if edns:
            query.add_ar(EDNS0(udp_len=4096))
        reply = self.responder.respond(bytes(query.pack()), source, tcp)
        if reply is FORWARD:
            return FORWARD
        assert isinstance(reply, bytes)
        parsed = DNSRecord.parse(reply)
        assert parsed.header.id == query.header.id
        return parsed


def addresses(reply: object) -> list[str]:
    assert isinstance(reply, DNSRecord)
    return sorted(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)


@pytest.fixture
def world() -> World:
    w = World(domain="mesh")
    w.service(
        "web", networks=("front", "back"), ports=(PortSpec(target_port=80, published_port=8080),)
    )
    w.service("db", networks=("back",), endpoint_mode="dnsrr")
    w.task("web", "10.1.0.10", {80: 31001})
    w.task("web", "10.1.0.11", {80: 31002})
    w.task("db", "10.2.0.20")
    w.task("db", "10.2.0.21")
    return w


def test_service_vip_depends_on_the_askers_network(world: World) -> None:
    assert addresses(world.ask("web")) == ["10.1.0.2"]  # host: first network
    assert addresses(world.ask("web", source="10.2.0.99")) == ["10.2.0.2"]
    assert addresses(world.ask("web.back")) == ["10.2.0.2"]
    assert addresses(world.ask("WEB.Mesh.")) == ["10.1.0.2"]


def test_tasks_and_dnsrr_and_task_names(world: World) -> None:
    assert addresses(world.ask("tasks.web")) == ["10.1.0.10", "10.1.0.11"]
    assert addresses(world.ask("db")) == ["10.2.0.20", "10.2.0.21"]
    name = world.store.tasks(service="web")[0].name
    assert addresses(world.ask(name)) == ["10.1.0.10"]


def test_network_scoping(world: World) -> None:
    reply = world.ask("db", source="10.1.0.50")  # front cannot see a back-only service
    assert reply is FORWARD
    assert world.ask("tasks.db", source="10.1.0.50").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
    assert world.ask("db.back", source="10.1.0.50").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
    assert addresses(world.ask("db", source="10.2.0.50")) == ["10.2.0.20", "10.2.0.21"]


def test_ingress_has_no_names(world: World) -> None:
    assert world.ask("web.ingress") is FORWARD
    ingress_vip = next(v.address for v in world.store.service("web").vips if v.network == "ingress")
    reverse = ".".join(reversed(ingress_vip.split("."))) + ".in-addr.arpa"
    assert world.ask(reverse, "PTR").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]


def test_unhealthy_task_is_gone_at_the_next_query(world: World) -> None:
    assert len(addresses(world.ask("tasks.db"))) == 2  # cached now
    task = world.store.tasks(service="db")[0]
    world.apply(world.store.set_health(task.id, Health.UNHEALTHY, "down", NOW))
    assert addresses(world.ask("tasks.db")) == ["10.2.0.21"]
    assert addresses(world.ask("db")) == ["10.2.0.21"]
    world.apply(world.store.set_health(task.id, Health.HEALTHY, "", NOW))
    assert len(addresses(world.ask("db"))) == 2


def test_multi_address_answers_rotate(world: World) -> None:
    orders = {tuple(str(r.rdata) for r in world.ask("tasks.web").rr) for _ in range(4)}  # type: ignore[union-attr]
    assert len(orders) == 2


def test_srv_gives_each_task_and_its_real_port(world: World) -> None:
    reply = world.ask("_80._tcp.web", "SRV")
    assert isinstance(reply, DNSRecord)
    assert sorted(r.rdata.port for r in reply.rr) == [31001, 31002]
    assert sorted(str(r.rdata) for r in reply.ar if r.rtype == QTYPE.A) == [
        "10.1.0.10",
        "10.1.0.11",
    ]
    assert world.ask("_8080._tcp.web", "SRV").rr  # type: ignore[union-attr]
    assert world.ask("_81._tcp.web", "SRV").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]


def test_ptr_of_task_and_vip(world: World) -> None:
    vip = world.ask("2.0.1.10.in-addr.arpa", "PTR")
    assert [str(r.rdata) for r in vip.rr] == ["web.front."]  # type: ignore[union-attr]
    task = world.ask("20.0.2.10.in-addr.arpa", "PTR")
    assert str(task.rr[0].rdata).endswith(".back.")  # type: ignore[union-attr]
    assert world.ask("99.0.2.10.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
    assert world.ask("1.1.168.192.in-addr.arpa", "PTR") is FORWARD


def test_known_name_other_type_is_empty_noerror(world: World) -> None:
    reply = world.ask("web", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr  # type: ignore[union-attr]


def test_mesh_space_misses_are_nxdomain_others_forwarded(world: World) -> None:
    for name in ("tasks.nope", "nope.front", "nope.mesh"):
        assert world.ask(name).header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
    assert world.ask("example.com") is FORWARD
    assert world.ask("example.com") is FORWARD  # from the forward marker


def soa_of(reply: object) -> tuple[str, int, int] | None:
    """The authority section's SOA as (owner, TTL, MINIMUM), or None; it must be the only record."""
    assert isinstance(reply, DNSRecord)
    if not reply.auth:
        return None
    assert [r.rtype for r in reply.auth] == [QTYPE.SOA]
    soa = reply.auth[0]
    return str(soa.rname), int(soa.ttl), int(soa.rdata.times[4])


@pytest.mark.parametrize(
    ("name", "qtype", "source", "zone"),
    [
        ("tasks.nope", "A", HOST, "nope."),
        ("nope.front", "A", HOST, "front."),
        ("nope.mesh", "A", HOST, "mesh."),
        ("tasks.nope.mesh", "A", HOST, "mesh."),
        ("tasks.nope.front", "A", HOST, "front."),
        ("tasks.db", "A", "10.1.0.50", "db."),  # a service another network cannot see
        ("db.back", "A", "10.1.0.50", "back."),
        ("_81._tcp.web", "SRV", HOST, "web."),
        ("99.0.2.10.in-addr.arpa", "PTR", HOST, "0.2.10.in-addr.arpa."),
    ],
)
def test_nxdomain_in_mesh_space_carries_the_zones_soa(
    world: World, name: str, qtype: str, source: str, zone: str
) -> None:
    """Issue 14, item 5: RFC 2308 §3, so that resolvers cache the NXDOMAIN for the DNS TTL."""
    for tcp in (False, True):
        reply = world.ask(name, qtype, source=source, tcp=tcp)
        assert reply.header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
        assert soa_of(reply) == (zone, 5, 5)
        assert soa_of(world.ask(name, qtype, source=source, tcp=tcp)) == (zone, 5, 5)  # cached
    soa = world.responder.soa(zone.rstrip("."))
    assert (str(soa.rdata.mname), str(soa.rdata.rname)) == (f"ns.dns.{zone}", f"hostmaster.{zone}")


def test_nodata_carries_the_soa_and_answers_none(world: World) -> None:
    assert soa_of(world.ask("web", "AAAA")) == ("web.", 5, 5)
    assert soa_of(world.ask("web.mesh", "AAAA")) == ("mesh.", 5, 5)
    assert soa_of(world.ask("web")) is None
    assert soa_of(world.ask("tasks.web")) is None
    assert soa_of(world.ask("2.0.1.10.in-addr.arpa", "PTR")) is None


def test_soa_follows_the_dns_ttl() -> None:
    w = World()
    w.responder = Responder(w.responder.table, DnsConfig(ttl=30), random.Random(2))
    assert soa_of(w.ask("tasks.nope")) == ("nope.", 30, 30)


def test_reverse_zone_is_cut_at_an_octet_boundary() -> None:
    w = World()
    w.apply(w.store.create_network(NetworkSpec(name="wide", subnet="10.16.0.0/12"), NOW))
    assert w.responder.table.zone_of("x", "10.20.1.2") == "10.in-addr.arpa"
    assert w.responder.table.zone_of("x", "10.1.0.7") == "0.1.10.in-addr.arpa"
    assert w.responder.table.zone_of("x", "192.0.2.1") == "in-addr.arpa"


def test_a_new_service_replaces_a_cached_miss(world: World) -> None:
    assert world.ask("api") is FORWARD
    assert world.ask("tasks.api").header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
    world.service("api", networks=("front",))
    assert addresses(world.ask("api")) == ["10.1.0.3"]
    assert world.ask("tasks.api").header.rcode == RCODE.NOERROR  # type: ignore[union-attr]


def test_large_answers_truncate_over_udp_but_not_tcp() -> None:
    w = World()
    w.service("big", networks=("front",), endpoint_mode="dnsrr")
    for i in range(60):
        w.task("big", f"10.1.0.{100 + i}")
    udp = w.ask("big")
    assert udp.header.tc == 1 and not udp.rr  # type: ignore[union-attr]
    assert len(addresses(w.ask("big", tcp=True))) == 60
    assert len(addresses(w.ask("big", edns=True))) == 60  # 1232 bytes hold 60 A records


def test_malformed_packets() -> None:
    responder = World().responder
    query = bytes(DNSRecord.question("web").pack())
    assert responder.respond(b"\x00\x01", HOST) is None  # no header: dropped
    response = bytearray(query)
    response[2] |= 0x80
    assert responder.respond(bytes(response), HOST) is None  # a response: never answered
    notimp = bytearray(query)
    notimp[2] |= 0x10  # opcode 2 (STATUS)
    assert DNSRecord.parse(responder.respond(bytes(notimp), HOST)).header.rcode == RCODE.NOTIMP  # type: ignore[arg-type]
    two = bytearray(query)
    two[5] = 2  # QDCOUNT 2
    assert DNSRecord.parse(responder.respond(bytes(two), HOST)).header.rcode == RCODE.FORMERR  # type: ignore[arg-type]
    loop = query[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"  # a name pointing at itself
    assert DNSRecord.parse(responder.respond(loop, HOST)).header.rcode == RCODE.FORMERR  # type: ignore[arg-type]
    assert responder.stats["formerr"] == 2 and responder.stats["notimp"] == 1
    assert responder.stats["dropped"] == 2


def test_error_reply_keeps_id_and_rd() -> None:
    reply = DNSRecord.parse(error_reply(bytes(DNSRecord.question("x").pack()), 1))
    assert reply.header.rd == 1 and reply.header.qr == 1 and reply.header.rcode == 1


def test_reverse_address() -> None:
    assert reverse_address("4.3.2.1.in-addr.arpa.") == "1.2.3.4"
    assert reverse_address("3.2.1.in-addr.arpa.") is None
    assert reverse_address("x.3.2.1.in-addr.arpa.") is None


def test_edns_options_like_cookies_share_one_cache_entry(world: World) -> None:
    from dnslib import EDNSOption

    seen = set()
    for cookie in range(6):
        query = DNSRecord.question("tasks.web")
        query.add_ar(EDNS0(udp_len=4096, opts=[EDNSOption(10, cookie.to_bytes(8, "big"))]))
        reply = world.responder.respond(bytes(query.pack()), HOST)
        assert isinstance(reply, bytes)
        seen.add(tuple(str(r.rdata) for r in DNSRecord.parse(reply).rr))
    assert len(seen) == 2  # the rotation goes on across cookies
    assert len(world.responder.cache) == 1


def test_truncated_reply_keeps_its_question() -> None:
    w = World()
    w.service("big", networks=("front",), endpoint_mode="dnsrr")
    for i in range(60):
        w.task("big", f"10.1.0.{100 + i}")
    reply = w.ask("big")
    assert isinstance(reply, DNSRecord)
    assert reply.header.tc == 1
    assert [str(q.qname) for q in reply.questions] == ["big."]


def test_other_classes_are_not_ours(world: World) -> None:
    query = DNSRecord.question("web", "A", "CH")
    assert world.responder.respond(bytes(query.pack()), HOST) is FORWARD


def test_records_list_what_each_view_is_answered(world: World) -> None:
    table = world.responder.table
    host = table.records("")
    assert ("web", "A", "10.1.0.2") in host and ("db", "A", "10.2.0.21") in host
    assert ("tasks.web", "A", "10.1.0.11") in host
    assert ("10.2.0.2", "PTR", "web.back") in host
    srv = sorted(v for n, t, v in host if t == "SRV")
    assert len(srv) == 2 and srv[0].startswith("31001 web.1.")
    front = table.records(table.view_of("10.1.0.50"))
    assert not [r for r in front if r[0] in ("db", "tasks.db")]  # back only
    assert ("web", "A", "10.1.0.2") in front
    for name, rtype, value in host:  # every listed record is what a query answers
        if rtype == "A":
            assert value in addresses(world.ask(name))


# -- issue 13: what a client varies freely makes no cache entries; bad names; BADVERS ----------


def padded_variants(
    name: str, count: int, padding: int = 300, qtype: str = "A", edns: bool = False
) -> list[bytes]:
    """`count` queries for one question, each with distinct trailing garbage after it."""
    query = DNSRecord(DNSHeader(id=0x1234, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    wire = bytes(query.pack())
    return [wire + i.to_bytes(4, "big") + bytes([i % 251]) * (padding - 4) for i in range(count)]


@pytest.mark.parametrize("edns", [False, True])
def test_padded_queries_share_one_cache_entry(world: World, edns: bool) -> None:
    responder = world.responder
    first = responder.respond(padded_variants("tasks.web", 1, edns=edns)[0], HOST)
    assert isinstance(first, bytes)
    entries, size = len(responder.cache), responder.cache.size_bytes
    for data in padded_variants("tasks.web", 500, edns=edns):
        reply = responder.respond(data, HOST)
        assert isinstance(reply, bytes)
        parsed = DNSRecord.parse(reply)
        assert parsed.header.id == 0x1234 and addresses(parsed) == ["10.1.0.10", "10.1.0.11"]
    print(
        f"\n500 padded variants: {len(responder.cache)} cache entry, "
        f"{responder.cache.size_bytes} bytes"
    )
    assert (entries, responder.cache.size_bytes) == (1, size)
    assert len(responder.cache) == 1


def test_padded_forwarded_names_share_one_forward_mark(world: World) -> None:
    responder = world.responder
    for data in padded_variants("example.com", 500):
        assert responder.respond(data, HOST) is FORWARD
    assert len(responder.cache) == 1
    assert responder.stats["forwarded"] == 500


def test_case_variants_share_one_entry_and_get_their_own_case_back(world: World) -> None:
    responder = world.responder
    for name in ("tasks.web", "TASKS.web", "TaSkS.WeB", "tasks.WEB.mesh", "tasks.web.mesh"):
        query = DNSRecord(DNSHeader(id=7, rd=1), q=DNSQuestion(name))
        reply = responder.respond(bytes(query.pack()), HOST)
        assert isinstance(reply, bytes)
        parsed = DNSRecord.parse(reply)
        # The asker's bytes, case included (0x20-encoding resolvers compare them).
        assert [str(q.qname) for q in parsed.questions] == [f"{name}."]
        assert {str(r.rname) for r in parsed.rr} == {f"{name}."}
        assert addresses(parsed) == ["10.1.0.10", "10.1.0.11"]
    assert len(responder.cache) == 2  # tasks.web and tasks.web.mesh


def test_rd_and_do_are_part_of_the_key_other_header_bits_are_not(world: World) -> None:
    responder = world.responder
    for flags in (0x0100, 0x0120, 0x0110, 0x0130):  # RD with AD and/or CD
        data = (
            (5).to_bytes(2, "big")
            + flags.to_bytes(2, "big")
            + bytes(DNSRecord.question("web").pack())[4:]
        )
        parsed = DNSRecord.parse(responder.respond(data, HOST))  # type: ignore[arg-type]
        assert parsed.header.rd == 1 and addresses(parsed) == ["10.1.0.2"]
    assert len(responder.cache) == 1
    no_rd = DNSRecord(DNSHeader(id=5, rd=0), q=DNSQuestion("web"))
    assert DNSRecord.parse(responder.respond(bytes(no_rd.pack()), HOST)).header.rd == 0  # type: ignore[arg-type]
    with_do = DNSRecord.question("web")
    with_do.add_ar(EDNS0(udp_len=1232, flags="do"))
    assert addresses(DNSRecord.parse(responder.respond(bytes(with_do.pack()), HOST))) == [  # type: ignore[arg-type]
        "10.1.0.2"
    ]
    assert len(responder.cache) == 3


def test_cache_is_bounded_by_entries_and_bytes_least_recently_used_first() -> None:
    w = World()
    w.service("web", networks=("front",))
    by_entries = Responder(w.responder.table, DnsConfig(cache_entries=50))
    by_bytes = Responder(w.responder.table, DnsConfig(cache_bytes=40 * 900))
    for responder in (by_entries, by_bytes):
        hot = bytes(DNSRecord.question("web").pack())
        for i in range(300):
            assert isinstance(responder.respond(hot, HOST), bytes)  # kept in use
            responder.respond(bytes(DNSRecord.question(f"n{i}.example.com").pack()), HOST)
        assert len(responder.cache) <= responder.config.cache_entries
        assert responder.cache.size_bytes <= responder.config.cache_bytes
        assert responder.cache.evicted > 200
        key = next(k for k in responder.cache.entries if k[2].find(b"\x03web") >= 0)
        assert key in responder.cache.entries  # the hot name survived every eviction


def test_overlong_names_get_formerr_and_are_counted(world: World) -> None:
    responder = world.responder
    labels = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x05bcdef\x00"  # 262 octets
    query = bytes(DNSRecord.question("x").pack())[:12] + labels + b"\x00\x01\x00\x01"
    for data in (query, query + b"\x00" * 300):
        reply = responder.respond(data, HOST)
        assert isinstance(reply, bytes)
        assert reply[:2] == data[:2] and DNSRecord.parse(reply).header.rcode == RCODE.FORMERR
    assert responder.stats["formerr"] == 2 and len(responder.cache) == 0


@pytest.mark.parametrize("name", ["web", "example.com"])
def test_edns_version_other_than_0_gets_badvers(world: World, name: str) -> None:
    query = DNSRecord.question(name)
    query.add_ar(EDNS0(udp_len=1232, version=1))
    reply = world.responder.respond(bytes(query.pack()), HOST)
    assert isinstance(reply, bytes)
    parsed = DNSRecord.parse(reply)
    opt = next(r for r in parsed.ar if r.rtype == QTYPE.OPT)
    assert parsed.header.id == query.header.id and parsed.header.qr == 1
    assert (opt.edns_rcode << 4 | parsed.header.rcode) == 16  # BADVERS, RFC 6891 §6.1.3
    assert opt.edns_ver == 0 and not parsed.rr
    assert world.responder.stats["badvers"] == 1 and len(world.responder.cache) == 0


def test_ptr_of_an_address_two_tasks_share_and_the_index_after_they_go(world: World) -> None:
    """Both tasks at one address answer its PTR; once both are removed the reverse index
    holds nothing for it (an emptied entry used to stay, one per address ever seen)."""
    index = world.responder.table._tasks_by_address
    held = len(index)
    other = world.task("web", "10.2.0.20", {80: 31003})  # db's task holds it already
    assert len(index) == held
    both = world.ask("20.0.2.10.in-addr.arpa", "PTR")
    assert len(both.rr) == 2  # type: ignore[union-attr]
    world.apply(world.store.remove_task(other, NOW))
    one = world.ask("20.0.2.10.in-addr.arpa", "PTR")
    assert len(one.rr) == 1  # type: ignore[union-attr]
    for task in world.store.tasks():
        world.apply(world.store.remove_task(task.id, NOW))
    assert len(index) == 0
    gone = world.ask("20.0.2.10.in-addr.arpa", "PTR")
    assert gone.header.rcode == RCODE.NXDOMAIN  # type: ignore[union-attr]
