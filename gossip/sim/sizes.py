"""Exact datagram sizes without encoding: the simulator's object mode."""

from __future__ import annotations

from collections.abc import Sequence

from gossip import codec
from gossip.messages import Alive, Dead, Message, Suspect, User


class SizeCache:
    """`codec.packet_size` without re-encoding every gossiped message at every hop.

    A gossiped Alive/Suspect/Dead/User is sent many times: by one node up to
    its retransmit limit, and re-queued by every receiver (the same object in
    object mode; an equal one when a push-pull merge rebuilt it). Its size is
    computed once: looked up by identity first (cheap; the entry keeps the
    object alive so its id cannot be reused), then by value (equal messages
    are few: one per member and incarnation). Pings and acks are unique and
    are not cached. Each table is simply emptied when it reaches LIMIT.
    """

    __slots__ = ("_by_id", "_by_value")
    LIMIT = 200_000
    CACHED = (Alive, Suspect, Dead, User)

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Message, int]] = {}
        self._by_value: dict[Message, int] = {}

    def encoded(self, message: Message) -> int:
        """len(codec.encode(message))."""
        if type(message) not in self.CACHED:
            return codec.encoded_size(message)
        entry = self._by_id.get(id(message))
        if entry is not None and entry[0] is message:
            return entry[1]
        size = self._by_value.get(message)
        if size is None:
            if len(self._by_value) >= self.LIMIT:
                self._by_value.clear()
            size = self._by_value[message] = codec.encoded_size(message)
        if len(self._by_id) >= self.LIMIT:
            self._by_id.clear()
        self._by_id[id(message)] = (message, size)
        return size

    def packet(self, messages: Sequence[Message]) -> int:
        """Exactly `len(codec.encode_packet(messages))` (the codec's COMPOUND framing)."""
        if len(messages) == 1:
            return self.encoded(messages[0])
        total = 2 + (1 if len(messages) <= 15 else 3)
        for message in messages:
            part = self.encoded(message) - 1
            total += part + (2 if part < 256 else 3 if part < 65536 else 5)
        return total
