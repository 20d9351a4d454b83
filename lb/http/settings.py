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
    #: a whole request body, from its head (408 past it; 0: none): a slow body
    #: holds two descriptors (client and task), so its time is bounded
    body_deadline: float = 3600.0
    #: the slowest a body may arrive, bytes per second averaged since its head, once
    #: `body_grace` seconds have passed (408 below it; 0: no minimum)
    body_min_rate: int = 1024
    body_grace: float = 10.0
    #: an idle pooled connection to a task is closed after this (below common
    #: server keep-alive timeouts, so the task rarely closes first)
    pool_idle_timeout: float = 4.0
    #: idle connections kept per task
    pool_size: int = 256
    #: seconds a task that refused a connection gets no new requests
    eject_seconds: float = 10.0
    #: bytes of request body held while the task's connection is being made
    buffer_limit: int = 256 << 10
    #: descriptors one process's router holds at once: client connections, connections
    #: to tasks (pooled or in use) and upgraded pipes (two each); a client is taken only
    #: with room for its task's connection too; past it: 503 and close
    max_connections: int = 10_000
    #: descriptors left to the rest of the process (API, health checks, DNS, gossip):
    #: the router's budget is min(max_connections, limit - held at start - reserve),
    #: the reserve at most a quarter of the limit
    fd_reserve: int = 1024
    #: one logfmt line per request to the `lb.http.access` logger (a debugging aid)
    access_log: bool = False
    #: the access log proper (lb.accesslog): the share of requests logged (0: off),
    #: where ("-": stdout; a file is opened O_APPEND by each worker) and how (json|clf)
    access_log_rate: float = 0.01
    access_log_path: str = "-"
    access_log_format: str = "json"
    #: the scheme the listener speaks, for X-Forwarded-Proto and Forwarded
    proto: str = "http"

    def fd_budget(self, limit: int, held: int) -> int:
        """Descriptors the router may hold, of a process `limit` with `held` open already."""
        reserve = min(self.fd_reserve, limit // 4)
        return max(2, min(self.max_connections, limit - held - reserve))

    def body_due(self, started: float, received: int, now: float) -> float:
        """When a request body being read is late: no byte for `body_timeout`, the whole
        body past `body_deadline`, or fewer than `body_min_rate` bytes a second on
        average after `body_grace` (`started`: when its clock started, `received`:
        bytes since)."""
        due = now + self.body_timeout
        if self.body_deadline:
            due = min(due, started + self.body_deadline)
        if self.body_min_rate:
            due = min(due, started + self.body_grace + received / self.body_min_rate)
        return due

    def tick(self) -> float:
        """How often deadlines are swept: fine enough for the shortest timeout."""
        shortest = min(
            self.header_timeout,
            self.connect_timeout,
            self.upstream_timeout,
            self.body_timeout,
            self.pool_idle_timeout,
            self.body_deadline or self.body_timeout,
            self.body_grace if self.body_min_rate else self.body_timeout,
        )
        return max(0.02, min(1.0, shortest / 4))
