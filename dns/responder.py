"""The DNS responder: a query's bytes in, a reply's bytes (or FORWARD, or nothing) out.

Sans-IO. Two paths:

- The hot path answers from cached wire bytes. A reply depends only on the
  asker's view, on whether it came over TCP, and on the query's canonical
  form (`dns.question`: RD, the lower-cased question, EDNS presence, DO and
  UDP size; never the bytes after the question, the case or EDNS options),
  so the cache (`dns.cache.ReplyCache`, bounded by entries and bytes, LRU)
  is keyed by `(view, tcp, canonical query)` and holds the reply without its
  ID. A query already in canonical form (most stub queries) is found by its
  raw bytes; any other is brought to that form first, and the reply gets the
  asker's question bytes (its case) spliced back. The server prepends the
  asker's ID. An answer with several peers (tasks of
  a dnsrr service, tasks.X, SRV) is cached as a few rotations served in turn,
  so each query still gets another order (the shuffle of Swarm, for free).
- A miss of a plain A query (no EDNS options, plain labels) is built from
  wire templates (`dns.templates`) without dnslib, byte for byte what the
  slow path would build, and cached the same way.
- The slow path parses with dnslib, resolves through the `NameTable`, builds
  the reply and files it in the cache under its *owners*. A change to the
  state drops exactly the replies filed under the owners it touched, so the
  very next query after a task turns unhealthy is answered anew.

Malformed queries get FORMERR (RFC 1035 §4.1.1), names over 255 octets
included (§2.3.4), unknown opcodes NOTIMP, an EDNS version other than 0
BADVERS (RFC 6891 §6.1.3), and anything without a readable header is
dropped; each is counted, none is logged.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from time import perf_counter
from typing import TypeVar

from dnslib import (
    EDNS0,
    PTR,
    QTYPE,
    RR,
    SOA,
    SRV,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from dns.cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, FORWARD_MARK, Key, ReplyCache
from dns.querystats import QueryStats, slot_of
from dns.question import MAX_LABEL, MAX_NAME_OCTETS, canonical_query, splice_question
from dns.table import ALL, Answer, NameTable, View
from dns.templates import a_record, a_reply, fits, plain_question
from dns.wire import BADVERS, EDNS_PAYLOAD, FORMERR, NOERROR, NOTIMP, NXDOMAIN, UDP_MIN
from mesh.core.model import Change

TCP_MAX = 65535
MAX_ROTATIONS = 8
#: The SOA of a mesh zone (CoreDNS's kubernetes plugin does the same): no
#: secondary ever transfers these zones, so the serial and the timers are
#: fixed; only MINIMUM matters, the negative TTL, which is the DNS TTL.
SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 1, 7200, 1800, 86400
CLASS_IN, CLASS_ANY = 1, 255
DEFAULT_CACHE_ENTRIES = DEFAULT_MAX_ENTRIES
T = TypeVar("T")


class Action(Enum):
    FORWARD = "forward"  # not a mesh name: the forwarder answers it


FORWARD = Action.FORWARD


@dataclass(frozen=True, slots=True)
class DnsConfig:
    ttl: int = 5  # seconds; Swarm's fixed 600 s kept stale answers alive for ten minutes
    domain: str | None = None
    cache_entries: int = DEFAULT_CACHE_ENTRIES
    cache_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.ttl <= 86_400:
            raise ValueError("the DNS TTL must be between 0 and 86400 seconds")


class Responder:
    def __init__(
        self,
        table: NameTable,
        config: DnsConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = perf_counter,
    ) -> None:
        self.table = table
        self._clock = clock
        self.config = config or DnsConfig()
        self._rng = rng or random.Random()
        #: (view, tcp, canonical query) -> the replies' rotation, or the FORWARD mark
        self.cache = ReplyCache(self.config.cache_entries, self.config.cache_bytes)
        #: source address -> view; asked on every query, so kept as a dict
        self.views: dict[str, View] = {}
        #: answers by type, rcode and scope, and their latency: counted by the listeners
        self.queries = QueryStats()
        #: the metrics slot of the last reply `respond` took from the cache, -1 if the last
        #: reply was not from the cache: the server counts a hit without reading the query
        self.hit_slot = -1
        #: when the last query not found in the cache began its parse (`clock`), so that
        #: the server times misses without reading the clock for hits
        self.miss_started = 0.0
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "answered",
                "nxdomain",
                "nodata",
                "forwarded",
                "formerr",
                "notimp",
                "badvers",
                "dropped",
                "truncated",
                "invalidated",
                "cache_hits",  # answered from the reply cache (the UDP fast path adds its own)
                "cache_misses",  # neither a reply nor the forward mark in the cache: parsed
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"<Responder cached={len(self.cache)} {self.table!r}>"

    # -- state changes ----------------------------------------------------------

    def on_change(self, change: Change) -> None:
        self.invalidate(self.table.apply(change))

    def invalidate(self, owners: set[str]) -> None:
        if ALL in owners:
            self.stats["invalidated"] += self.cache.clear()
            self.views.clear()
            return
        self.stats["invalidated"] += self.cache.invalidate(owners)

    def cache_stats(self) -> dict[str, int]:
        """Gauges of the reply cache: entries, bytes (as bounded), evictions so far."""
        return {
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.size_bytes,
            "cache_evicted": self.cache.evicted,
        }

    # -- answering --------------------------------------------------------------

    def view_of(self, source: str) -> View:
        view = self.views.get(source)
        if view is None:
            if len(self.views) > 65_536:
                self.views.clear()
            view = self.views[source] = self.table.view_of(source)
        return view

    def respond(
        self, data: bytes, source: str, tcp: bool = False, view: View | None = None
    ) -> bytes | Action | None:
        """A reply, FORWARD, or None to drop the packet.

        `view`: a listener's fixed view (a sandbox's networks); None: the
        asker's, found by its source address.
        """
        if view is None:
            view = self.view_of(source)
        entry = self.cache.get((view, tcp, data[2:]))  # the hot path (the UDP server inlines it)
        if entry is FORWARD_MARK:
            self.stats["forwarded"] += 1
            return FORWARD
        if entry is not None:
            self.stats["cache_hits"] += 1
            cached, self.hit_slot = next(entry)
            return data[:2] + cached
        canonical = canonical_query(data)
        key = None if canonical is None else (view, tcp, canonical[0])
        if key is not None and canonical is not None:
            entry = self.cache.get(key)
            if entry is FORWARD_MARK:
                self.stats["forwarded"] += 1
                return FORWARD
            if entry is not None:
                self.stats["cache_hits"] += 1
                cached, self.hit_slot = next(entry)
                return splice_question(cached, data, canonical[1])
        self.stats["cache_misses"] += 1
        self.hit_slot = -1
        self.miss_started = self._clock()
        if key is not None and canonical is not None:
            templated = self._from_template(data, canonical, view, key, tcp)
            if templated is not None:
                return templated
        problem = _check_header(data)
        if problem != PARSE:
            return self._refuse(data, problem)
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises many kinds on hostile input: all mean FORMERR
            return self._refuse(data, FORMERR)
        if len(query.questions) != 1 or not plain_name(query.q.qname):
            return self._refuse(data, FORMERR)
        opts = [r for r in query.ar if r.rtype == QTYPE.OPT]
        if len(opts) > 1:  # RFC 6891 §6.1.1
            return self._refuse(data, FORMERR)
        if opts and opts[0].edns_ver != 0:
            self.stats["badvers"] += 1
            return badvers_reply(query)
        if query.q.qclass not in (CLASS_IN, CLASS_ANY):  # CHAOS and friends: not ours
            self.stats["forwarded"] += 1
            return FORWARD
        # A query not in plain form (a compressed question, say) is answered,
        # not cached: its key would need the full parse on every query.
        reply = self._resolve(query, view, key, tcp)
        if isinstance(reply, bytes) and canonical is not None:
            return splice_question(reply, data, canonical[1])
        return reply if isinstance(reply, Action) else data[:2] + reply

    def _from_template(
        self, data: bytes, canonical: tuple[bytes, int], view: View, key: Key, tcp: bool
    ) -> bytes | Action | None:
        """A plain A query answered from wire templates (`dns.templates`), no dnslib.

        None: not one the templates answer (another type, NXDOMAIN or NODATA, EDNS
        options, a reverse name, ...): the caller takes the full path.
        """
        question = plain_question(canonical[0], data, canonical[1], tcp)
        if question is None or reverse_address(question.name) is not None:
            return None
        answer = self.table.lookup(question.name, view)
        if not answer.found and not answer.mesh_space:
            self.cache.put(key, FORWARD_MARK, answer.owners)
            self.stats["forwarded"] += 1
            return FORWARD
        if not answer.addresses or not fits(question, len(answer.addresses)):
            return None  # NODATA, or too long for the asker: the full path (SOA, TC)
        ttl = self.config.ttl
        records = {address: a_record(address, ttl) for address in answer.addresses}
        variants = [
            a_reply(question, [records[address] for address in addresses])
            for addresses in self._rotations(answer.addresses, answer.shuffle)
        ]
        slot = slot_of(QTYPE.A, NOERROR)
        served = itertools.cycle([(variant, slot) for variant in variants])
        self.cache.put(key, served, answer.owners, variants)
        self.stats["answered"] += 1
        return splice_question(next(served)[0], data, canonical[1])

    def _refuse(self, data: bytes, rcode: int | None) -> bytes | None:
        if rcode is None:
            self.stats["dropped"] += 1
            return None
        self.stats["formerr" if rcode == FORMERR else "notimp"] += 1
        return error_reply(data, rcode)

    def _resolve(self, query: DNSRecord, view: View, key: Key | None, tcp: bool) -> bytes | Action:
        """The reply without its ID (its question lower-cased if `key`), or FORWARD.

        With a `key`, the replies (or the FORWARD mark) are cached under it.
        """
        question = query.q
        name = str(question.qname)
        address = reverse_address(name)
        answer = (
            self.table.reverse(address, view)
            if address is not None
            else self.table.lookup(name, view)
        )
        if not answer.found and not answer.mesh_space:
            if key is not None:
                self.cache.put(key, FORWARD_MARK, answer.owners)
            self.stats["forwarded"] += 1
            return FORWARD
        qname = lower_name(question.qname) if key is not None else question.qname
        zone = self.table.zone_of(name, address)
        variants = [
            self._pack(query, qname, answer, records, tcp, zone)
            for records in self._orders(answer, question.qtype)
        ]
        # Each variant carries its metrics slot, so the UDP fast path counts a hit
        # by type and rcode with one list increment (dns.querystats).
        slot = slot_of(question.qtype, NOERROR if answer.found else NXDOMAIN)
        served = itertools.cycle([(variant, slot) for variant in variants])
        if key is not None:
            self.cache.put(key, served, answer.owners, variants)
        self.stats["answered" if answer.found else "nxdomain"] += 1
        if answer.found and not answer.addresses and not answer.ptr and not answer.srv:
            self.stats["nodata"] += 1
        return next(served)[0]

    def _orders(self, answer: Answer, qtype: int) -> list[list[RR]]:
        """The answer records in each order to serve in turn."""
        return self._rotations(self._records(answer, qtype), answer.shuffle)

    def _rotations(self, records: list[T], shuffle: bool) -> list[list[T]]:
        """The orders to serve in turn: each rotation, or a few shuffles of a long list."""
        count = len(records)
        if not shuffle or count < 2:
            return [records]
        if count <= MAX_ROTATIONS:
            return [records[i:] + records[:i] for i in range(count)]
        orders = []
        for _ in range(MAX_ROTATIONS):
            shuffled = list(records)
            self._rng.shuffle(shuffled)
            orders.append(shuffled)
        return orders

    def _records(self, answer: Answer, qtype: int) -> list[RR]:
        ttl = self.config.ttl
        if qtype in (QTYPE.A, QTYPE.ANY):
            return [RR("", QTYPE.A, rdata=A(a), ttl=ttl) for a in answer.addresses]
        if qtype == QTYPE.PTR:
            return [RR("", QTYPE.PTR, rdata=PTR(f"{n}."), ttl=ttl) for n in answer.ptr]
        if qtype == QTYPE.SRV:
            return [
                RR("", QTYPE.SRV, rdata=SRV(0, 0, s.port, f"{s.target}."), ttl=ttl)
                for s in answer.srv
            ]
        return []  # a known name asked for a type it has none of: NOERROR, no data

    def soa(self, zone: str) -> RR:
        """The SOA record of a mesh zone (`NameTable.zone_of`), stable for a given zone and TTL."""
        ttl = self.config.ttl
        apex = wire_labels(zone)
        return RR(
            DNSLabel(apex),
            QTYPE.SOA,
            ttl=ttl,
            rdata=SOA(
                DNSLabel((b"ns", b"dns", *apex)),
                DNSLabel((b"hostmaster", *apex)),
                (SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl),
            ),
        )

    def _pack(
        self,
        query: DNSRecord,
        qname: DNSLabel,
        answer: Answer,
        records: list[RR],
        tcp: bool,
        zone: str,
    ) -> bytes:
        header = DNSHeader(
            id=query.header.id,
            qr=1,
            aa=1,
            ra=1,
            rd=query.header.rd,
            opcode=0,
            rcode=NOERROR if answer.found else NXDOMAIN,
        )
        reply = DNSRecord(header, q=DNSQuestion(qname, query.q.qtype, query.q.qclass))
        for record in records:
            record.rname = qname
            reply.add_answer(record)
        if not records:
            # NXDOMAIN or NODATA: the zone's SOA in the authority section, so that
            # resolvers cache the negative answer, for MINIMUM = the TTL (RFC 2308 §3, §5).
            reply.add_auth(self.soa(zone))
        if query.q.qtype == QTYPE.SRV:
            ttl = self.config.ttl
            for target in answer.srv:
                reply.add_ar(RR(f"{target.target}.", QTYPE.A, rdata=A(target.address), ttl=ttl))
        limit = TCP_MAX if tcp else UDP_MIN
        edns = next((r for r in query.ar if r.rtype == QTYPE.OPT), None)
        if edns is not None:
            reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
            limit = TCP_MAX if tcp else max(UDP_MIN, min(edns.rclass, EDNS_PAYLOAD))
        wire = reply.pack()
        if len(wire) > limit:
            self.stats["truncated"] += 1
            wire = truncated(reply, edns is not None)
        return bytes(wire[2:])


PARSE = -1
_ESCAPED = re.compile(r"\\([0-9]{3})")


def plain_name(name: DNSLabel) -> bool:
    """Labels of at most 63 octets, at most 255 on the wire (RFC 1035 §2.3.4).

    dnslib reads a length octet of 64..191 (the extended and reserved label
    types) as a long label, and any number of labels: both are FORMERR here.
    """
    labels = name.label
    return (
        all(len(label) <= MAX_LABEL for label in labels)
        and sum(len(label) + 1 for label in labels) + 1 <= MAX_NAME_OCTETS
    )


def wire_labels(name: str) -> tuple[bytes, ...]:
    """The labels of a name as dnslib spells it (`str(DNSLabel)`: octets other than
    letters, digits and hyphen as \\DDD), as octets.

    dnslib's own `DNSLabel(str)` IDNA-encodes the unescaped text and raises on
    octets such as 0x80, which a zone cut from an asker's name may hold.
    """
    return tuple(
        _ESCAPED.sub(lambda m: chr(int(m[1])), label).encode("latin-1")
        for label in name.rstrip(".").split(".")
        if label
    )


def lower_name(name: DNSLabel) -> DNSLabel:
    return DNSLabel(tuple(label.lower() for label in name.label))


def badvers_reply(query: DNSRecord) -> bytes:
    """BADVERS (16) for an EDNS version we do not speak: the high bits go in our OPT (version 0)."""
    header = DNSHeader(
        id=query.header.id, qr=1, ra=1, rd=query.header.rd, opcode=0, rcode=BADVERS & 0xF
    )
    reply = DNSRecord(header, q=query.q)
    reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD, ext_rcode=BADVERS >> 4, version=0))
    return bytes(reply.pack())


def _check_header(data: bytes) -> int | None:
    """PARSE when the query may be parsed, else the RCODE to refuse it with, or None to drop.

    A packet too short for a header cannot be answered at all; a response
    (QR set) must never be answered, or two servers could ping-pong forever.
    """
    if len(data) < 12:
        return None
    flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHH", data, 2)
    if flags & 0x8000:  # QR: a response, not a query: never answer (no reflection loops)
        return None
    if (flags >> 11) & 0xF != 0:
        return NOTIMP
    if qdcount != 1 or ancount or nscount or arcount > 1:
        return FORMERR
    return PARSE


def error_reply(data: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) with the query's ID, opcode and RD, and `rcode`."""
    flags = struct.unpack_from("!H", data, 2)[0]
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | (rcode & 0xF)  # QR, opcode, RD, RA
    return data[:2] + struct.pack("!HHHHH", reply_flags, 0, 0, 0, 0)


