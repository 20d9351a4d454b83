"""Forwarding of the names the mesh does not own to the host's upstream resolvers.

Theory of operation. The responder answers the mesh's own names from its views
and hands every other query, as the client's wire bytes, to
`Forwarder.forward`, which returns the wire reply for that client: the
client's ID and question, always a well-formed DNS message. The semantics are
moby's current embedded resolver (reference/swarm-behavior.md §1.5), plus a
small cache:

- upstreams are tried in order (at most three, as glibc and Swarm's
  `maxExtDNS`), each with its own `timeout`; SERVFAIL or REFUSED from one, a
  timeout, a network error or a malformed reply moves on to the next; any
  other answer, NXDOMAIN included, goes back to the client as it came;
- the query is relayed as the client sent it (flags, EDNS, case), under a
  fresh random ID; a reply counts only when its ID and its question match, so
  stray and forged datagrams are ignored, not believed;
- UDP first, then TCP on the same upstream when the UDP reply is truncated
  (TC), so the client gets the full answer; a client that came over TCP is
  forwarded over TCP directly. A reply larger than the client's UDP limit is
  the responder's to truncate, as it does for local answers;
- when every upstream fails the client gets SERVFAIL (moby; libnetwork sent
  nothing and let the client time out), and with none configured at once;
- at most `max_in_flight` queries wait on upstreams (moby's 1024); beyond
  that the answer is REFUSED at once, so a dead upstream cannot pile up
  unbounded sockets and tasks;
- answers are cached for their TTL (`ForwardCache`), negative ones per
  RFC 2308, so a burst of identical lookups costs one upstream query.

The protocol logic is sans-IO and reads no clock of its own: `parse_query`,
`judge_reply` (what a reply means: accept, retry over TCP, try the next
upstream, or ignore it), `cache_ttl`, `error_reply` and `ForwardCache`
(injected clock). `Forwarder` is the thin asyncio shell that moves bytes.

Each UDP attempt uses its own connected datagram socket rather than one
shared socket with an ID map. A connected socket gets a fresh ephemeral source
port per query (with the random ID, ~32 bits a forger must guess instead of
16, the defence against Kaminsky-style poisoning), the kernel drops datagrams
from any other address, an ICMP port-unreachable surfaces as an error so a
stopped upstream fails over at once instead of after `timeout`, and there is
no demultiplexing table to leak or to collide in. The cost, one socket per
forwarded query, is bounded by `max_in_flight`; this path is not the hot one.

Forwarding is not a hot path (the mesh's own names are), so messages are
parsed and built with dnslib here, and the shell spawns one task per
forwarded query: no lock is shared between queries, so a dead upstream only
ever delays the queries that wait on it.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dnslib import EDNS0, QTYPE, DNSHeader, DNSRecord

from dns.wire import (  # re-exported: the forwarder's callers and tests name them here
    EDNS_PAYLOAD,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
)
from mesh.core import net

#: glibc's MAXNS and Swarm's maxExtDNS: further nameservers are ignored.
MAX_UPSTREAMS: Final = 3
DNS_PORT: Final = 53
#: Caps on how long an answer is kept, whatever its TTL says (unbound's
#: cache-max-ttl; RFC 2308 §5 asks for a cap on negative caching).
MAX_TTL: Final = 86_400
MAX_NEGATIVE_TTL: Final = 300
#: The cache's memory bound besides its entry count (a TCP answer may be 64 KiB).
CACHE_BYTES: Final = 16 * 1024 * 1024

_OPCODE_QUERY: Final = 0
_HEADER_LEN: Final = 12
#: A name of 255 octets on the wire is 253 in dnslib's length (dots, no end).
_MAX_NAME_TEXT: Final = 253
#: dnslib reads the reserved label types (length octets 64..191) as long labels.
_MAX_LABEL: Final = 63

#: (lower-cased qname labels, qtype, qclass, DO bit, CD bit)
CacheKey = tuple[tuple[bytes, ...], int, int, bool, bool]

#: Every counter `Forwarder.stats` reports, so that metrics have stable names.
STAT_NAMES: Final = (
    "queries",                # queries handed to forward() that parsed
    "answered_from_cache",
    "forwarded",              # cache misses sent upstream
    "answered_upstream",      # an upstream's reply went back to the client
    "answered_truncated",     # ... a truncated one, its TCP retry having failed
    "servfail",               # SERVFAIL we made up: every upstream failed, or none
    "refused_over_cap",       # REFUSED: max_in_flight queries were already waiting
    "notimp",                 # not a standard query (opcode), NOTIMP
    "truncated_retried_tcp",
    "upstream_timeouts",      # attempts, not queries
    "upstream_errors",        # network errors and unusable replies
    "upstream_servfail",
    "upstream_refused",
    "malformed_replies",      # unparsable replies (also counted in upstream_errors)
    "ignored_replies",        # wrong ID or question: stray or forged
)


class MalformedQuery(ValueError):
    """The client's message is not a query we can forward (the caller answers FORMERR or drops)."""


