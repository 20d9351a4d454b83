"""Plain A queries answered from wire templates, byte for byte as the dnslib path (issue 20).

Two responders with the same seed see the same state; the reference one has
its templates switched off, so it builds every reply with dnslib. Each query
must get the same bytes from both, and the templated one must answer the
plain ones without calling dnslib at all.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from dnslib import EDNS0, DNSRecord, EDNSOption

import dns.responder as responder_module
from dns.responder import FORWARD, DnsConfig, Responder
from dns.table import NameTable
from tests.unit.test_dns_responder import HOST, World


class FullPathOnly(Responder):
    def _from_template(self, *args: object) -> None:  # type: ignore[override]
        return None


@pytest.fixture
def worlds() -> tuple[World, Responder]:
    """A world (its responder templated) and a dnslib-only responder fed the same changes."""
    world = World(domain="mesh")
    reference = FullPathOnly(NameTable("mesh"), DnsConfig(ttl=5, domain="mesh"), random.Random(2))
    world.responder.table = reference.table  # one table, two caches (the table is read-only here)
    world.service("web", networks=("front",))  # a VIP
    world.service("rr", networks=("front",), endpoint_mode="dnsrr")  # rotated
    world.service("many", networks=("front",), endpoint_mode="dnsrr")  # shuffled (> 8)
    world.service("huge", networks=("front",), endpoint_mode="dnsrr")  # > 512 bytes: truncated
    for i in range(3):
        world.task("rr", f"10.1.0.{100 + i}")
    for i in range(12):
        world.task("many", f"10.1.0.{110 + i}")
    for i in range(40):
        world.task("huge", f"10.1.0.{130 + i}")
    return world, reference


def _queries() -> Iterator[bytes]:
    for name in ("web", "WeB.MeSh", "rr", "tasks.rr", "many", "huge", "nope.mesh", "example.com"):
        for qtype in ("A", "AAAA", "SRV"):
            plain = DNSRecord.question(name, qtype)
            yield bytes(plain.pack())
            plain.header.rd = 0
            yield bytes(plain.pack())
            for size in (512, 600, 1232, 4096):
                edns = DNSRecord.question(name, qtype)
                edns.add_ar(EDNS0(udp_len=size))
                yield bytes(edns.pack())
            cookie = DNSRecord.question(name, qtype)
            cookie.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"12345678")]))
            yield bytes(cookie.pack())
            yield bytes(DNSRecord.question(name, qtype).pack()) + b"trailing"


def test_templated_replies_are_the_dnslib_replies_byte_for_byte(
    worlds: tuple[World, Responder],
) -> None:
    world, reference = worlds
    templated = world.responder
    compared = 0
    for round_ in range(3):  # the second and third come from the caches, in rotation
        for tcp in (False, True):
            for i, data in enumerate(_queries()):
                data = (i + 7 * round_).to_bytes(2, "big") + data[2:]
                got = templated.respond(data, HOST, tcp)
                expected = reference.respond(data, HOST, tcp)
                assert got == expected, (DNSRecord.parse(data).q, tcp)
                compared += 1
    assert templated.stats["truncated"] == reference.stats["truncated"] > 0
    assert templated.stats["forwarded"] == reference.stats["forwarded"] > 0
    print(f"{compared} replies compared")


def test_plain_a_queries_never_touch_dnslib(
    worlds: tuple[World, Responder], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, _ = worlds

    def no_dnslib(*args: object, **kw: object) -> None:
        raise AssertionError("dnslib was called for a plain A query")

    queries = [
        bytes(DNSRecord.question(name, "A").pack())
        for name in ("web", "RR.mesh", "tasks.rr", "WEB.mesh", "example.com")
    ]
    edns = DNSRecord.question("web.mesh", "A")
    edns.add_ar(EDNS0(udp_len=1232))
    queries.append(bytes(edns.pack()))
    expected = [world.responder.respond(q, HOST) for q in queries]  # the first time: misses
    world.responder.cache.clear()
    monkeypatch.setattr(responder_module.DNSRecord, "parse", no_dnslib)
    monkeypatch.setattr(responder_module.DNSRecord, "pack", no_dnslib)
    misses = world.responder.stats["cache_misses"]
    assert [world.responder.respond(q, HOST) for q in queries] == expected
    assert world.responder.stats["cache_misses"] == misses + len(queries)  # each one built anew
    assert expected[4] is FORWARD  # not a mesh name: the forwarder's, marked in the cache


def test_a_change_drops_the_templated_reply(worlds: tuple[World, Responder]) -> None:
    world, _ = worlds
    query = bytes(DNSRecord.question("tasks.rr", "A").pack())
    before = DNSRecord.parse(world.responder.respond(query, HOST))  # type: ignore[arg-type]
    assert len(before.rr) == 3
    world.task("rr", "10.1.0.99")
    after = DNSRecord.parse(world.responder.respond(query, HOST))  # type: ignore[arg-type]
    assert sorted(str(r.rdata) for r in after.rr) == sorted(
        [*(str(r.rdata) for r in before.rr), "10.1.0.99"]
    )