def fit_udp(query: bytes, reply: bytes) -> bytes:
    """A forwarded reply cut to what the asker can take over UDP (TC set, as RFC 1035 §4.2.1).

    The forwarder may hand back more than the asker's limit (an answer it had
    to fetch over TCP, or one from its cache); the asker then retries over TCP.
    """
    if len(reply) <= UDP_MIN:
        return reply
    try:
        asked = DNSRecord.parse(query)
        answer = DNSRecord.parse(reply)
    except Exception:  # not ours to judge: the asker copes with what it gets
        return reply
    edns = next((r for r in asked.ar if r.rtype == QTYPE.OPT), None)
    limit = UDP_MIN if edns is None else max(UDP_MIN, int(edns.rclass))
    if len(reply) <= limit:
        return reply
    return truncated(answer, edns is not None)


def truncated(reply: DNSRecord, edns: bool) -> bytes:
    """The reply with TC set and no records, but its question (and OPT) kept.

    dnslib's own truncate() drops the question too, and a stub such as glibc
    ignores a reply whose question does not match its query instead of
    retrying over TCP.
    """
    header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
    header.tc = 1
    short = DNSRecord(header, questions=list(reply.questions))
    if edns:
        short.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return bytes(short.pack())


def reverse_address(name: str) -> str | None:
    """`4.3.2.1.in-addr.arpa.` -> `1.2.3.4`; None for any other name."""
    labels = name.lower().rstrip(".").split(".")
    if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"]:
        return None
    try:
        return str(ipaddress.IPv4Address(".".join(reversed(labels[:4]))))
    except ValueError:
        return None