# --------------------------------------------------------------------------- upstreams


def _canonical_ip(text: str) -> str:
    """The canonical text of an IP literal (an IPv6 zone id kept); ValueError if it is not one."""
    return str(ipaddress.ip_address(text))


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream resolver: an IP literal (never a name, which would need DNS) and a port."""

    host: str
    port: int = DNS_PORT

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _canonical_ip(self.host))
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """Parse a `--dns-upstream` value: `ADDR`, `ADDR:PORT`, `[V6ADDR]` or `[V6ADDR]:PORT`.

    A bare IPv6 address (several colons, no brackets) is taken with port 53.
    Raises ValueError on anything else, names included.
    """
    host, port, bracketed = net.split_host_port(text, "upstream")  # AddressError: ValueError
    if bracketed and ":" not in host:
        raise ValueError(f"bad upstream {text.strip()!r}: expected [IPv6]:PORT")
    if not bracketed and port is not None and not isinstance(ipaddress.ip_address(host),
                                                             ipaddress.IPv4Address):
        raise ValueError(f"bad upstream {text.strip()!r}")
    return Upstream(host, DNS_PORT if port is None else net.parse_port(port, "upstream port"))


def _exclusion(text: str) -> str | None:
    """An `exclude` entry as a canonical address: `ADDR` or any `parse_upstream` form."""
    try:
        return parse_upstream(text).host
    except ValueError:
        return None


def _nameserver(line: str) -> str | None:
    """The canonical address of a `nameserver` line, or None for any other or unusable line.

    As glibc and musl, the keyword must start the line; whatever follows the
    address (a comment, say) is ignored, and so is a line whose address does
    not parse (a name, a truncated address).
    """
    fields = line.split()
    if len(fields) < 2 or fields[0] != "nameserver" or not line.startswith("nameserver"):
        return None
    address = fields[1].split("#", 1)[0].split(";", 1)[0]
    try:
        return _canonical_ip(address)
    except ValueError:
        return None


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf",
                               exclude: Collection[str] = ()) -> list[Upstream]:
    """The host's resolvers, in order: the `nameserver` lines of `path`, port 53.

    Addresses in `exclude` are skipped (compared as addresses, any port
    ignored: resolv.conf servers are on 53) — the agent passes its own DNS
    address and 127.0.0.11, so that it never forwards to itself. Excluded and
    duplicate entries do not use up one of the at most `MAX_UPSTREAMS` slots.
    A missing file gives no upstreams (the caller decides on a fallback);
    other read errors propagate.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    skip = {host for host in map(_exclusion, exclude) if host is not None}
    found: list[Upstream] = []
    for line in text.splitlines():
        host = _nameserver(line)
        if host is None or host in skip:
            continue
        skip.add(host)
        found.append(Upstream(host))
        if len(found) == MAX_UPSTREAMS:
            break
    return found


# --------------------------------------------------------------------------- messages


