"""`mesh agent`: the composition root of one node.

Start-up order: read the config; lock the data dir (one agent per data dir,
before anything touches it or binds a port); load the durable state; make sure the
built-in `ingress` network exists; start the state writer, the health runner
and the drain reaper, all following the change feed; bind the HTTP API last,
so nothing is answered before the state is whole. Shut-down (SIGTERM, SIGINT,
or a failed disk) runs in reverse: stop accepting requests, stop the checks,
then let the writer finish every queued commit.

A start that fails for a reason the operator can fix (the data dir locked or
corrupt, a port in use) ends with one line on stderr, `mesh agent: <reason>`,
naming the file or the listener (role, address, port and who holds it), and
exit status 1.

The event loop is chosen here and only here: uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import uvloop
from aiohttp import web

from dns.forward import Upstream
from dns.service import DnsService, DnsSettings
from gossip.aio import GossipShell
from gossip.config import GossipConfig
from gossip.keyring_store import LocalKeyringControl, load_keyring
from gossip.security import OVERHEAD, KeyringError
from lb.driver import LbDriver
from lb.fds import raise_open_file_limit
from lb.http.service import HttpEndpoints
from lb.http.serving import HttpMesh
from lb.http.settings import RouterSettings
from lb.http.tls import CertSpec
from lb.select import SelectError, choose
from lb.userspace import ProxySettings
from lb.view import LbView, build_table
from mesh.api.app import ApiDeps, make_app
from mesh.cluster import Cluster, ClusterKeyring
from mesh.config import AgentConfig, ConfigError, describe, load_config
from mesh.control import Control
from mesh.core.feed import ChangeFeed
from mesh.core.logs import event, setup
from mesh.core.model import INGRESS, KIND_OF, Change, Health
from mesh.core.sockets import bind_failure, family_of
from mesh.core.workers import WorkerPool
from mesh.drain import DrainReaper
from mesh.errors import MeshError
from mesh.feedserver import FeedServer, feed_socket_path
from mesh.health.runner import HealthRunner
from mesh.ipam import Ipam, capacity_of, parse_pool
from mesh.state import persist
from mesh.state.lock import DataDirError, lock_data_dir
from mesh.state.store import Store
from mesh.tombstones import TombstoneReaper

log = logging.getLogger("mesh.agent")

#: Seconds the API gives open requests to finish when the agent stops.
API_SHUTDOWN_GRACE = 2.0


class MeshStartError(Exception):
    """A setting the agent cannot start with, found only at start (e.g. `--lb ipvs`
    without ip_vs, a port in use): logged as the reason, without a traceback."""


@contextlib.contextmanager
def binding(role: str, protocols: tuple[str, ...], host: str, port: int) -> Iterator[None]:
    """Turn a failed bind of `role` into a MeshStartError that names the role, the
    address and the port, and who holds it (uvloop's OSError names none of them)."""
    try:
        yield
    except OSError as exc:
        # uvloop's "could not bind to local_addr" carries the errno in its cause.
        cause = exc if exc.errno is not None else exc.__cause__
        if not isinstance(cause, OSError) or cause.errno is None:
            raise  # not a bind: e.g. a certificate that does not load
        raise MeshStartError(bind_failure(role, protocols, host, port, cause,
                                          ours=family_of(os.getpid()))) from None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.started_at = time.time()
        self.store = Store(config.node_name, Ipam(parse_pool(config.address_pool)),
                           random.Random())
        self.feed = ChangeFeed(self.store.all_records)
        self.writer = persist.StateWriter(config.data_dir)
        self.control = Control(self.store, self.feed, self.writer, time.time, self.fail)
        self.health = HealthRunner(config.node_name, self._report_health)
        self.reaper = DrainReaper(self.control, time.time)
        self.tombstones = TombstoneReaper(self.control, time.time, config.tombstone_reap)
        self.dns = None if config.dns is None else DnsService(DnsSettings(
            host=config.dns.host, port=config.dns.port, ttl=config.dns_ttl,
            domain=config.dns_domain,
            upstreams=tuple(Upstream(u.host, u.port) for u in config.dns_upstreams) or None,
            reuse_port=config.dns_workers > 0))
        self.http = None if config.http is None else HttpMesh(
            HttpEndpoints(host=config.http.host, port=config.http.port,
                          https_host=config.https.host if config.https else None,
                          https_port=config.https.port if config.https else 0,
                          certs=tuple(CertSpec.parse(c) for c in config.tls_certs)),
            RouterSettings(header_timeout=config.http_header_timeout,
                           connect_timeout=min(5.0, config.http_upstream_timeout),
                           upstream_timeout=config.http_upstream_timeout,
                           max_body=config.http_max_body, access_log=config.http_access_log,
                           body_deadline=config.http_body_deadline,
                           body_min_rate=config.http_body_min_rate),
            config.http_workers, config.log_level)
        self.feed_server: FeedServer | None = None
        self.dns_workers: WorkerPool | None = None
        self.cluster: Cluster | None = None
        self.keyring: ClusterKeyring | None = None
        self.gossip: GossipShell | None = None
        self.lb: LbDriver | None = None
        self._runner: web.AppRunner | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def fail(self, reason: str) -> None:
        """Stop the agent because it can no longer keep its promises (its disk failed)."""
        event(log, "agent_failing", logging.CRITICAL, reason=reason)
        self.exit_code = 1
        self.stopping.set()

    def members(self) -> list[dict[str, Any]]:
        if self.cluster is not None:
            return self.cluster.members()
        advertise = self.config.advertise
        return [{"name": self.config.node_name, "address": advertise.host,
                 "port": advertise.port, "status": "alive", "incarnation": 0}]

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started_at": self.started_at,
                "config": describe(self.config)}

    def _report_health(self, task_id: str, health: Health, output: str) -> None:
        task = asyncio.create_task(self._record_health(task_id, health, output))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_health(self, task_id: str, health: Health, output: str) -> None:
        try:
            changes = await self.control.apply(
                lambda now: self.store.set_health(task_id, health, output, now))
        except MeshError:
            return  # the task went away meanwhile
        if changes:
            event(log, "task_health", task=task_id, health=health.value, output=output)

    async def start(self) -> None:
        loaded = await asyncio.to_thread(persist.load, self.config.data_dir)
        self.store.load(loaded.records, loaded.clock)
        previous = loaded.meta.get("node_name")
        if previous and previous != self.config.node_name:
            event(log, "node_renamed", logging.WARNING, previous=previous,
                  now=self.config.node_name, hint="tasks registered before keep the old name")
        self.writer.start(asyncio.get_running_loop())
        ingress = self._ensure_ingress()
        # A restarted node must rejoin with a higher incarnation than it ever had.
        incarnation = int(loaded.meta.get("incarnation", "0")) + 1
        await self.writer.write([c.after for c in ingress], self.store.clock,
                                {"node_name": self.config.node_name,
                                 "incarnation": str(incarnation)})
        event(log, "state_loaded", records=len(loaded.records), skipped=loaded.skipped,
              clock=self.store.clock, data_dir=self.config.data_dir)
        # all_records yields networks, then services, then tasks: the order the
        # health runner needs (a task's check lives on its service).
        for record in self.store.all_records():
            self.health.on_change(Change(KIND_OF[type(record)], record.key, None, record))
        self.reaper.load(self.store.all_records())
        self.tombstones.load()
        self.feed.subscribe(self.health.on_change)
        self.feed.subscribe(self.reaper.on_change)
        self.feed.subscribe(self.tombstones.on_change)
        self.tombstones.start()
        await self.health.start()
        self.reaper.start()
        if self.dns is not None:
            self.dns.load(self.store.all_records())
            self.feed.subscribe(self.dns.on_change)
            with binding("dns", ("udp", "tcp"), self.dns.settings.host, self.dns.settings.port):
                await self.dns.start()
            if self.config.dns_workers:
                await self._start_dns_workers(self.dns.port)
        await self._start_lb()
        if self.http is not None:
            self.feed.subscribe(self.http.on_change)
            try:
                await self.http.start(self._feed_socket, self.store.all_records())
            except OSError as exc:
                failed = self._failed_http_listener()
                if failed is None:
                    raise
                role, host, port = failed
                with binding(role, ("tcp",), host, port):
                    raise exc from None
        await self._start_gossip(incarnation)
        await self._start_api()

    def _ensure_ingress(self) -> list[Change]:
        """The ingress network as --ingress-subnet asks, or a /16 of the pool; one that
        exists (a data dir of an older agent may hold a /24) is kept as it is."""
        asked = self.config.ingress_subnet
        mismatch = self.store.ingress_mismatch(asked)
        if mismatch is not None:
            raise MeshStartError(mismatch)
        try:
            created = self.store.ensure_ingress(asked)
        except MeshError as exc:
            raise MeshStartError(f"--ingress-subnet {asked}: {exc.message}") from None
        ingress = self.store.network(INGRESS)
        event(log, "ingress_network", subnet=ingress.subnet, created=bool(created),
              capacity=capacity_of(ipaddress.IPv4Network(ingress.subnet)))
        return created

    async def _start_lb(self) -> None:
        config = self.config
        try:
            choice = choose(config.lb, ProxySettings(publish_address=config.publish_address,
                                                     tcp_idle_timeout=config.lb_tcp_idle))
        except SelectError as exc:
            raise MeshStartError(str(exc)) from None
        event(log, "lb_backend_chosen", backend=choice.backend.name, asked=config.lb,
              reason=choice.reason)
        self.lb = LbDriver(LbView(config.node_name), choice.backend, choice.reason,
                           desired=lambda: build_table(self.feed.snapshot()[1],
                                                       config.node_name))
        # The snapshot and the subscription come with no await between them, so
        # the view misses no change; ops made while the backend starts wait in its queue.
        _, records = self.feed.snapshot()
        self.feed.subscribe(self.lb.on_change)
        await self.lb.start(records)

    async def _start_gossip(self, incarnation: int) -> None:
        config = self.config
        profile = getattr(GossipConfig, config.gossip_profile)()
        advertise = (config.advertise.host, config.advertise.port)
        keyring = load_keyring(config.keyring) if config.keyring else None
        label = config.cluster_label.encode()
        # Sealing adds its envelope to what the core packs: keep room for it.
        overhead = OVERHEAD if keyring is not None else (2 + len(label) if label else 0)
        profile = dataclasses.replace(profile, packet_overhead=overhead)
        if keyring is not None:
            assert config.keyring is not None
            self.keyring = ClusterKeyring(LocalKeyringControl(keyring, config.keyring))
        self.cluster = Cluster(self.control, profile, config.node_name, advertise,
                               incarnation=incarnation, keyring=self.keyring)
        self.gossip = GossipShell(self.cluster.core, config.advertise.host,
                                  config.advertise.port, keyring=keyring,
                                  label=label,
                                  on_event=self.cluster.on_event,
                                  tcp_timeout=profile.tcp_timeout)
        self.cluster.shell = self.gossip
        with binding("gossip", ("udp", "tcp"), config.advertise.host, config.advertise.port):
            await self.gossip.start()
        self.feed.subscribe(self.cluster.on_change)
        event(log, "gossip_listening", address=str(config.advertise), profile=config.gossip_profile,
              encrypted=keyring is not None, incarnation=incarnation)
        await self.cluster.join([(j.host, j.port) for j in config.join])

    def _failed_http_listener(self) -> tuple[str, str, int] | None:
        """Which of the routing mesh's two listeners failed to bind (None: both were,
        the failure came after). The HTTPS one is bound only once the HTTP one is: in
        the agent's loop, where start() does nothing but bind, its TLS listener exists
        only then; for workers, the ports are reserved in that order."""
        assert self.http is not None
        ends = self.http.endpoints
        service = self.http.service
        if service is not None:
            bound = 0 if service.tls is None else 1
        else:
            bound = len(self.http._reserved)
            if bound == (1 if ends.https_host is None else 2):
                return None  # e.g. the feed socket for the workers
        if bound and ends.https_host is not None:
            return "https", ends.https_host, ends.https_port
        return "http", ends.host, ends.port

    async def _feed_socket(self) -> str:
        """The feed socket for worker processes, started on first use."""
        if self.feed_server is None:
            self.feed_server = FeedServer(self.feed, feed_socket_path(self.config.data_dir),
                                          None if self.http is None else self.http.on_report)
            await self.feed_server.start()
        return str(self.feed_server.path)

    async def _start_dns_workers(self, port: int) -> None:
        assert self.config.dns is not None
        argv = [sys.executable, "-m", "dns.worker", "--feed", await self._feed_socket(),
                "--host", self.config.dns.host, "--port", str(port),
                "--ttl", str(self.config.dns_ttl), "--log-level", self.config.log_level]
        if self.config.dns_domain:
            argv += ["--domain", self.config.dns_domain]
        for upstream in self.config.dns_upstreams:
            argv += ["--upstream", str(upstream)]
        self.dns_workers = WorkerPool("dns", argv, self.config.dns_workers)
        self.dns_workers.start()

    async def _start_api(self) -> None:
        deps = ApiDeps(control=self.control, node=self.config.node_name, members=self.members,
                       heartbeat=self.health.heartbeat, drain_grace=self.config.drain_grace,
                       token=self.config.api_token, max_body=self.config.max_body,
                       resolve=None if self.dns is None else self.dns.resolve,
                       dns_records=None if self.dns is None else self.dns.records,
                       dns_stats=None if self.dns is None else self.dns.stats,
                       agent_info=self.info,
                       gossip_stats=None if self.cluster is None else self.cluster.stats,
                       keyring=self.keyring,
                       lb=None if self.lb is None else self.lb.describe,
                       http_stats=None if self.http is None else self.http.snapshot,
                       node_statuses=None if self.cluster is None
                       else self.cluster.node_statuses)
        self._runner = web.AppRunner(make_app(deps), access_log=None,
                                     shutdown_timeout=API_SHUTDOWN_GRACE)
        await self._runner.setup()
        api = self.config.api
        site = web.TCPSite(self._runner, api.host, api.port, reuse_address=True)
        with binding("api", ("tcp",), api.host, api.port):
            await site.start()
        event(log, "api_listening", address=str(api))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.cluster is not None:
            await self.cluster.leave()
        if self.gossip is not None:
            await self.gossip.stop()
        if self.dns_workers is not None:
            await self.dns_workers.stop()
        if self.http is not None:
            await self.http.stop()
        if self.feed_server is not None:
            await self.feed_server.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self.lb is not None:
            await self.lb.close()
        await self.reaper.stop()
        await self.tombstones.stop()
        await self.health.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.writer.close)
        event(log, "agent_stopped", commits=self.writer.commits, batches=self.writer.batches)


