"""How one router behaves: limits and timeouts (seconds and bytes), shared by agent and workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouterSettings:
    #: the request line and headers together, bytes (431 past it)
    max_head: int = 32 << 10
    #: a request body, bytes (413 past it); 0: no limit
    max_body: int = 1 << 30
    #: from a connection's first byte (or the end of the previous response) to a whole
    #: request head; a slow client is answered 408 and closed (slowloris)
    header_timeout: float = 10.0
    #: an idle kept-alive client connection is closed after this
    keepalive_timeout: float = 75.0
    #: connecting to a task (past it: 504, and the next task is tried)
    connect_timeout: float = 5.0
    #: waiting for a task's response head, and between any two reads of a response (504)
    upstream_timeout: float = 60.0
    #: waiting for the client's request body between two reads
    body_timeout: float = 60.0
    #: an idle pooled connection to a task is closed after this (below common
    #: server keep-alive timeouts, so the task rarely closes first)
    pool_idle_timeout: float = 4.0
    #: idle connections kept per task
    pool_size: int = 256
    #: seconds a task that refused a connection gets no new requests
    eject_seconds: float = 10.0
    #: bytes of request body held while the task's connection is being made
    buffer_limit: int = 256 << 10
    #: client connections one process serves at once; past it: 503 and close
    max_connections: int = 10_000
    access_log: bool = False
    #: the scheme the listener speaks, for X-Forwarded-Proto and Forwarded
    proto: str = "http"

    def tick(self) -> float:
        """How often deadlines are swept: fine enough for the shortest timeout."""
        shortest = min(self.header_timeout, self.connect_timeout, self.upstream_timeout,
                       self.body_timeout, self.pool_idle_timeout)
        return max(0.02, min(1.0, shortest / 4))