def _parse(wire: bytes) -> Any | None:
    """A dnslib DNSRecord, or None when the bytes are not a DNS message.

    dnslib reports most damage as DNSError, but some malformed rdata surfaces
    as other exceptions (struct, unicode, index errors): all mean "not DNS".
    dnslib also refuses labels that are not UTF-8, which DNS allows (any
    octet): such names are rare, and are treated as malformed here too.
    """
    try:
        return DNSRecord.parse(wire)
    except Exception:
        return None


def _opt(record: Any) -> Any | None:
    for rr in record.ar:
        if rr.rtype == QTYPE.OPT:
            return rr
    return None


def _full_rcode(record: Any) -> int:
    """The 12-bit rcode: the header's 4 bits and EDNS's 8 extension bits (RFC 6891 §6.1.3)."""
    opt = _opt(record)
    high = int(opt.edns_rcode) if opt is not None else 0
    return (high << 4) | int(record.header.rcode)


@dataclass(frozen=True, slots=True)
class Query:
    """A client's query, parsed once: what forwarding, caching and error replies need."""

    wire: bytes
    id: int
    question: Any  # dnslib DNSQuestion, exactly as the client sent it (case included)
    opcode: int
    rd: bool
    cd: bool
    edns: bool
    do: bool
    #: False for non-recursive queries (their answers may be referrals) and for
    #: queries with records beyond OPT (TSIG: the reply is signed per query).
    cacheable: bool

    @property
    def key(self) -> CacheKey:
        labels = tuple(label.lower() for label in self.question.qname.label)
        return (labels, int(self.question.qtype), int(self.question.qclass), self.do, self.cd)


def parse_query(wire: bytes) -> Query:
    """Parse a client's query; raises `MalformedQuery` for anything that is not one.

    Not a query: unparsable bytes, a response (QR set: never answer those, it
    makes loops), a question count other than one (RFC 9619), a name longer
    than 255 octets or a label longer than 63 (RFC 1035 §2.3.4), two OPT
    records (RFC 6891 §6.1.1).
    """
    record = _parse(wire)
    if record is None:
        raise MalformedQuery("not a DNS message")
    header = record.header
    if header.qr:
        raise MalformedQuery("a response, not a query")
    if len(record.questions) != 1:
        raise MalformedQuery(f"{len(record.questions)} questions, expected one")
    if len(record.questions[0].qname) > _MAX_NAME_TEXT:
        raise MalformedQuery("name longer than 255 octets")
    if any(len(label) > _MAX_LABEL for label in record.questions[0].qname.label):
        raise MalformedQuery("label longer than 63 octets")
    opts = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    if len(opts) > 1:
        raise MalformedQuery("more than one OPT record")
    return Query(wire=wire, id=int(header.id), question=record.questions[0],
                 opcode=int(header.opcode), rd=bool(header.rd), cd=bool(header.cd),
                 edns=bool(opts), do=bool(opts and opts[0].edns_do),
                 cacheable=bool(header.rd) and len(record.ar) == len(opts))


def error_reply(query: Query, rcode: int) -> bytes:
    """A reply with `rcode` and no records, built from the query (ID, opcode, RD, CD, question).

    It carries an OPT record when the query did (RFC 6891 §7), and RA, as
    every reply of a recursive service.
    """
    header = DNSHeader(id=query.id, qr=1, opcode=query.opcode, rd=int(query.rd), ra=1,
                       cd=int(query.cd), rcode=rcode)
    record = DNSRecord(header, q=query.question)
    if query.edns:
        record.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    packed: bytes = record.pack()
    return packed


def _question_end(wire: bytes) -> int | None:
    """Where the (single) question of a message ends, or None if it is compressed or cut short."""
    offset = _HEADER_LEN
    while offset < len(wire):
        length = wire[offset]
        if length == 0:
            end = offset + 1 + 4  # the root label, then QTYPE and QCLASS
            return end if end <= len(wire) else None
        if length & 0xC0:  # a pointer or a reserved label type: not a plain name
            return None
        offset += 1 + length
    return None


