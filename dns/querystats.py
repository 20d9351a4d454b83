"""Queries answered by query type, rcode and scope, and the answer-latency histogram.

Sans-IO, and shaped for the hot path: every count is a plain int in a list
indexed by a small int, the *slot* `type_index * 16 + rcode`, so counting a
query is one list increment: no lock, no syscall, no string built per query.

- The reply cache's rotations carry each reply's slot beside its bytes
  (`(reply, slot)`, made once when the reply is built), so the UDP fast path
  counts a cache hit without looking at the query: `hits[scope][slot] += 1`.
- Every other answer (the responder's slow path, forwarded queries, TCP,
  errors) is classified from the query's question and the reply's header
  (`answered`): a few byte reads, next to a parse or an upstream round trip.

The labels are closed sets: `TYPES` (the common query types, the rest is
`other`), the 16 header rcodes, and `SCOPES` (`node`: the agent's own
listener; `sandbox`: a sandbox's 127.0.0.11). No name or address is kept.

Latency: the time from taking a query to sending its reply, in
`LATENCY_BOUNDS` buckets. The answers not from the UDP fast path are timed
(two reads of `perf_counter`, beside a parse or an upstream round trip that
costs a hundred times more). The fast path's cache hits are not timed: a hit
is answered synchronously (a dict lookup and a `sendto`, a few microseconds),
so each is counted in the first bucket (<= 100 us) and adds nothing to the
sum; timing them would cost two clock reads on the path the throughput
goal is about. The same goes for a query the responder finds in the cache
only once brought to canonical form (EDNS cookies, say): the reply's slot
comes back with it (`Responder.hit_slot`), and it is counted untimed in the
first bucket too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Final

from dns.question import question_end

#: Query types counted by name; any other is `other` (bounded labels).
TYPES: Final = ("A", "AAAA", "SRV", "PTR", "CNAME", "MX", "TXT", "NS", "SOA", "ANY", "other")
_TYPE_CODES: Final = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16}
_TYPE_CODES_MORE: Final = {"AAAA": 28, "SRV": 33, "ANY": 255}
OTHER_TYPE: Final = TYPES.index("other")
#: qtype number -> its index in TYPES
TYPE_INDEX: Final = {
    code: TYPES.index(name) for name, code in {**_TYPE_CODES, **_TYPE_CODES_MORE}.items()
}

#: The header's 4-bit rcodes (RFC 1035, 2136); 11..15 are unassigned.
RCODES: Final = (
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "RCODE11",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
)
SLOTS: Final = len(TYPES) * 16

SCOPES: Final = ("node", "sandbox")
NODE: Final = 0
SANDBOX: Final = 1

#: Upper bounds of the latency buckets, in seconds: a cache hit is microseconds,
#: a forwarded query an upstream's round trip, and an upstream timeout (2 s by
#: default, one per upstream tried) seconds.
LATENCY_BOUNDS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: prefixes of the flat names (`DnsService.metric_counts`, the workers' reports)
QUERY_PREFIX: Final = "query|"
LATENCY_PREFIX: Final = "latency|"
LATENCY_SUM: Final = "latency|sum"


def slot_of(qtype: int, rcode: int) -> int:
    """The slot of a query of type `qtype` answered with header rcode `rcode`."""
    return TYPE_INDEX.get(qtype, OTHER_TYPE) * 16 + (rcode & 0xF)


def query_type(query: bytes) -> int | None:
    """The QTYPE of a plain question (uncompressed name), None if it has none."""
    end = question_end(query)
    if end is None:
        return None
    return (query[end - 4] << 8) | query[end - 3]


class QueryStats:
    """The counts of one DNS server (one process): shared by all of its listeners."""

    def __init__(self) -> None:
        #: scope -> slot -> answers not from the UDP fast path
        self.answers: list[list[int]] = [[0] * SLOTS for _ in SCOPES]
        #: scope -> slot -> answers from the UDP fast path (the reply cache's hits)
        self.hits: list[list[int]] = [[0] * SLOTS for _ in SCOPES]
        #: scope -> slot -> UDP answers the responder found in the cache once it had
        #: brought the query to canonical form (untimed, as the fast path's)
        self.cached: list[list[int]] = [[0] * SLOTS for _ in SCOPES]
        #: timed answers per bucket of LATENCY_BOUNDS (the last one: above them all)
        self.latency: list[int] = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
        #: replies of the UDP fast path dropped because the socket's send buffer was
        #: full (one element, incremented in place by `dns.fastpath`)
        self.unsent: list[int] = [0]

    def answered(self, scope: int, query: bytes, reply: bytes, seconds: float) -> None:
        """A reply sent (not from the fast path) `seconds` after its query came."""
        qtype = query_type(query)
        rcode = reply[3] & 0xF if len(reply) >= 4 else 0
        self.answers[scope][slot_of(-1 if qtype is None else qtype, rcode)] += 1
        self.latency[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    def fast_hits(self) -> int:
        return sum(sum(by_slot) for by_slot in self.hits)

    def flat(self) -> dict[str, int | float]:
        """The counts as flat `name -> number` (summable across workers by name)."""
        out: dict[str, int | float] = {}
        for scope, name in enumerate(SCOPES):
            answers, hits, cached = self.answers[scope], self.hits[scope], self.cached[scope]
            for slot in range(SLOTS):
                count = answers[slot] + hits[slot] + cached[slot]
                if count:
                    out[f"{QUERY_PREFIX}{TYPES[slot // 16]}|{RCODES[slot % 16]}|{name}"] = count
        buckets = list(self.latency)
        # synchronous: within the first bound (see above)
        buckets[0] += self.fast_hits() + sum(sum(by_slot) for by_slot in self.cached)
        for index, count in enumerate(buckets):
            out[f"{LATENCY_PREFIX}{index}"] = count
        out[LATENCY_SUM] = self.latency_sum
        return out


def queries_of(flat: Mapping[str, int | float]) -> Iterator[tuple[tuple[str, str, str], int]]:
    """((type, rcode, scope), count) from flat names (`QueryStats.flat`, summed)."""
    for name, value in flat.items():
        if name.startswith(QUERY_PREFIX):
            labels = name[len(QUERY_PREFIX) :].split("|")
            if len(labels) == 3:
                yield (labels[0], labels[1], labels[2]), int(value)


def latency_of(flat: Mapping[str, int | float]) -> tuple[list[int], float]:
    """(The count per bucket, not cumulative; the sum) from flat names."""
    buckets = [int(flat.get(f"{LATENCY_PREFIX}{i}", 0)) for i in range(len(LATENCY_BOUNDS) + 1)]
    return buckets, float(flat.get(LATENCY_SUM, 0.0))
