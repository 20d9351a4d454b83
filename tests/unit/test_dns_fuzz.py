"""Fuzzing the DNS packet path: no exception escapes, every reply is well-formed.

Bounded (a fixed number of examples, no deadline surprises): random bytes,
valid queries with bytes flipped, cut short or extended, and hostile headers.
Every reply must parse, carry the query's ID, and be marked a response.
The other parse paths get the same (issue 13, defect 6): the canonical form
the cache keys on (`dns.question`), the forwarder's `parse_query` behind the
responder, and the server's forwarding step, which answers FORMERR rather
than raise for what the forwarder cannot take.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dns.forward import Forwarder
from dns.question import canonical_query
from dns.relay import MalformedQuery, parse_query
from dns.responder import FORWARD, Responder
from dns.server import forward_or_refuse
from dns.table import NameTable
from mesh.ipam import Ipam, parse_pool
from mesh.state.specs import NetworkSpec, PortSpec, ServiceSpec, TaskSpec
from mesh.state.store import Store

NAMES = [
    "web",
    "tasks.web",
    "db",
    "_80._tcp.web",
    "web.front",
    "2.0.1.10.in-addr.arpa",
    "example.com",
    "WeB.FrOnT",
    "nope.front",
    "tasks.nope",
]
TYPES = ["A", "AAAA", "SRV", "PTR", "TXT", "ANY", "MX", "CNAME"]
FUZZ = settings(
    max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def make_responder() -> Responder:
    store = Store("n1", Ipam(parse_pool("10.0.0.0/8")), random.Random(1))
    responder = Responder(NameTable("mesh"), rng=random.Random(2))
    changes = [
        *store.ensure_ingress(),
        *store.create_network(NetworkSpec(name="front", subnet="10.1.0.0/24"), 0),
        *store.create_service(
            ServiceSpec(
                name="web",
                networks=("front",),
                ports=(PortSpec(target_port=80, published_port=8080),),
            ),
            0,
        ),
        *store.create_service(
            ServiceSpec(name="db", networks=("front",), endpoint_mode="dnsrr"), 0
        ),
    ]
    for i in range(3):
        changes += store.add_task(
            TaskSpec(service="web", address=f"10.1.0.{10 + i}", ports={80: 31000 + i}), 0
        )
        changes += store.add_task(TaskSpec(service="db", address=f"10.1.0.{20 + i}"), 0)
    for change in changes:
        responder.on_change(change)
    return responder


RESPONDER = make_responder()


def check(data: bytes, source: str = "127.0.0.1", tcp: bool = False) -> None:
    reply = RESPONDER.respond(data, source, tcp)
    if reply is None or reply is FORWARD:
        return
    assert isinstance(reply, bytes)
    parsed = DNSRecord.parse(reply)
    assert reply[:2] == data[:2]
    assert parsed.header.qr == 1
    if not tcp:
        assert len(reply) <= 1232


def query_bytes(name: str, qtype: str, edns: bool, query_id: int = 7) -> bytes:
    # Built with a given ID: DNSRecord.question draws one from the global random.
    query = DNSRecord(DNSHeader(id=query_id, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        query.add_ar(EDNS0(udp_len=4096))
    return bytes(query.pack())


queries = st.builds(
    query_bytes,
    st.sampled_from(NAMES),
    st.sampled_from(TYPES),
    st.booleans(),
    st.integers(0, 0xFFFF),
)


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes(data: bytes, tcp: bool) -> None:
    check(data, tcp=tcp)


@FUZZ
@given(
    queries,
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    st.sampled_from(["127.0.0.1", "10.1.0.99", "192.0.2.1"]),
)
def test_mutated_queries(data: bytes, flips: list[tuple[int, int]], source: str) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    check(bytes(mutated), source)


@FUZZ
@given(queries, st.integers(0, 80), st.binary(max_size=40))
def test_cut_and_extended_queries(data: bytes, cut: int, tail: bytes) -> None:
    check(data[: max(0, len(data) - cut)])
    check(data + tail)


@FUZZ
@given(
    queries,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)
def test_hostile_headers(data: bytes, flags: int, qd: int, an: int, ns: int, ar: int) -> None:
    header = data[:2] + b"".join(v.to_bytes(2, "big") for v in (flags, qd, an, ns, ar))
    check(header + data[12:])


def test_compression_pointer_loops_and_absurd_counts() -> None:
    base = query_bytes("web", "A", False)
    header = base[:4] + (1).to_bytes(2, "big") + b"\x00" * 6
    for body in (
        b"\xc0\x0c\x00\x01\x00\x01",
        b"\xc0\x0e\xc0\x0c\x00\x01\x00\x01",
        b"\x3f" + b"a" * 63 + b"\xc0\x0c",
        b"\xff" * 40,
    ):
        check(header + body)
    check(base[:4] + b"\xff\xff" * 4 + base[12:])


FORWARDER = Forwarder([])  # no upstreams: SERVFAIL at once, no I/O


def forwarded(data: bytes) -> bytes:
    return asyncio.run(
        forward_or_refuse(RESPONDER, lambda d, tcp: FORWARDER.forward(d, tcp=tcp), data, False)
    )


def check_all_paths(data: bytes) -> None:
    """The responder, the canonical key, and what the server does with a FORWARD."""
    check(data)
    canonical = canonical_query(data)
    if canonical is not None:
        key, end = canonical
        assert 12 < end <= len(data) and len(key) >= end - 2
    if RESPONDER.respond(data, "127.0.0.1") is FORWARD:
        with contextlib.suppress(MalformedQuery):  # the server answers FORMERR: checked below
            parse_query(data)
        reply = forwarded(data)
        assert reply[:2] == data[:2] and DNSRecord.parse(reply).header.qr == 1


@FUZZ
@given(
    queries,
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    st.binary(max_size=300),
)
def test_mutated_and_padded_queries_on_every_path(
    data: bytes, flips: list[tuple[int, int]], tail: bytes
) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    check_all_paths(bytes(mutated) + tail)


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=70), min_size=1, max_size=8),
    st.sampled_from([b"", b"\xc0\x0c", b"\xc0\x02", b"\x40", b"\x80\x01", b"\xff\xff"]),
    st.binary(max_size=40),
)
def test_hostile_names_on_every_path(labels: list[bytes], ending: bytes, tail: bytes) -> None:
    """Labels of any octets and length (over 63 too), odd endings, pointers, garbage after."""
    name = b"".join(len(label).to_bytes(1, "big") + label for label in labels)
    data = (
        b"\x42\x42\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + name
        + (ending or b"\x00")
        + b"\x00\x01\x00\x01"
        + tail
    )
    check_all_paths(data)


@FUZZ
@given(queries, st.binary(min_size=1, max_size=300), st.booleans())
def test_padding_and_case_never_change_the_key(data: bytes, tail: bytes, upper: bool) -> None:
    canonical = canonical_query(data)
    assert canonical is not None
    varied = bytearray(data + tail)
    if upper:
        end = canonical[1]
        varied[12:end] = bytes(varied[12:end]).upper()
    assert canonical_query(bytes(varied)) == canonical


def test_overlong_names_never_reach_the_forwarder() -> None:
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
    for name in (long_name, b"\x40" + b"a" * 64 + b"\x00"):
        data = b"\x42\x42\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
        reply = RESPONDER.respond(data, "127.0.0.1")
        assert isinstance(reply, bytes) and DNSRecord.parse(reply).header.rcode == 1  # FORMERR