def _for_client(query: Query, wire: bytes, record: Any) -> bytes:
    """The upstream's reply with the client's ID and the client's question bytes.

    The upstream echoes the question we relayed, usually byte for byte; when
    it changed the case, the client's bytes are spliced back (a name's length
    does not depend on case). Only a question we cannot splice is repacked.
    """
    end = _question_end(query.wire)
    if end is not None and wire[_HEADER_LEN:end].lower() == query.wire[_HEADER_LEN:end].lower():
        return query.wire[:2] + wire[2:_HEADER_LEN] + query.wire[_HEADER_LEN:end] + wire[end:]
    record.header.id = query.id
    record.questions = [query.question]
    packed: bytes = record.pack()
    return packed


# --------------------------------------------------------------------------- what a reply means


class Action(enum.Enum):
    ACCEPT = "accept"        # give it to the client (and cache it if it qualifies)
    RETRY_TCP = "retry_tcp"  # truncated over UDP: ask the same upstream over TCP
    NEXT = "next"            # this upstream failed: try the next one
    IGNORE = "ignore"        # not the reply to our query: keep waiting


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    #: why: "ok", "truncated", "servfail", "refused", "malformed", "mismatch",
    #: and, from the shell, "timeout" and "error".
    reason: str
    #: the reply for the client (ACCEPT and RETRY_TCP, where it is the fallback).
    wire: bytes = b""


IGNORED_MISMATCH: Final = Verdict(Action.IGNORE, "mismatch")
NEXT_MALFORMED: Final = Verdict(Action.NEXT, "malformed")
_REJECTING: Final = {SERVFAIL: "servfail", REFUSED: "refused"}


def _same_question(ours: Any, theirs: Any) -> bool:
    # dnslib compares names case-insensitively, as DNS does (RFC 4343).
    return bool(ours.qname == theirs.qname and ours.qtype == theirs.qtype
                and ours.qclass == theirs.qclass)


def judge_reply(query: Query, sent_id: int, wire: bytes, *, tcp: bool) -> Verdict:
    """What an upstream's reply to `query`, relayed under `sent_id`, means.

    A reply is ours only if its ID and its question match; anything else is
    IGNOREd (over UDP it may be stray or forged, and a forger who gets the ID
    right still has to echo the question). An error without a question (some
    servers answer FORMERR or REFUSED that way) cannot be matched to the
    question, but with the right ID on a connected socket it is this
    upstream's failure: NEXT. SERVFAIL and REFUSED mean NEXT as well; TC over
    UDP means RETRY_TCP; every other reply is the answer.
    """
    if len(wire) >= 2 and int.from_bytes(wire[:2], "big") != sent_id:
        return IGNORED_MISMATCH
    record = _parse(wire)
    if record is None:
        return NEXT_MALFORMED
    if not record.header.qr:
        return IGNORED_MISMATCH
    rcode = _full_rcode(record)
    if not record.questions:
        return Verdict(Action.NEXT, _REJECTING.get(rcode, "malformed"))
    if len(record.questions) != 1 or not _same_question(query.question, record.questions[0]):
        return IGNORED_MISMATCH
    if rcode in _REJECTING:
        return Verdict(Action.NEXT, _REJECTING[rcode])
    try:
        client_wire = _for_client(query, wire, record)
    except Exception:  # dnslib could not repack what it parsed
        return NEXT_MALFORMED
    if record.header.tc and not tcp:
        return Verdict(Action.RETRY_TCP, "truncated", client_wire)
    return Verdict(Action.ACCEPT, "ok", client_wire)


# --------------------------------------------------------------------------- the cache


def _soa(record: Any) -> Any | None:
    for rr in record.auth:
        if rr.rtype == QTYPE.SOA:
            return rr
    return None


