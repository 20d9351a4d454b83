"""The responder's reply cache: bounded by entries and by bytes, least recently used out first.

Keys are `(view, tcp, canonical query)` (`dns.question`), so a client cannot
make entries by padding or re-casing one question. An entry is either the
reply's rotation (an endless iterator over the reply's variants, without
ID, each with its metrics slot: `dns.querystats`) or the FORWARD mark of a
name the mesh does not own. Entries are filed
under their *owners* (the state the answer came from) so that a change drops
exactly the replies it touched.

Memory is bounded two ways: at most `max_entries` entries, and at most
`max_bytes` bytes, counted as the key's and the replies' bytes plus a fixed
estimate of Python's own overhead per entry (`ENTRY_OVERHEAD`), so that the
bound is close to what the process really holds. Beyond either bound, the
least recently used entries go (a hit moves an entry to the back).

Sans-IO, no clock: entries live until evicted or invalidated (the state's
changes, not time, make them stale).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Final


class Mark(Enum):
    FORWARD = "forward"


FORWARD_MARK: Final = Mark.FORWARD

#: (view, tcp, canonical query); a view is a network name or a sandbox's networks (dns.table)
Key = tuple[str | tuple[str, ...], bool, bytes]
#: a rotation yields (reply without ID, its `dns.querystats` slot)
Entry = Iterator[tuple[bytes, int]] | Mark

#: Python's own bytes per entry beyond the key's and the replies' bytes: the
#: key tuple and bytes objects, the iterator and its list, two dict slots and
#: the owner index (measured with tracemalloc: ~800 bytes on CPython 3.11).
ENTRY_OVERHEAD: Final = 800
DEFAULT_MAX_ENTRIES: Final = 100_000
DEFAULT_MAX_BYTES: Final = 8 * 1024 * 1024


class ReplyCache:
    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the DNS cache needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: the entries in LRU order (oldest first); the UDP server reads it directly
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self._sizes: dict[Key, tuple[int, tuple[str, ...]]] = {}  # key -> (bytes, owners)
        self._by_owner: dict[str, set[Key]] = {}
        self.size_bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Key) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(
        self, key: Key, entry: Entry, owners: Iterable[str], replies: Iterable[bytes] = ()
    ) -> None:
        self._drop(key)
        size = ENTRY_OVERHEAD + len(key[2]) + sum(len(reply) for reply in replies)
        owned = tuple(owners)
        self.entries[key] = entry
        self._sizes[key] = (size, owned)
        self.size_bytes += size
        for owner in owned:
            self._by_owner.setdefault(owner, set()).add(key)
        while len(self.entries) > self.max_entries or (
            self.size_bytes > self.max_bytes and len(self.entries) > 1
        ):
            self._drop(next(iter(self.entries)))
            self.evicted += 1

    def invalidate(self, owners: Iterable[str]) -> int:
        """Drop every entry filed under one of `owners`; how many went."""
        dropped = 0
        for owner in owners:
            for key in self._by_owner.pop(owner, set()):
                dropped += self._drop(key)
        return dropped

    def clear(self) -> int:
        """Drop everything (in place: the UDP server holds `entries`); how many went."""
        count = len(self.entries)
        self.entries.clear()
        self._sizes.clear()
        self._by_owner.clear()
        self.size_bytes = 0
        return count

    def _drop(self, key: Key) -> int:
        if self.entries.pop(key, None) is None:
            return 0
        size, owners = self._sizes.pop(key)
        self.size_bytes -= size
        for owner in owners:
            keys = self._by_owner.get(owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_owner[owner]
        return 1
