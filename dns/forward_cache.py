"""The forwarder's cache: upstream answers kept for their TTL, negative ones per RFC 2308 (sans-IO).

`cache_ttl` says for how long a reply may be kept; `ForwardCache` keeps
them, bounded by entries and bytes, least recently used out first, and
answers a hit in the asker's ID, case and EDNS with every TTL aged. It reads
time only through an injected clock, so a burst of identical lookups costs
one upstream query and the tests need no sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from dnslib import EDNS0, QTYPE, DNSRecord

from dns.relay import CacheKey, Query, full_rcode, parse_message
from dns.wire import EDNS_PAYLOAD, NOERROR, NXDOMAIN

#: Caps on how long an answer is kept, whatever its TTL says (unbound's
#: cache-max-ttl; RFC 2308 §5 asks for a cap on negative caching).
MAX_TTL: Final = 86_400
MAX_NEGATIVE_TTL: Final = 300
#: The cache's memory bound besides its entry count (a TCP answer may be 64 KiB).
CACHE_BYTES: Final = 16 * 1024 * 1024


def _soa(record: Any) -> Any | None:
    for rr in record.auth:
        if rr.rtype == QTYPE.SOA:
            return rr
    return None


def cache_ttl(
    record: Any, *, max_ttl: int = MAX_TTL, max_negative_ttl: int = MAX_NEGATIVE_TTL
) -> int | None:
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
    rcode = full_rcode(record)
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
    packed = bytes(record.pack())  # dnslib packs a bytearray; replies are bytes
    return packed


class ForwardCache:
    """Upstream answers by (name, type, class, DO, CD), kept for their TTL, in LRU order.

    Keys ignore the name's case; hits answer in the asker's case (`_rewrite`).
    It is bounded by entries and by bytes: beyond either, the least recently
    used entry goes. Expired entries go when they are looked up or evicted.
    It reads time only through `clock` (monotonic seconds).
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = CACHE_BYTES,
        max_ttl: int = MAX_TTL,
        max_negative_ttl: int = MAX_NEGATIVE_TTL,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        #: entries pushed out by the bounds (not the expired ones)
        self.evicted = 0

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
        record = parse_message(reply)
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
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_bytes
        ):
            _, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry.wire)
            self.evicted += 1