def cache_ttl(record: Any, *, max_ttl: int = MAX_TTL,
              max_negative_ttl: int = MAX_NEGATIVE_TTL) -> int | None:
    """For how many seconds a reply may be cached, or None if it may not be.

    Positive (NOERROR with answers): the smallest TTL of the answer section.
    Negative (NXDOMAIN, or NOERROR without answers, i.e. NODATA): the SOA
    record's TTL or its MINIMUM field, whichever is smaller (RFC 2308 §5);
    without an SOA a negative reply is not cached (RFC 2308 §5 again), which
    also leaves referrals out. Never cached: truncated replies, any other
    rcode (SERVFAIL above all), and a TTL of 0 (RFC 1035 §3.2.1: do not cache).
    """
    if record.header.tc:
        return None
    rcode = _full_rcode(record)
    if rcode == NOERROR and record.rr:
        ttl = min(min(int(rr.ttl) for rr in record.rr), max_ttl)
    elif rcode in (NOERROR, NXDOMAIN):
        soa = _soa(record)
        if soa is None:
            return None
        ttl = min(int(soa.ttl), int(soa.rdata.times[4]), max_negative_ttl)
    else:
        return None
    return ttl if ttl > 0 else None


@dataclass(slots=True)
class _Entry:
    wire: bytes
    stored_at: float
    expires_at: float


def _rewrite(wire: bytes, query: Query, age: int) -> bytes:
    """A cached reply made the answer to `query`, `age` seconds after it was stored.

    The client's ID, RD and question (its case), answer owner names that are
    the question echoed in the client's case, every TTL lowered by the age;
    AA cleared (a cache is not the authority). EDNS options were meant for
    the client that caused the entry (cookies, RFC 7873), so the OPT record is
    rebuilt from this query: present only if it had one, with its DO bit.
    """
    record = DNSRecord.parse(wire)
    cached_name = record.questions[0].qname
    record.header.id = query.id
    record.header.aa = 0
    record.header.rd = int(query.rd)
    record.questions = [query.question]
    record.ar = [rr for rr in record.ar if rr.rtype != QTYPE.OPT]
    for rr in (*record.rr, *record.auth, *record.ar):
        rr.ttl = max(0, int(rr.ttl) - age)
        if rr.rname == cached_name:
            rr.rname = query.question.qname
    if query.edns:
        record.add_ar(EDNS0(udp_len=EDNS_PAYLOAD, flags="do" if query.do else ""))
    packed: bytes = record.pack()
    return packed


class ForwardCache:
    """Upstream answers by (name, type, class, DO, CD), kept for their TTL, in LRU order.

    Keys ignore the name's case; hits answer in the asker's case (`_rewrite`).
    It is bounded by entries and by bytes: beyond either, the least recently
    used entry goes. Expired entries go when they are looked up or evicted.
    It reads time only through `clock` (monotonic seconds).
    """

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = CACHE_BYTES, max_ttl: int = MAX_TTL,
                 max_negative_ttl: int = MAX_NEGATIVE_TTL) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The bytes of all entries (the wire replies)."""
        return self._bytes

    def get(self, query: Query) -> bytes | None:
        """The cached answer to `query`, rewritten for it, or None."""
        if not query.cacheable:
            return None
        key = query.key
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        # Whole seconds, rounded down: the TTL a client sees is never longer
        # than what is left, and stays above 0 until the entry expires.
        try:
            return _rewrite(entry.wire, query, int(now - entry.stored_at))
        except Exception:  # dnslib cannot rebuild it: forget it, ask upstream instead
            self._drop(key)
            return None

    def put(self, query: Query, reply: bytes) -> bool:
        """Keep `reply` (an upstream's answer to `query`) if it qualifies; True if it was kept."""
        if not query.cacheable or self.max_entries <= 0 or len(reply) > self.max_bytes:
            return False
        record = _parse(reply)
        if record is None or not record.questions:
            return False
        ttl = cache_ttl(record, max_ttl=self.max_ttl, max_negative_ttl=self.max_negative_ttl)
        if ttl is None:
            return False
        now = self._clock()
        key = query.key
        self._drop(key)
        self._entries[key] = _Entry(reply, now, now + ttl)
        self._bytes += len(reply)
        self._evict()
        return True

    def purge(self) -> int:
        """Drop every expired entry; how many went (for a periodic sweep, if one is wanted)."""
        now = self._clock()
        expired = [key for key, entry in self._entries.items() if now >= entry.expires_at]
        for key in expired:
            self._drop(key)
        return len(expired)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.wire)

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries
                                 or self._bytes > self.max_bytes):
            _, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry.wire)


