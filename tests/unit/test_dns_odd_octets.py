"""A mesh name whose zone label holds octets outside letters, digits and hyphen.

The NXDOMAIN's SOA is cut from the asker's name (`NameTable.zone_of`); dnslib
spells such octets as \\DDD and its own `DNSLabel(str)` raised on them (IDNA),
which the UDP listener turned into SERVFAIL and an error log line per packet.
Found by tests/unit/test_dns_fuzz.py (issue 20's run of the unit suite).
"""

from __future__ import annotations

from dnslib import QTYPE, RCODE, DNSRecord

from dns.responder import wire_labels
from tests.unit.test_dns_responder import HOST, World


def _query(labels: list[bytes]) -> bytes:
    base = bytearray(DNSRecord.question("x", "A").pack())
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return bytes(base[:12]) + question + b"\x00\x01\x00\x01"


def test_nxdomain_with_odd_octets_in_its_zone_is_answered() -> None:
    world = World(domain="mesh")
    odd = b"\xc2\x80pe"
    reply = world.responder.respond(_query([b"tasks", odd]), HOST)
    assert isinstance(reply, bytes)
    parsed = DNSRecord.parse(reply)
    assert parsed.header.rcode == RCODE.NXDOMAIN
    (soa,) = parsed.auth
    assert soa.rtype == QTYPE.SOA
    assert soa.rname.label == (odd,)  # the zone's octets, as the asker sent them


def test_wire_labels_reads_dnslibs_escapes() -> None:
    assert wire_labels("web.front.") == (b"web", b"front")
    assert wire_labels("\\194\\128pe") == (b"\xc2\x80pe",)
    assert wire_labels("a\\046b.c") == (b"a.b", b"c")
    assert wire_labels("") == ()
