"""Which TCP connections the DNS server holds, and which one to close to admit another.

RFC 7766 §6.2: a server must keep serving new clients when its connection
budget is used up by idle ones. Held idle connections (a careless pool, or
an attacker holding the cap's worth) used to lock every new TCP client out,
and with them every answer too large for UDP (issue 13, defect 5). So:

- at most `max_per_client` connections from one source address (refused
  beyond that: one client cannot take the whole budget);
- at most `max_total` connections in all; when they are all taken, the one
  that has waited on its client longest goes (closed), and the new client
  gets its slot. A connection whose query is being answered is never
  chosen: only those waiting for the client to send (a query, or the rest
  of one) count as idle, so nothing accepted is lost;
- each connection also has an idle timeout (the shell's).

Sans-IO: connections are opaque ids; the shell closes the victims it is told.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

DEFAULT_MAX_TOTAL: Final = 256
DEFAULT_MAX_PER_CLIENT: Final = 16

STAT_NAMES: Final = (
    "accepted",
    "refused_per_client",
    "refused_full",
    "evicted_idle",
    "idle_timeouts",
)


class TcpSlots:
    def __init__(
        self, max_total: int = DEFAULT_MAX_TOTAL, max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ) -> None:
        if max_total < 1 or max_per_client < 1:
            raise ValueError("the DNS server needs room for one TCP connection")
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._client_of: dict[int, str] = {}
        self._per_client: dict[str, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # longest idle first
        self.stats = dict.fromkeys(STAT_NAMES, 0)

    def __len__(self) -> int:
        return len(self._client_of)

    def admit(self, conn: int, client: str) -> list[int] | None:
        """Admit `conn` from `client`: the connections to close first, or None to refuse it.

        An admitted connection starts idle (it waits for its first query).
        """
        if self._per_client.get(client, 0) >= self.max_per_client:
            self.stats["refused_per_client"] += 1
            return None
        victims = []
        if len(self._client_of) >= self.max_total:
            if not self._idle:
                self.stats["refused_full"] += 1
                return None
            victim = next(iter(self._idle))
            self.release(victim)
            victims.append(victim)
            self.stats["evicted_idle"] += 1
        self._client_of[conn] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._idle[conn] = None
        self.stats["accepted"] += 1
        return victims

    def idle(self, conn: int) -> None:
        """`conn` waits on its client from now on (the most recent idle one)."""
        if conn in self._client_of:
            self._idle.pop(conn, None)
            self._idle[conn] = None

    def busy(self, conn: int) -> None:
        """`conn` has a query being answered: not to be closed for another."""
        self._idle.pop(conn, None)

    def release(self, conn: int) -> None:
        """`conn` is closed (or about to be); idempotent."""
        client = self._client_of.pop(conn, None)
        if client is None:
            return
        self._idle.pop(conn, None)
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]