async def run(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stopping.set)
    event(log, "agent_starting", **describe(config))
    try:
        await agent.start()
    except Exception as exc:  # a port in use, an unreadable data dir, or a bug: stop cleanly
        known = isinstance(exc, OSError | persist.PersistError | KeyringError | MeshStartError)
        reason = str(exc) if known else f"start failed: {exc!r} (a bug: see the log)"
        reason = " ".join(reason.splitlines())  # one line, whatever the error held
        event(log, "agent_start_failed", logging.ERROR, error=reason)
        if not known:
            log.exception("start failed")
        await agent.stop()
        # The last word, in one line, after the log lines of the stop.
        print(f"mesh agent: {reason}", file=sys.stderr, flush=True)
        return 1
    event(log, "agent_ready", node=config.node_name, api=config.api)
    await agent.stopping.wait()
    event(log, "agent_stopping")
    await agent.stop()
    return agent.exit_code


def main(argv: Sequence[str]) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"mesh agent: {exc}", file=sys.stderr)
        return 2
    # First, before any log line, state file or socket: a second agent on this data
    # dir says only who holds it.
    try:
        lock = lock_data_dir(config.data_dir)
    except DataDirError as exc:
        print(f"mesh agent: {exc}", file=sys.stderr)
        return 1
    try:
        setup(config.log_level)
        # Every forwarded query, proxied connection and check holds a descriptor: allow many.
        soft, hard = raise_open_file_limit()
        event(log, "open_file_limit", soft=soft, hard=hard)
        return uvloop.run(run(config))
    finally:
        lock.release()
