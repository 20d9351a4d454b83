"""Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table builder, sans-IO.

A flow's hash, modulo the table size M (a prime), indexes a table of M entries,
each naming a real server. Every real has its own permutation of the M slots
(`offset + j * skip mod M`, from two hashes of its name); the table is filled by
letting the reals take, in turn, the next free slot of their permutation. Each
real ends up with M/N slots (±1), and removing or adding one real moves little
more than that real's own share: about 1/N of the flows, not all of them, as
`hash mod N` would.

The same builder feeds the nftables backend (the table becomes a map indexed by
`jhash ... mod M`) and the userspace proxy (indexed by its own hash of the
flow); IPVS has its own (`mh`). Pure and deterministic: the permutation hashes
are BLAKE2b of the real's `address:port`, so every node builds the same table.

Table size: the paper wants M ≥ 100·N for a spread within ~1 %; the disruption
(flows moved beyond the removed real's own 1/N) shrinks as M/N grows: with 10
reals, removing one moves 12.6 % of the table at M = 1,021, 11.2 % at 4,093,
10.6 % at 16,381 (1/N = 10 %). `table_size` picks the smallest prime of a fixed
ladder that is at least 1,000·N, and `LADDER[-1]` (65,537, Katran's default)
past 65 reals (still ≥ 100·N up to 655); a caller that keeps a table keeps its
size while it is still big enough (`table_size(n, current)`), since a new size
remaps nearly every flow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from lb.table import Real

#: Primes the table size is chosen from (each about 4 times the one before).
LADDER: tuple[int, ...] = (251, 1021, 4093, 16381, 65537)
#: Table entries per real wanted (the paper's minimum is 100; more moves fewer flows).
SLOTS_PER_REAL = 1000


def table_size(reals: int, current: int | None = None) -> int:
    """The table size for `reals` reals; `current` is kept while it is big enough."""
    need = SLOTS_PER_REAL * max(reals, 1)
    if current is not None and current >= need and current in LADDER:
        return current
    for prime in LADDER:
        if prime >= need:
            return prime
    return LADDER[-1]


def _hash(data: bytes, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "big")


def permutation_start(real: Real, size: int) -> tuple[int, int]:
    """A real's (offset, skip) in a table of `size` slots."""
    name = f"{real.address}:{real.port}".encode()
    offset = _hash(name, b"maglev-offset") % size
    skip = _hash(name, b"maglev-skip") % (size - 1) + 1
    return offset, skip


def build(reals: Iterable[Real], size: int) -> list[Real]:
    """The lookup table: `size` entries, each a real (empty list when there is no real).

    The reals are taken in sorted order, so the table depends on the set only.
    """
    ordered: Sequence[Real] = sorted(set(reals))
    if not ordered:
        return []
    if size < len(ordered):
        raise ValueError(f"maglev table of {size} slots for {len(ordered)} reals")
    starts = [permutation_start(real, size) for real in ordered]
    nexts = [0] * len(ordered)
    table: list[Real | None] = [None] * size
    filled = 0
    while True:
        for index, real in enumerate(ordered):
            offset, skip = starts[index]
            j = nexts[index]
            slot = (offset + j * skip) % size
            while table[slot] is not None:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = real
            nexts[index] = j + 1
            filled += 1
            if filled == size:
                return [real for real in table if real is not None]


def flow_hash(address: str, port: int) -> int:
    """The userspace proxy's hash of a flow's source (address and port)."""
    return _hash(f"{address}:{port}".encode(), b"maglev-flow")
