"""The forwarder's sans-IO core: cache, resolv.conf, reply judging. No sockets, a virtual clock."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RR, SOA, A, DNSRecord, EDNSOption
from hypothesis import given
from hypothesis import strategies as st

from dns.forward import Forwarder
from dns.forward_cache import MAX_NEGATIVE_TTL, ForwardCache, cache_ttl
from dns.relay import Action, MalformedQuery, error_reply, judge_reply, parse_query
from dns.upstreams import Upstream, parse_upstream, upstreams_from_resolv_conf
from dns.wire import NOERROR, NXDOMAIN, REFUSED, SERVFAIL

CLIENT_ID = 0x1234
SENT_ID = 0xBEEF


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_query(
    name: str = "example.com",
    qtype: str = "A",
    *,
    qid: int = CLIENT_ID,
    rd: bool = True,
    edns: bool = False,
    do: bool = False,
    cd: bool = False,
    cookie: bool = False,
    qclass: str = "IN",
) -> bytes:
    record = DNSRecord.question(name, qtype, qclass)
    record.header.id = qid
    record.header.rd = int(rd)
    record.header.cd = int(cd)
    if edns or do or cookie:
        opts = [EDNSOption(10, b"clientck")] if cookie else []
        record.add_ar(EDNS0(udp_len=1232, flags="do" if do else "", opts=opts))
    return bytes(record.pack())


def soa_rr(ttl: int = 3600, minimum: int = 60) -> RR:
    return RR(
        "example.com.",
        QTYPE.SOA,
        ttl=ttl,
        rdata=SOA("ns.example.com.", "admin.example.com.", (1, 2, 3, 4, minimum)),
    )


def make_reply(
    query: bytes,
    *,
    qid: int = SENT_ID,
    answers: tuple[tuple[str, int, str], ...] = (("example.com", 60, "192.0.2.1"),),
    rcode: int = NOERROR,
    soa: RR | None = None,
    tc: bool = False,
    aa: bool = True,
    cookie: bool = False,
    extra: tuple[RR, ...] = (),
) -> bytes:
    request = DNSRecord.parse(query)
    reply = request.reply(ra=1, aa=int(aa))
    reply.header.id = qid
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    for name, ttl, address in answers:
        reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    if soa is not None:
        reply.add_auth(soa)
    for rr in extra:
        reply.add_ar(rr)
    opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
    if opt is not None:
        opts = [EDNSOption(10, b"clientckserverck")] if cookie else []
        reply.add_ar(EDNS0(udp_len=4096, flags="do" if opt.edns_do else "", opts=opts))
    return bytes(reply.pack())


def parsed(wire: bytes) -> Any:
    return DNSRecord.parse(wire)


def ttls(wire: bytes) -> list[int]:
    record = parsed(wire)
    return [rr.ttl for rr in (*record.rr, *record.auth)]


# --------------------------------------------------------------------------- resolv.conf


RESOLV_CASES = [
    pytest.param(
        "nameserver 192.0.2.1\nnameserver 192.0.2.2\n",
        (),
        ["192.0.2.1", "192.0.2.2"],
        id="in-order",
    ),
    pytest.param(
        "# generated\n; also a comment\nsearch corp.example\ndomain example\n"
        "options ndots:2 timeout:1\nnameserver 192.0.2.1\nsortlist 10.0.0.0\n",
        (),
        ["192.0.2.1"],
        id="comments-options-search",
    ),
    pytest.param(
        "nameserver 2001:db8::1\nnameserver 192.0.2.1\n",
        (),
        ["2001:db8::1", "192.0.2.1"],
        id="ipv6",
    ),
    pytest.param("nameserver 2001:DB8:0:0::1\n", (), ["2001:db8::1"], id="ipv6-canonical"),
    pytest.param("nameserver fe80::1%eth0\n", (), ["fe80::1%eth0"], id="ipv6-zone"),
    pytest.param(
        "nameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n",
        (),
        ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
        id="at-most-three",
    ),
    pytest.param(
        "nameserver 127.0.0.11\nnameserver 127.0.0.53\nnameserver 192.0.2.1\n",
        ("127.0.0.11", "127.0.0.53"),
        ["192.0.2.1"],
        id="excluded",
    ),
    pytest.param(
        "nameserver 127.0.0.11\nnameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n",
        ("127.0.0.11",),
        ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
        id="excluded-take-no-slot",
    ),
    pytest.param(
        "nameserver ::1\nnameserver 192.0.2.1\n",
        ("0:0::1",),
        ["192.0.2.1"],
        id="excluded-ipv6-any-spelling",
    ),
    pytest.param(
        "nameserver 127.0.0.11\n",
        ("127.0.0.11:5353", "[::1]:53", "not-an-address"),
        [],
        id="excluded-with-port",
    ),
    pytest.param(
        "nameserver\nnameserver dns.example\nnameserver 192.0.2\n"
        "nameserver 192.0.2.300\nnameserver1.1.1.1\n  nameserver 192.0.2.9\n"
        "NAMESERVER 192.0.2.8\nnameserver 192.0.2.1\n",
        (),
        ["192.0.2.1"],
        id="junk",
    ),
    pytest.param(
        "nameserver 192.0.2.1 # primary\nnameserver 192.0.2.2#x\n",
        (),
        ["192.0.2.1", "192.0.2.2"],
        id="trailing-comments",
    ),
    pytest.param(
        "nameserver 192.0.2.1\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n",
        (),
        ["192.0.2.1", "192.0.2.2"],
        id="duplicates",
    ),
    pytest.param("nameserver\t192.0.2.1\r\n", (), ["192.0.2.1"], id="tab-crlf"),
    pytest.param("", (), [], id="empty"),
]


@pytest.mark.parametrize(("text", "exclude", "expected"), RESOLV_CASES)
def test_resolv_conf(
    tmp_path: Path, text: str, exclude: tuple[str, ...], expected: list[str]
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    found = upstreams_from_resolv_conf(str(path), exclude=exclude)
    assert found == [Upstream(host) for host in expected]
    assert all(upstream.port == 53 for upstream in found)


def test_resolv_conf_missing_file_means_no_upstreams(tmp_path: Path) -> None:
    assert upstreams_from_resolv_conf(str(tmp_path / "absent")) == []


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("192.0.2.1", "192.0.2.1", 53),
        ("192.0.2.1:5353", "192.0.2.1", 5353),
        ("  192.0.2.1:53 ", "192.0.2.1", 53),
        ("[2001:db8::1]:5353", "2001:db8::1", 5353),
        ("[2001:db8::1]", "2001:db8::1", 53),
        ("2001:db8::1", "2001:db8::1", 53),
        ("::1", "::1", 53),
        ("[fe80::1%eth0]:53", "fe80::1%eth0", 53),
    ],
)
def test_parse_upstream(text: str, host: str, port: int) -> None:
    upstream = parse_upstream(text)
    assert upstream == Upstream(host, port)
    assert parse_upstream(str(upstream)) == upstream


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dns.example",
        "dns.example:53",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:x",
        "[2001:db8::1",
        "[2001:db8::1]53",
        "[2001:db8::1]:",
        "[192.0.2.1]:53",
        "192.0.2.1:53:53",
        "2001:db8::1:x",
    ],
)
def test_parse_upstream_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError; the message is for people
        parse_upstream(text)


def test_upstream_str() -> None:
    assert str(Upstream("192.0.2.1")) == "192.0.2.1:53"
    assert str(Upstream("2001:db8::1", 5353)) == "[2001:db8::1]:5353"


# --------------------------------------------------------------------------- queries


def test_parse_query_fields() -> None:
    query = parse_query(make_query("Example.COM", "AAAA", do=True, cd=True))
    assert query.id == CLIENT_ID
    assert str(query.question.qname) == "Example.COM."
    assert query.key == ((b"example", b"com"), QTYPE.AAAA, 1, True, True)
    assert (query.edns, query.do, query.cd, query.rd, query.cacheable) == (
        True,
        True,
        True,
        True,
        True,
    )
    plain = parse_query(make_query(rd=False))
    assert (plain.edns, plain.do, plain.cacheable) == (False, False, False)


def test_query_with_tsig_like_extra_records_is_not_cacheable() -> None:
    record = DNSRecord.parse(make_query())
    record.add_ar(RR("key.example.", QTYPE.A, rdata=A("192.0.2.9")))
    assert not parse_query(bytes(record.pack())).cacheable


def malformed_queries() -> list[bytes]:
    two = DNSRecord.parse(make_query())
    two.add_question(two.q)
    none = DNSRecord.parse(make_query())
    none.questions = []
    opts = DNSRecord.parse(make_query(edns=True))
    opts.add_ar(EDNS0(udp_len=512))
    return [
        b"",
        b"\x12",
        b"\x12\x34\x01\x00\x00\x01",
        make_query()[:-3],
        b"\xff" * 40,
        make_reply(make_query()),
        bytes(two.pack()),
        bytes(none.pack()),
        bytes(opts.pack()),
    ]


@pytest.mark.parametrize("wire", malformed_queries())
def test_parse_query_rejects(wire: bytes) -> None:
    with pytest.raises(MalformedQuery):
        parse_query(wire)


@given(st.binary(max_size=300))
def test_parse_query_raises_only_malformed_query(wire: bytes) -> None:
    with contextlib.suppress(MalformedQuery):
        parse_query(wire)


def utf8(label: bytes) -> bool:
    """dnslib takes only UTF-8 labels (DNS allows any octets): others are MalformedQuery here."""
    try:
        label.decode()
    except UnicodeDecodeError:
        return False
    return True


def raw_query(labels: list[bytes], qtype: int, flags: int) -> bytes:
    name = b"".join(len(label).to_bytes(1, "big") + label for label in labels) + b"\x00"
    return (
        CLIENT_ID.to_bytes(2, "big")
        + flags.to_bytes(2, "big")
        + b"\x00\x01"
        + b"\x00" * 6
        + name
        + qtype.to_bytes(2, "big")
        + b"\x00\x01"
    )


@given(
    st.lists(st.binary(min_size=1, max_size=63), max_size=8),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_any_parsed_query_gets_well_formed_error_replies(
    labels: list[bytes], qtype: int, flags: int
) -> None:
    try:
        query = parse_query(raw_query(labels, qtype, flags))
    except MalformedQuery:
        too_long = sum(len(label) + 1 for label in labels) + 1 > 255
        assert flags & 0x8000 or too_long or not all(map(utf8, labels))
        return
    for rcode in (SERVFAIL, REFUSED):
        reply = parsed(error_reply(query, rcode))
        assert (reply.header.id, reply.header.rcode, reply.q.qtype) == (CLIENT_ID, rcode, qtype)
        assert reply.q.qname.label == tuple(labels)


def test_names_longer_than_255_octets_are_malformed() -> None:
    assert parse_query(raw_query([b"a" * 63] * 3 + [b"b" * 61], 1, 0x0100))  # 255 octets
    with pytest.raises(MalformedQuery):
        parse_query(raw_query([b"a" * 63] * 3 + [b"b" * 62], 1, 0x0100))


def test_labels_longer_than_63_octets_are_malformed() -> None:
    """A length octet of 64..191 is a reserved label type; dnslib reads it as a long label."""
    with pytest.raises(MalformedQuery, match="label longer than 63"):
        parse_query(raw_query([b"a" * 64], 1, 0x0100))


@pytest.mark.parametrize("edns", [False, True])
def test_error_reply_is_built_from_the_query(edns: bool) -> None:
    query = parse_query(make_query("MiXeD.example", "MX", edns=edns, cd=True))
    reply = parsed(error_reply(query, SERVFAIL))
    assert reply.header.id == CLIENT_ID
    assert (reply.header.qr, reply.header.rd, reply.header.ra, reply.header.cd) == (1, 1, 1, 1)
    assert reply.header.rcode == SERVFAIL
    assert str(reply.q.qname) == "MiXeD.example."
    assert reply.q.qtype == QTYPE.MX
    assert not reply.rr
    assert [rr.rtype for rr in reply.ar] == ([QTYPE.OPT] if edns else [])


# --------------------------------------------------------------------------- judging replies


def judge(query: bytes, reply: bytes, *, tcp: bool = False) -> Any:
    return judge_reply(parse_query(query), SENT_ID, reply, tcp=tcp)


def test_matching_answer_is_accepted_with_client_id_and_question() -> None:
    query = make_query("Example.Com")
    verdict = judge(query, make_reply(query))
    assert verdict.action is Action.ACCEPT
    assert verdict.wire[:2] == CLIENT_ID.to_bytes(2, "big")
    assert verdict.wire[2:] == make_reply(query)[2:]


def test_upstream_changing_the_case_gets_the_client_question_back() -> None:
    query = make_query("Example.Com")
    reply = make_reply(make_query("example.com"))
    verdict = judge(query, reply)
    assert verdict.action is Action.ACCEPT
    assert str(parsed(verdict.wire).q.qname) == "Example.Com."


@pytest.mark.parametrize(
    "other",
    [
        make_query("other.example"),
        make_query(qtype="AAAA"),
        make_query(qclass="CH"),
    ],
)
def test_reply_to_another_question_is_ignored(other: bytes) -> None:
    assert judge(make_query(), make_reply(other)).action is Action.IGNORE


def test_reply_with_another_id_is_ignored() -> None:
    query = make_query()
    assert judge(query, make_reply(query, qid=SENT_ID + 1)).action is Action.IGNORE


def test_a_query_echoed_back_is_ignored() -> None:
    echo = bytearray(make_query())
    echo[0:2] = SENT_ID.to_bytes(2, "big")
    assert judge(make_query(), bytes(echo)).action is Action.IGNORE


@pytest.mark.parametrize(("rcode", "reason"), [(SERVFAIL, "servfail"), (REFUSED, "refused")])
def test_servfail_and_refused_move_on(rcode: int, reason: str) -> None:
    query = make_query()
    verdict = judge(query, make_reply(query, rcode=rcode, answers=()))
    assert (verdict.action, verdict.reason) == (Action.NEXT, reason)


@pytest.mark.parametrize("rcode", [NXDOMAIN, 1, 4])  # NXDOMAIN, FORMERR, NOTIMP
def test_other_rcodes_are_answers(rcode: int) -> None:
    query = make_query()
    verdict = judge(query, make_reply(query, rcode=rcode, answers=()))
    assert verdict.action is Action.ACCEPT
    assert parsed(verdict.wire).header.rcode == rcode


def test_error_without_question_moves_on() -> None:
    record = DNSRecord.parse(make_reply(make_query(), rcode=REFUSED, answers=()))
    record.questions = []
    assert judge(make_query(), bytes(record.pack())).action is Action.NEXT
    record.header.rcode = NOERROR
    verdict = judge(make_query(), bytes(record.pack()))
    assert (verdict.action, verdict.reason) == (Action.NEXT, "malformed")


def test_truncated_over_udp_retries_over_tcp() -> None:
    query = make_query()
    reply = make_reply(query, answers=(), tc=True)
    verdict = judge(query, reply)
    assert verdict.action is Action.RETRY_TCP
    assert parsed(verdict.wire).header.id == CLIENT_ID  # the fallback for the client
    assert judge(query, reply, tcp=True).action is Action.ACCEPT


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xbe",
        SENT_ID.to_bytes(2, "big") + b"\x81\x80\x00\x01\x00\x01",
        SENT_ID.to_bytes(2, "big") + b"\xff" * 60,
    ],
)
def test_malformed_replies_move_on(garbage: bytes) -> None:
    verdict = judge(make_query(), garbage)
    assert (verdict.action, verdict.reason) == (Action.NEXT, "malformed")


@given(st.binary(max_size=300))
def test_judge_never_raises(wire: bytes) -> None:
    query = make_query()
    judge(query, SENT_ID.to_bytes(2, "big") + wire)
    judge(query, wire, tcp=True)


# --------------------------------------------------------------------------- what may be cached


def test_cache_ttl_is_the_smallest_answer_ttl() -> None:
    query = make_query()
    reply = make_reply(
        query, answers=(("example.com", 300, "192.0.2.1"), ("example.com", 45, "192.0.2.2"))
    )
    assert cache_ttl(parsed(reply)) == 45


def test_cache_ttl_is_capped() -> None:
    reply = make_reply(make_query(), answers=(("example.com", 10**9, "192.0.2.1"),))
    assert cache_ttl(parsed(reply), max_ttl=3600) == 3600


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "expected"),
    [(3600, 60, 60), (30, 600, 30), (86400, 86400, MAX_NEGATIVE_TTL)],
)
@pytest.mark.parametrize("rcode", [NXDOMAIN, NOERROR])  # NXDOMAIN and NODATA
def test_negative_ttl_from_the_soa(rcode: int, soa_ttl: int, minimum: int, expected: int) -> None:
    reply = make_reply(make_query(), rcode=rcode, answers=(), soa=soa_rr(soa_ttl, minimum))
    assert cache_ttl(parsed(reply)) == expected


def test_not_cached() -> None:
    query = make_query()
    assert cache_ttl(parsed(make_reply(query, rcode=NXDOMAIN, answers=()))) is None  # no SOA
    assert cache_ttl(parsed(make_reply(query, answers=()))) is None  # referral-like
    assert cache_ttl(parsed(make_reply(query, rcode=SERVFAIL, soa=soa_rr()))) is None
    assert cache_ttl(parsed(make_reply(query, rcode=REFUSED))) is None
    assert cache_ttl(parsed(make_reply(query, tc=True))) is None
    assert cache_ttl(parsed(make_reply(query, answers=(("example.com", 0, "192.0.2.1"),)))) is None


# --------------------------------------------------------------------------- the cache


def test_cache_hit_has_client_id_and_ttls_decrease() -> None:
    clock = Clock()
    cache = ForwardCache(clock=clock)
    stored = make_reply(
        make_query(), answers=(("example.com", 60, "192.0.2.1"), ("example.com", 90, "192.0.2.2"))
    )
    assert cache.put(parse_query(make_query(qid=1)), stored)
    hit = cache.get(parse_query(make_query(qid=77)))
    assert hit is not None
    # bytes, not dnslib's bytearray: the TCP server answered only bytes, and closed the
    # connection on a cached forwarded answer (a CI run's netns test found it)
    assert type(hit) is bytes
    assert parsed(hit).header.id == 77
    assert ttls(hit) == [60, 90]
    clock.now += 10.7
    later = cache.get(parse_query(make_query(qid=78)))
    assert later is not None
    assert parsed(later).header.id == 78
    assert ttls(later) == [50, 80]
    clock.now += 49.29  # 59.99 s in: one second left
    last = cache.get(parse_query(make_query()))
    assert last is not None
    assert ttls(last) == [1, 31]
    clock.now += 0.01
    assert cache.get(parse_query(make_query())) is None
    assert len(cache) == 0


def test_negative_entries_expire_with_the_soa_minimum() -> None:
    clock = Clock()
    cache = ForwardCache(clock=clock)
    query = parse_query(make_query("gone.example.com"))
    reply = make_reply(
        make_query("gone.example.com"), rcode=NXDOMAIN, answers=(), soa=soa_rr(3600, 20)
    )
    assert cache.put(query, reply)
    clock.now += 5
    hit = cache.get(query)
    assert hit is not None
    assert parsed(hit).header.rcode == NXDOMAIN
    assert ttls(hit) == [3595]  # the SOA record's own TTL, aged; the entry lives 20 s
    clock.now += 15
    assert cache.get(query) is None


def test_nodata_is_cached() -> None:
    cache = ForwardCache(clock=Clock())
    query = parse_query(make_query(qtype="AAAA"))
    assert cache.put(query, make_reply(make_query(qtype="AAAA"), answers=(), soa=soa_rr()))
    hit = cache.get(query)
    assert hit is not None
    assert (parsed(hit).header.rcode, parsed(hit).rr) == (NOERROR, [])


def test_uncacheable_replies_are_not_stored() -> None:
    cache = ForwardCache(clock=Clock())
    query = parse_query(make_query())
    assert not cache.put(query, make_reply(make_query(), rcode=SERVFAIL, answers=()))
    assert not cache.put(query, make_reply(make_query(), tc=True))
    assert not cache.put(query, b"\x00\x01junk")
    assert not cache.put(parse_query(make_query(rd=False)), make_reply(make_query()))
    assert len(cache) == 0


def test_key_ignores_case_but_the_hit_echoes_the_client() -> None:
    cache = ForwardCache(clock=Clock())
    stored_query = make_query("WWW.Example.COM")
    reply = make_reply(stored_query, answers=(("WWW.Example.COM", 60, "192.0.2.1"),))
    assert cache.put(parse_query(stored_query), reply)
    client = make_query("www.eXample.com", qid=9)
    hit = cache.get(parse_query(client))
    assert hit is not None
    assert hit[12 : len(client)] == client[12:]  # the question, byte for byte
    answer = parsed(hit)
    assert str(answer.q.qname) == "www.eXample.com."
    assert [str(rr.rname) for rr in answer.rr] == ["www.eXample.com."]


@pytest.mark.parametrize(
    "other",
    [
        make_query(qtype="AAAA"),
        make_query(qclass="CH"),
        make_query(do=True),
        make_query(cd=True),
        make_query("other.example"),
    ],
)
def test_key_includes_type_class_do_and_cd(other: bytes) -> None:
    cache = ForwardCache(clock=Clock())
    assert cache.put(parse_query(make_query()), make_reply(make_query()))
    assert cache.get(parse_query(other)) is None
    assert cache.get(parse_query(make_query())) is not None


def test_hit_rebuilds_edns_for_the_asker_and_clears_aa() -> None:
    cache = ForwardCache(clock=Clock())
    stored = make_query(edns=True, cookie=True)
    assert cache.put(parse_query(stored), make_reply(stored, cookie=True, aa=True))
    plain = cache.get(parse_query(make_query()))
    assert plain is not None
    assert [rr.rtype for rr in parsed(plain).ar] == []  # no OPT to a client that sent none
    assert parsed(plain).header.aa == 0
    with_edns = cache.get(parse_query(make_query(edns=True)))
    assert with_edns is not None
    (opt,) = parsed(with_edns).ar
    assert (opt.rtype, opt.rdata, opt.edns_do) == (QTYPE.OPT, [], 0)  # another's cookie dropped


def test_hit_keeps_do_for_do_askers() -> None:
    cache = ForwardCache(clock=Clock())
    assert cache.put(parse_query(make_query(do=True)), make_reply(make_query(do=True)))
    hit = cache.get(parse_query(make_query(do=True)))
    assert hit is not None
    assert parsed(hit).ar[0].edns_do == 1


def test_hit_follows_the_askers_rd_and_ages_additional_records() -> None:
    clock = Clock()
    cache = ForwardCache(clock=clock)
    glue = RR("ns.example.com.", QTYPE.A, rdata=A("192.0.2.53"), ttl=5)
    assert cache.put(parse_query(make_query()), make_reply(make_query(), extra=(glue,)))
    clock.now += 9
    hit = cache.get(parse_query(make_query()))
    assert hit is not None
    record = parsed(hit)
    assert record.header.rd == 1
    assert [rr.ttl for rr in record.ar] == [0]  # aged below zero: clamped


def test_lru_bound() -> None:
    cache = ForwardCache(2, clock=Clock())
    names = ["a.example", "b.example", "c.example"]
    queries = {name: parse_query(make_query(name)) for name in names}

    def put(name: str) -> None:
        assert cache.put(
            queries[name], make_reply(make_query(name), answers=((name, 60, "192.0.2.1"),))
        )

    put("a.example")
    put("b.example")
    assert cache.get(queries["a.example"]) is not None  # a is now the most recent
    put("c.example")
    assert len(cache) == 2
    assert cache.get(queries["b.example"]) is None
    assert cache.get(queries["a.example"]) is not None
    assert cache.get(queries["c.example"]) is not None


def test_byte_bound_and_replacing_an_entry() -> None:
    reply = make_reply(make_query())
    cache = ForwardCache(100, clock=Clock(), max_bytes=2 * len(reply) + 1)
    for name in ("a.example", "b.example", "c.example"):
        cache.put(
            parse_query(make_query(name)),
            make_reply(make_query(name), answers=((name, 60, "192.0.2.1"),)),
        )
    assert len(cache) == 2
    size = cache.size_bytes
    cache.put(
        parse_query(make_query("c.example")),
        make_reply(make_query("c.example"), answers=(("c.example", 60, "192.0.2.2"),)),
    )
    assert (len(cache), cache.size_bytes) == (2, size)
    assert not cache.put(parse_query(make_query()), reply + b"\x00" * len(reply) * 2)


def test_purge_and_disabled_cache() -> None:
    clock = Clock()
    cache = ForwardCache(clock=clock)
    cache.put(
        parse_query(make_query("a.example")),
        make_reply(make_query("a.example"), answers=(("a.example", 10, "192.0.2.1"),)),
    )
    cache.put(
        parse_query(make_query("b.example")),
        make_reply(make_query("b.example"), answers=(("b.example", 100, "192.0.2.1"),)),
    )
    clock.now += 10
    assert cache.purge() == 1
    assert len(cache) == 1
    off = ForwardCache(0, clock=clock)
    assert not off.put(parse_query(make_query()), make_reply(make_query()))


# --------------------------------------------------------------------------- the shell without I/O


async def test_no_upstreams_is_servfail_at_once() -> None:
    forwarder = Forwarder([])
    reply = parsed(await forwarder.forward(make_query(edns=True)))
    assert (reply.header.id, reply.header.rcode) == (CLIENT_ID, SERVFAIL)
    assert forwarder.stats["servfail"] == 1
    await forwarder.close()


async def test_malformed_query_raises() -> None:
    forwarder = Forwarder([Upstream("192.0.2.1")])
    with pytest.raises(MalformedQuery):
        await forwarder.forward(b"\x00\x01\x02")
    await forwarder.close()


async def test_non_query_opcode_is_notimp() -> None:
    record = DNSRecord.parse(make_query())
    record.header.opcode = 4  # NOTIFY
    forwarder = Forwarder([Upstream("192.0.2.1")])
    reply = parsed(await forwarder.forward(bytes(record.pack())))
    assert reply.header.rcode == 4
    await forwarder.close()


async def test_cache_hit_needs_no_upstream() -> None:
    clock = Clock()
    forwarder = Forwarder([Upstream("192.0.2.1")], clock=clock)
    forwarder.cache.put(parse_query(make_query()), make_reply(make_query()))
    clock.now += 30
    reply = parsed(await asyncio.wait_for(forwarder.forward(make_query(qid=5)), 1))
    assert reply.header.id == 5
    assert [rr.ttl for rr in reply.rr] == [30]
    assert forwarder.stats["answered_from_cache"] == 1
    assert forwarder.stats["forwarded"] == 0
    await forwarder.close()


def test_forwarder_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Forwarder([], timeout=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        Forwarder([], max_in_flight=0)


def test_padded_queries_share_one_forward_cache_entry() -> None:
    """Issue 13, defect 4: bytes after the question are no part of the key (nor of the entry)."""
    cache = ForwardCache(clock=Clock())
    base = make_query(edns=True)
    for i in range(300):
        padded = base + i.to_bytes(4, "big") + b"\xee" * 296
        query = parse_query(padded)
        hit = cache.get(query)
        if hit is None:
            assert cache.put(query, make_reply(base))
        else:
            assert hit[:2] == padded[:2] and len(hit) < len(base) + 100
    assert len(cache) == 1 and cache.size_bytes == len(make_reply(base))
