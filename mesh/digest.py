"""A digest of the replicated state, so two nodes can tell cheaply whether their tables agree.

The digest is the XOR of a 128-bit BLAKE2b hash of every live record's
identity and version (kind, key, Lamport clock, writer): independent of order,
equal on two nodes exactly when they hold the same versions of the same
records (up to hash collisions). Tombstones are left out: each node reaps them
on its own schedule, and a tombstone serves nothing.

Every node announces its digest over gossip (a user message) when it changes,
at most every `ANNOUNCE_INTERVAL` seconds, and again every `REFRESH_INTERVAL`
(so a node that restarts learns its peers' soon). Each announcement carries
the time it was made: gossip delivers a payload once, so without it a digest
that came back to an earlier value (a service made, then removed) would not be
delivered again and the peers would keep the one in between. The time also
orders announcements that arrive out of order;
`PeerDigests` keeps the latest announcement per peer with the time it came,
which is what `mesh doctor` compares with the local digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.core.model import Record, version_hash

ANNOUNCE_INTERVAL = 2.0
REFRESH_INTERVAL = 10.0
#: First byte of the gossip user message that carries a digest.
DIGEST_OP = b"d"


@dataclass(frozen=True, slots=True)
class Digest:
    value: str  # 32 hex digits
    records: int  # live records hashed

    def encode(self, node: str, at: float) -> bytes:
        """The announcement; `at` (the sender's wall clock) makes each one a new payload."""
        return (
            DIGEST_OP
            + json.dumps(
                {"node": node, "digest": self.value, "records": self.records, "at": at}
            ).encode()
        )


def digest_of(records: Iterable[Record]) -> Digest:
    """The digest of `records`, hashed from scratch (the store keeps its own up to date:
    `Store.digest_terms`, which this must equal)."""
    acc = 0
    count = 0
    for record in records:
        if record.deleted:
            continue
        acc ^= version_hash(record)
        count += 1
    return Digest(f"{acc:032x}", count)


def digest_from(terms: tuple[int, int]) -> Digest:
    """The digest from an XOR of `version_hash` terms and their count."""
    acc, count = terms
    return Digest(f"{acc:032x}", count)


@dataclass(frozen=True, slots=True)
class PeerDigest:
    node: str
    digest: Digest
    received_at: float  # the receiver's monotonic clock
    sent_at: float  # the sender's wall clock


def decode(payload: bytes) -> tuple[str, Digest, float]:
    """(node, digest, sent at) from an announcement; ValueError on anything malformed."""
    body = json.loads(payload[len(DIGEST_OP) :])
    if not isinstance(body, dict):
        raise ValueError("digest announcement is not an object")
    node, value, records = body.get("node"), body.get("digest"), body.get("records")
    at = body.get("at")
    if not (
        isinstance(node, str)
        and node
        and isinstance(value, str)
        and len(value) == 32
        and isinstance(records, int)
        and not isinstance(records, bool)
        and records >= 0
        and isinstance(at, int | float)
        and not isinstance(at, bool)
    ):
        raise ValueError("malformed digest announcement")
    int(value, 16)
    return node, Digest(value, records), float(at)


class PeerDigests:
    """The latest digest each peer announced (sans-IO: the caller gives the time)."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerDigest] = {}

    def record(self, node: str, digest: Digest, sent_at: float, now: float) -> None:
        """Keep the newest announcement of `node` (an older one arriving late is ignored)."""
        held = self._peers.get(node)
        if held is None or sent_at >= held.sent_at:
            self._peers[node] = PeerDigest(node, digest, now, sent_at)

    def forget(self, node: str) -> None:
        self._peers.pop(node, None)

    def view(self, now: float) -> list[dict[str, object]]:
        return [
            {
                "node": p.node,
                "digest": p.digest.value,
                "records": p.digest.records,
                "age": round(now - p.received_at, 3),
            }
            for p in sorted(self._peers.values(), key=lambda p: p.node)
        ]
