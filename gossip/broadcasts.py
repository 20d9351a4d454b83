"""Transmit-limited broadcast queue (memberlist queue.go TransmitLimitedQueue).

Membership updates and User payloads are piggybacked on outgoing packets,
infection style (SWIM §4.1). Each queued broadcast goes out at most
`retransmit_limit(mult, n)` times; the least-sent go first (then the larger,
then the newer, as memberlist's btree orders them). A broadcast with the same
key as a queued one replaces it: a newer Alive/Suspect/Dead about a node
invalidates the older one (memberlist NamedBroadcast), and a newer User
message with the same key replaces the queued older one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from gossip.codec import part_size
from gossip.messages import Message

__all__ = ["BroadcastQueue", "RecentDigests"]


@dataclass(slots=True)
class _Entry:
    key: Hashable
    message: Message
    size: int
    transmits: int
    order: int  # higher = newer

    def rank(self) -> tuple[int, int, int]:
        return (self.transmits, -self.size, -self.order)


class BroadcastQueue:
    """Queued broadcasts by key, each with its transmit count."""

    __slots__ = ("_entries", "_order", "dropped", "max_depth")

    def __init__(self, max_depth: int) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._order = 0
        self.max_depth = max_depth
        self.dropped = 0  # pruned for depth, never sent `limit` times

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, key: Hashable, message: Message, size: int) -> None:
        """Queue `message` (`size` = its bytes in a packet), replacing any entry with `key`."""
        self._entries.pop(key, None)
        self._order += 1
        self._entries[key] = _Entry(key, message, size, 0, self._order)
        if len(self._entries) > self.max_depth:
            worst = max(self._entries.values(), key=lambda e: (e.transmits, -e.order))
            del self._entries[worst.key]
            self.dropped += 1

    def take(self, room: int, limit: int, max_items: int) -> list[Message]:
        """Broadcasts fitting in `room` bytes, least-sent first; count each a transmit
        and drop it once sent `limit` times (memberlist GetBroadcasts)."""
        chosen: list[_Entry] = []
        for entry in sorted(self._entries.values(), key=_Entry.rank):
            if len(chosen) >= max_items or room <= 0:
                break
            if entry.size <= room:
                chosen.append(entry)
                room -= entry.size
        for entry in chosen:
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._entries[entry.key]
        return [entry.message for entry in chosen]

    def piggyback(self, messages: list[Message], room: int, limit: int,
                  max_items: int) -> list[Message]:
        """`messages` plus the broadcasts that fit in what `room` they leave
        (`room` and `max_items` count the primary messages too)."""
        room -= sum(part_size(m) for m in messages)
        return messages + self.take(room, limit, max_items - len(messages))

    def messages(self) -> list[Message]:
        """Queued messages in insertion order (a view for tests and debugging)."""
        return [e.message for e in self._entries.values()]

    def __repr__(self) -> str:
        return f"<BroadcastQueue {len(self._entries)} queued, {self.dropped} dropped>"


class RecentDigests:
    """A bounded, insertion-ordered set of payload digests: deliver each User payload once."""

    __slots__ = ("_digests", "max_size")

    def __init__(self, max_size: int) -> None:
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self.max_size = max_size

    @staticmethod
    def digest(payload: bytes) -> bytes:
        return hashlib.blake2b(payload, digest_size=16).digest()

    def add(self, digest: bytes) -> bool:
        """Remember `digest`; False if it was already known (a duplicate)."""
        if digest in self._digests:
            return False
        self._digests[digest] = None
        if len(self._digests) > self.max_size:
            self._digests.popitem(last=False)
        return True
