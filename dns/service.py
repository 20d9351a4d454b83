"""The embedded DNS server of one process: table, responder, forwarder and listeners.

The agent builds one and feeds it the change feed (`start(records)` with the
snapshot, then `on_change` for every change); a worker process builds another
from the same snapshot-plus-deltas stream (`dns.worker`). The forwarder's
upstreams come from `--dns-upstream`, else from the host's /etc/resolv.conf
without our own address.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dns.forward import Forwarder
from dns.lookup import Asker, resolve
from dns.responder import DnsConfig, Responder
from dns.sandbox import SandboxDns, sweep_forever
from dns.server import TcpServer, UdpServer, serve
from dns.table import HOST_VIEW, NameTable
from dns.upstreams import Upstream, upstreams_from_resolv_conf
from mesh.core.logs import event
from mesh.core.model import Change, Network, Record

log = logging.getLogger(__name__)

#: Never forward to ourselves: Swarm's resolver drops its own address too.
OWN_ADDRESSES = ("127.0.0.11",)


@dataclass(frozen=True, slots=True)
class DnsSettings:
    host: str
    port: int
    ttl: int = 5
    domain: str | None = None
    upstreams: tuple[Upstream, ...] | None = None  # None: read /etc/resolv.conf
    upstream_timeout: float = 2.0
    reuse_port: bool = False
    #: processes sharing the port (the agent and its `--dns-workers`): UDP queries are
    #: spread over them at random (`dns.reuseport`); 0: by the kernel's hash alone
    reuse_group: int = 0
    sandbox_check_interval: float = 1.0  # seconds between looks for vanished sandboxes


class DnsService:
    def __init__(self, settings: DnsSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.table = NameTable(settings.domain)
        self.responder = Responder(
            self.table, DnsConfig(ttl=settings.ttl, domain=settings.domain), rng
        )
        upstreams: Sequence[Upstream] = (
            settings.upstreams
            if settings.upstreams is not None
            else upstreams_from_resolv_conf(exclude={settings.host, *OWN_ADDRESSES})
        )
        self.forwarder = Forwarder(upstreams, timeout=settings.upstream_timeout)
        self._udp: UdpServer | None = None
        self._tcp: TcpServer | None = None
        self.port = settings.port
        self.sandboxes = SandboxDns(self.responder, self._forward)
        self._sweeper: asyncio.Task[None] | None = None

    def load(self, records: Iterable[Record]) -> None:
        self.table.load(records)

    def on_change(self, change: Change) -> None:
        self.responder.on_change(change)

    async def _forward(self, query: bytes, tcp: bool) -> bytes:
        return await self.forwarder.forward(query, tcp=tcp)

    async def start(self) -> None:
        self.sandboxes.bind_loop(asyncio.get_running_loop())
        self._udp, self._tcp, self.port = await serve(
            self.responder,
            self._forward,
            self.settings.host,
            self.settings.port,
            self.settings.reuse_port,
            self.settings.reuse_group,
        )
        event(
            log,
            "dns_listening",
            address=f"{self.settings.host}:{self.port}",
            upstreams=",".join(f"{u.host}:{u.port}" for u in self.forwarder.upstreams) or "none",
            ttl=self.settings.ttl,
        )
        self._sweeper = asyncio.create_task(
            sweep_forever(self.sandboxes, self.settings.sandbox_check_interval)
        )

    def open_sandbox(self, key: str, netns: str, networks: tuple[str, ...]) -> None:
        """Answer on 127.0.0.11:53 (UDP, TCP) inside `netns`, seeing exactly `networks`.

        Idempotent (`dns.sandbox.SandboxDns.open`); any thread, once started.
        Raises OSError when the namespace cannot be entered or the port is taken.
        """
        self.sandboxes.open(key, netns, networks)

    def close_sandbox(self, key: str) -> None:
        """Stop answering inside sandbox `key`; nothing if it is not open."""
        self.sandboxes.close(key)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.sandboxes.close_all()
        if self._udp is not None:
            await self._udp.close()
        if self._tcp is not None:
            await self._tcp.close()
        await self.forwarder.close()

    async def resolve(self, name: str, qtype: str, network: Network | None) -> dict[str, Any]:
        """What an asker on `network` (None: on the host) gets for `name`."""
        # The gateway stands for any address of the network: views go by subnet.
        asker = (
            Asker("127.0.0.1", None) if network is None else Asker(network.gateway, network.name)
        )
        return await resolve(self.responder, self._forward, asker, name, qtype)

    def records(self, network: Network | None) -> list[dict[str, str]]:
        """Every record an asker on `network` (None: the host) is answered (`mesh inspect dns`)."""
        view = HOST_VIEW if network is None else self.table.view_of(network.gateway)
        return [{"name": n, "type": t, "value": v} for n, t, v in self.table.records(view)]

    def stats(self) -> dict[str, int]:
        """Counters and levels (`is_level` tells them apart), for `GET /v1/dns` and metrics."""
        counters = {**self.responder.stats, **self.responder.cache_stats()}
        # The UDP listeners' fast path (the node's and the sandboxes') counts its own hits.
        counters["cache_hits"] += self.responder.queries.fast_hits()
        counters["udp_send_dropped"] = self.responder.queries.unsent[0]
        return {
            **{f"responder_{k}": v for k, v in counters.items()},
            **{f"forwarder_{k}": v for k, v in self.forwarder.stats.items()},
            "forwarder_cache_bytes": self.forwarder.cache.size_bytes,
            **({} if self._tcp is None else {f"tcp_{k}": v for k, v in self._tcp.stats.items()}),
            "sandboxes_open": len(self.sandboxes),
            **{f"sandbox_{k}": v for k, v in self.sandboxes.stats.items()},
            **{f"sandbox_tcp_{k}": v for k, v in self.sandboxes.tcp_stats().items()},
        }

    def metric_counts(self) -> dict[str, int | float]:
        """The labelled counts for `GET /metrics`, as flat names a worker reports and the
        agent sums by name: answers by type, rcode and scope and their latency
        (`dns.querystats`), upstream attempts by outcome (`forward|UPSTREAM|OUTCOME`)."""
        counts = self.responder.queries.flat()
        for (upstream, outcome), count in self.forwarder.attempts.items():
            counts[f"{FORWARD_PREFIX}{upstream}|{outcome}"] = count
        return counts


#: the prefix of an upstream's attempts in `DnsService.metric_counts`
FORWARD_PREFIX = "forward|"


def forwards_of(flat: Mapping[str, int | float]) -> Iterator[tuple[tuple[str, str], int]]:
    """((upstream, outcome), attempts) from flat names (`DnsService.metric_counts`, summed)."""
    for name, value in flat.items():
        if name.startswith(FORWARD_PREFIX):
            upstream, _, outcome = name[len(FORWARD_PREFIX) :].rpartition("|")
            if upstream:
                yield (upstream, outcome), int(value)


#: words that mark a name of `DnsService.stats()` as a level (what is held now) rather
#: than a count of events
_LEVEL_WORDS = ("entries", "bytes", "open", "in_flight", "active")


def is_level(name: str) -> bool:
    """Whether the stat `name` is a level (a gauge), not a counter."""
    return any(word in name for word in _LEVEL_WORDS)