# --------------------------------------------------------------------------- the asyncio shell


class _UdpExchange(asyncio.DatagramProtocol):
    """One query over one connected UDP socket: resolves `done` with the first verdict that counts.

    Datagrams judged IGNORE (stray, forged) are counted and waited past; an
    ICMP error (port unreachable: nothing listens there) fails the exchange.
    """

    def __init__(self, done: asyncio.Future[Verdict], judge: Callable[[bytes], Verdict],
                 on_ignored: Callable[[], None]) -> None:
        self._done = done
        self._judge = judge
        self._on_ignored = on_ignored

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._done.done():
            return
        verdict = self._judge(data)
        if verdict.action is Action.IGNORE:
            self._on_ignored()
        else:
            self._done.set_result(verdict)

    def error_received(self, exc: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("UDP socket closed"))


class Forwarder:
    """Forwards queries to upstream resolvers, with failover, TCP retry, a cap and a cache.

    `clock` drives the cache only; timeouts use the event loop's clock.
    Worst case, a query waits `timeout` per upstream (plus one more for a TCP
    retry after a truncated reply): keep `timeout` x upstreams under the
    clients' own timeout (glibc: 5 s) so that they see our SERVFAIL.
    """

    def __init__(self, upstreams: Sequence[Upstream], *, timeout: float = 2.0,
                 max_in_flight: int = 1024, cache_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._upstreams = tuple(upstreams)
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._cache = ForwardCache(cache_entries, clock=clock)
        self._counts = dict.fromkeys(STAT_NAMES, 0)
        self._in_flight = 0
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._closed = False

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    @property
    def cache(self) -> ForwardCache:
        return self._cache

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stats(self) -> dict[str, int]:
        """The counters (`STAT_NAMES`), plus the gauges `in_flight` and `cache_entries`."""
        return {**self._counts, "in_flight": self._in_flight, "cache_entries": len(self._cache)}

    async def forward(self, query: bytes, *, tcp: bool = False) -> bytes:
        """The reply to a client's `query` (wire bytes), which came over TCP if `tcp`.

        Raises `MalformedQuery` if `query` is not a query; never raises for
        anything an upstream does. Cache hits, REFUSED over the cap and
        SERVFAIL without upstreams are answered without waiting.
        """
        parsed = parse_query(query)
        self._counts["queries"] += 1
        if parsed.opcode != _OPCODE_QUERY:
            self._counts["notimp"] += 1
            return error_reply(parsed, NOTIMP)
        cached = self._cache.get(parsed)
        if cached is not None:
            self._counts["answered_from_cache"] += 1
            return cached
        if self._closed or not self._upstreams:
            return self._servfail(parsed)
        if self._in_flight >= self._max_in_flight:
            self._counts["refused_over_cap"] += 1
            return error_reply(parsed, REFUSED)
        return await self._forward_miss(parsed, tcp)

    async def close(self) -> None:
        """Stop forwarding: queries waiting on upstreams get SERVFAIL, and so do later misses."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward_miss(self, query: Query, tcp: bool) -> bytes:
        # The upstream work runs in a task of its own so that close() can
        # cancel it without cancelling the caller, who still gets a reply.
        self._in_flight += 1
        self._counts["forwarded"] += 1
        task = asyncio.ensure_future(self._resolve(query, tcp))
        self._tasks.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and self._closed and (caller is None or not caller.cancelling()):
                return self._servfail(query)
            raise
        finally:
            self._in_flight -= 1
            self._tasks.discard(task)

    async def _resolve(self, query: Query, tcp: bool) -> bytes:
        """Try the upstreams in order; the first answer wins, else SERVFAIL."""
        fallback: bytes | None = None
        for upstream in self._upstreams:
            verdict = await self._ask(upstream, query, tcp)
            if verdict.action is Action.ACCEPT:
                self._counts["answered_upstream"] += 1
                self._cache.put(query, verdict.wire)
                return verdict.wire
            if verdict.action is Action.RETRY_TCP and fallback is None:
                fallback = verdict.wire
        if fallback is not None:
            # A truncated answer beats SERVFAIL: the client may get through over TCP itself.
            self._counts["answered_truncated"] += 1
            return fallback
        return self._servfail(query)

    async def _ask(self, upstream: Upstream, query: Query, tcp: bool) -> Verdict:
        """One upstream: UDP, then TCP if truncated (TCP at once for a TCP client).

        The TCP retry gets a fresh `timeout`: the upstream has just shown it
        is alive. If it fails, the truncated reply is returned as a fallback
        (RETRY_TCP) and the caller moves on.
        """
        if tcp:
            return await self._attempt(upstream, query, tcp=True)
        verdict = await self._attempt(upstream, query, tcp=False)
        if verdict.action is not Action.RETRY_TCP:
            return verdict
        self._counts["truncated_retried_tcp"] += 1
        retried = await self._attempt(upstream, query, tcp=True)
        return retried if retried.action is Action.ACCEPT else verdict

    async def _attempt(self, upstream: Upstream, query: Query, *, tcp: bool) -> Verdict:
        """One exchange with one upstream, under a fresh random ID, within `timeout`."""
        sent_id = secrets.randbits(16)
        wire = sent_id.to_bytes(2, "big") + query.wire[2:]
        try:
            async with asyncio.timeout(self._timeout):
                if tcp:
                    reply = await _exchange_tcp(upstream, wire)
                    verdict = judge_reply(query, sent_id, reply, tcp=True)
                else:
                    verdict = await _exchange_udp(
                        upstream, wire, lambda data: judge_reply(query, sent_id, data, tcp=False),
                        self._count_ignored)
        except TimeoutError:
            self._counts["upstream_timeouts"] += 1
            return Verdict(Action.NEXT, "timeout")
        except (OSError, EOFError):  # refused, reset, unreachable, cut short (IncompleteReadError)
            self._counts["upstream_errors"] += 1
            return Verdict(Action.NEXT, "error")
        return self._counted(verdict)

    def _counted(self, verdict: Verdict) -> Verdict:
        """Count a verdict; over TCP a reply that is not ours is this upstream's error."""
        if verdict.action is Action.IGNORE:
            verdict = Verdict(Action.NEXT, "mismatch")
        if verdict.action is Action.NEXT:
            if verdict.reason in ("servfail", "refused"):
                self._counts[f"upstream_{verdict.reason}"] += 1
            else:
                self._counts["upstream_errors"] += 1
                if verdict.reason == "malformed":
                    self._counts["malformed_replies"] += 1
        return verdict

    def _count_ignored(self) -> None:
        self._counts["ignored_replies"] += 1

    def _servfail(self, query: Query) -> bytes:
        self._counts["servfail"] += 1
        return error_reply(query, SERVFAIL)


async def _exchange_udp(upstream: Upstream, wire: bytes, judge: Callable[[bytes], Verdict],
                        on_ignored: Callable[[], None]) -> Verdict:
    """Send `wire` from a fresh connected UDP socket; the first reply `judge` does not ignore.

    The transport reads datagrams of up to 256 KiB (asyncio) or 64 KiB
    (uvloop), so an oversized answer from a server that ignores EDNS is
    received whole rather than cut at 512 bytes (moby asks with 65535 too).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Verdict] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(done, judge, on_ignored), remote_addr=(upstream.host, upstream.port))
    try:
        transport.sendto(wire)
        return await done
    finally:
        transport.close()


async def _exchange_tcp(upstream: Upstream, wire: bytes) -> bytes:
    """Send `wire` over a new TCP connection and read one reply.

    Over TCP every message is preceded by its length as two bytes in network
    order (RFC 1035 §4.2.2). One query per connection: this path only serves
    truncated answers and TCP clients, and a fresh connection needs no
    pipelining bookkeeping (RFC 7766 allows either).
    """
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
