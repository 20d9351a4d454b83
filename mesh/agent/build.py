"""The agent's object graph, made in one place from its config, in dependency order.

`build` makes every part once, handing each what it works with when it is
made: nothing is assigned to a part afterwards, and no collaborator is typed
`Any`. It binds no port and starts no task (`mesh.agent.lifetime` does that,
in order); it reads the state loaded from disk, for the incarnation gossip
starts with. Where two parts need each other, the cycle is cut by a third
part both are given: the change feed shows the store through `Liveness`,
which `NodeWatch` (the gossip shell's event sink) drives; the gossip core's
delegate applies gossiped keyring changes (`RemoteKeyring`) while the API's
`ClusterKeyring` drives the core through the shell made after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from dns.forward import Upstream
from dns.service import DnsService, DnsSettings, is_level
from dns.worker import DnsWorkerArgs
from gossip.aio import GossipShell
from gossip.config import GossipConfig
from gossip.keyring_store import LocalKeyringControl, load_keyring
from gossip.security import OVERHEAD
from lb.accesslog import AccessLogSettings
from lb.driver import LbDriver
from lb.failover import suspect_hold
from lb.healthz import HealthListener
from lb.http.labels import Problem
from lb.http.problems import RouteProblems
from lb.http.service import HttpEndpoints
from lb.http.serving import HttpMesh
from lb.http.settings import RouterSettings
from lb.http.tls import CertSpec
from lb.nft.unanswered import UnansweredReader
from lb.policy import PROXY_BACKENDS, healthz, lb_problems
from lb.select import SelectError, choose
from lb.sysctls import SysctlError, restore_leftover
from lb.userspace import ProxySettings
from lb.view import LbView, build_table
from mesh.api.app import Access, ApiDeps, make_app
from mesh.api.tls import TlsError, server_context
from mesh.cluster import (
    Cluster,
    ClusterKeyring,
    ClusterState,
    NodeWatch,
    RemoteKeyring,
    gossip_core,
)
from mesh.config import AgentConfig, describe
from mesh.control import Control
from mesh.core import capabilities
from mesh.core.capabilities import effective, unprivileged_port_start
from mesh.core.feed import ChangeFeed
from mesh.core.logs import event
from mesh.core.model import Health
from mesh.core.workerargs import worker_command
from mesh.core.workers import WorkerPool
from mesh.core.workertotals import WorkerTotals
from mesh.drain import DrainReaper
from mesh.errors import MeshError
from mesh.feedserver import FeedServer, feed_socket_path
from mesh.health.runner import HealthRunner
from mesh.ipam import Ipam, parse_pool
from mesh.liveness import Liveness
from mesh.sandbox.driver import available, create_driver
from mesh.sandbox.links import delete_veth
from mesh.sandbox.manager import SandboxManager, SandboxServer
from mesh.sandbox.names import netns_prefix
from mesh.sandbox.netns import Sandboxes
from mesh.sandbox.overlay import OverlayDriver
from mesh.sandbox.privileges import DISABLED, missing_privileges
from mesh.state import persist
from mesh.state.store import Store
from mesh.tombstones import TombstoneReaper

log = logging.getLogger("mesh.agent")

#: Seconds the API gives open requests to finish when the agent stops.
API_SHUTDOWN_GRACE = 2.0


class MeshStartError(Exception):
    """A setting the agent cannot start with, found only at start (e.g. `--lb ipvs`
    without ip_vs, a port in use): logged as the reason, without a traceback."""


class Stopping:
    """When the agent stops, and with which exit status: a signal, or a part that can
    no longer keep its promises (a failed disk) calling `fail`."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.exit_code = 0

    def stop(self) -> None:
        self.event.set()

    def fail(self, reason: str) -> None:
        event(log, "agent_failing", logging.CRITICAL, reason=reason)
        self.exit_code = 1
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class HealthRecorder:
    """Writes the health runner's verdicts to the state, each as its own task (the
    runner calls it synchronously, from inside the feed)."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self._pending: set[asyncio.Task[None]] = set()

    def report(self, task_id: str, health: Health, output: str) -> None:
        task = asyncio.create_task(self._record(task_id, health, output))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, task_id: str, health: Health, output: str) -> None:
        store = self._control.store
        try:
            changes = await self._control.apply(
                lambda now: store.set_health(task_id, health, output, now)
            )
        except MeshError:
            return  # the task went away meanwhile
        if changes:
            event(log, "task_health", task=task_id, health=health.value, output=output)

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


class DnsWorkers:
    """`--dns-workers N`: processes answering on the DNS port the agent bound (a port of
    0 is known only then), each fed over the feed socket."""

    def __init__(self, config: AgentConfig, dns: DnsService, feed_socket: Path) -> None:
        assert config.dns is not None
        self._config = config
        self._dns = dns
        self._feed_socket = feed_socket
        self.pool: WorkerPool | None = None
        #: what the workers counted, as they report it up the feed socket
        self.totals = WorkerTotals(is_level)

    def start(self) -> None:
        config = self._config
        assert config.dns is not None
        argv = worker_command(
            "dns.worker",
            DnsWorkerArgs(
                feed=str(self._feed_socket),
                host=config.dns.host,
                port=self._dns.port,
                ttl=config.dns_ttl,
                group=config.dns_workers + 1,  # the agent's listener and every worker's
                domain=config.dns_domain or None,
                upstream=[str(upstream) for upstream in config.dns_upstreams],
                log_level=config.log_level,
            ),
        )
        self.pool = WorkerPool("dns", argv, config.dns_workers)
        self.pool.start()

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()


class WorkerReports:
    """The feed socket's reports, each to the pool it came from: `{"http_worker": PID,
    "stats"}` to the HTTP routing mesh, `{"dns_worker": PID, "stats"}` to the DNS totals;
    and every worker's own process figures (`"index"`, `"process"`), kept while it lives."""

    def __init__(self, http: HttpMesh | None, dns: WorkerTotals | None) -> None:
        self._http = http
        self._dns = dns
        #: (pool, pid) -> (its index in the pool, its process figures by name)
        self._processes: dict[tuple[str, int], tuple[int, dict[str, float]]] = {}

    def on_report(self, message: dict[str, Any]) -> None:
        pool, pid = _sender(message)
        if pool is None:
            return
        self._keep_figures(pool, pid, message)
        if pool == "http":
            if self._http is not None:
                self._http.on_report(message)
            return
        stats = message.get("stats")
        if self._dns is not None and isinstance(stats, dict):
            self._dns.report(pid, stats)

    def on_gone(self, message: dict[str, Any]) -> None:
        pool, pid = _sender(message)
        if pool is None:
            return
        self._processes.pop((pool, pid), None)
        if pool == "http":
            if self._http is not None:
                self._http.on_gone(message)
        elif self._dns is not None:
            self._dns.gone(pid)

    def _keep_figures(self, pool: str, pid: int, message: dict[str, Any]) -> None:
        index, figures = message.get("index"), message.get("process")
        if not isinstance(index, int) or not isinstance(figures, dict):
            return
        numbers = {
            name: float(value)
            for name, value in figures.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        seq = message.get("seq")
        if isinstance(seq, int):  # the last change it applied, for its feed lag
            numbers["feed_seq"] = seq
        self._processes[(pool, pid)] = (index, numbers)

    def processes(self) -> list[tuple[str, int, dict[str, float]]]:
        """(pool, index, figures) of every live worker that reported them."""
        return [
            (pool, index, figures) for (pool, _pid), (index, figures) in self._processes.items()
        ]


def _sender(message: dict[str, Any]) -> tuple[str | None, int]:
    """The pool and pid a report names (None: a report of no known pool)."""
    for pool in ("http", "dns"):
        pid = message.get(f"{pool}_worker")
        if isinstance(pid, int):
            return pool, pid
    return None, 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Agent:
    """Every part of one node, made once by `build`, in the order they are listed."""

    config: AgentConfig
    loaded: persist.Loaded
    #: the incarnation gossip starts with: higher than any this node had
    incarnation: int
    stopping: Stopping
    store: Store
    liveness: Liveness
    feed: ChangeFeed
    writer: persist.StateWriter
    control: Control
    health_recorder: HealthRecorder
    health: HealthRunner
    reaper: DrainReaper
    tombstones: TombstoneReaper
    dns: DnsService | None
    lb: LbDriver
    #: the health listener for external load balancers (`--lb-healthz`); None: off
    lb_healthz: HealthListener | None
    http: HttpMesh | None
    #: every service's HRM route problems, by the routers' rules (follows the feed in
    #: this process, whether or not it routes HTTP); read by the API, doctor, metrics
    route_problems: RouteProblems
    #: this node's sandboxes and driver-backed networks; None without the privileges
    sandboxes: SandboxManager | None
    #: this node's VTEP (its advertise address) when it serves overlay networks
    vtep: str | None
    #: the feed socket, when worker processes follow the feed
    feed_server: FeedServer | None
    dns_workers: DnsWorkers | None
    cluster_state: ClusterState
    gossip: GossipShell
    cluster: Cluster
    keyring: ClusterKeyring | None
    api: web.AppRunner
    #: the API's TLS (and mTLS) context; None: plain HTTP
    api_ssl: ssl.SSLContext | None


def build(config: AgentConfig, loaded: persist.Loaded, stopping: Stopping) -> Agent:
    """Every part of the agent, made from its config and the state loaded from disk.

    Raises MeshStartError (an unusable `--lb`, an API certificate that does not
    load), KeyringError (an unreadable keyring),
    OSError (a certificate that does not load): start errors, each in one line.
    """
    started_at = time.time()
    # A restarted node must rejoin with a higher incarnation than it ever had.
    incarnation = int(loaded.meta.get("incarnation", "0")) + 1
    store = Store(config.node_name, Ipam(parse_pool(config.address_pool)), random.Random())
    liveness = Liveness(store)
    feed = ChangeFeed(store.all_records, shown=liveness)
    writer = persist.StateWriter(config.data_dir)
    control = Control(store, feed, writer, time.time, stopping.fail)
    recorder = HealthRecorder(control)
    health = HealthRunner(config.node_name, recorder.report)
    reaper = DrainReaper(control, time.time)
    tombstones = TombstoneReaper(control, time.time, config.tombstone_reap)
    dns = (
        None
        if config.dns is None
        else DnsService(
            DnsSettings(
                host=config.dns.host,
                port=config.dns.port,
                ttl=config.dns_ttl,
                domain=config.dns_domain,
                upstreams=tuple(Upstream(u.host, u.port) for u in config.dns_upstreams) or None,
                reuse_port=config.dns_workers > 0,
                reuse_group=config.dns_workers + 1 if config.dns_workers else 0,
            )
        )
    )
    held = _check_capabilities(config)
    lb = _lb(config, feed)
    lb_healthz = None
    if config.lb_healthz is not None:
        lb_healthz = HealthListener(
            lambda name: healthz(lb.view, name), config.lb_healthz.host, config.lb_healthz.port
        )
        lb.healthz_stats = lb_healthz.stats
    http = _http(config)
    route_problems = RouteProblems(
        None
        if config.http is None or config.https is None
        else [CertSpec.parse(c).host for c in config.tls_certs]
    )
    missing = missing_privileges()
    vtep = None if missing is not None else _vtep(config)
    sandboxes = None if missing is not None else _sandboxes(config, dns, lb, vtep)
    if missing is not None:
        event(log, "sandboxes_disabled", logging.WARNING, disabled=DISABLED, reason=missing)
    needs_feed_socket = (dns is not None and config.dns_workers > 0) or (
        http is not None and http.workers > 0
    )
    socket_path = feed_socket_path(config.data_dir) if needs_feed_socket else None
    dns_workers = (
        None
        if dns is None or socket_path is None or not config.dns_workers
        else DnsWorkers(config, dns, socket_path)
    )
    reports = WorkerReports(http, None if dns_workers is None else dns_workers.totals)
    feed_server = (
        None
        if socket_path is None
        else FeedServer(feed, socket_path, reports.on_report, reports.on_gone)
    )
    gossip, cluster_state, cluster, keyring = _gossip(config, control, liveness, incarnation, lb)
    if sandboxes is not None:
        # Encrypted overlays derive their IPsec keys from the gossip keyring, which
        # `mesh keyring` and gossiped changes alter in place (read again every second).
        sandboxes.use_keyring(lambda: gossip.keyring)
    deps = ApiDeps(
        control=control,
        node=config.node_name,
        members=cluster.members,
        heartbeat=health.heartbeat,
        drain_grace=config.drain_grace,
        access=Access(config.api_tokens),
        max_body=config.max_body,
        resolve=None if dns is None else dns.resolve,
        dns_records=None if dns is None else dns.records,
        dns_stats=None if dns is None else dns.stats,
        dns_counts=None if dns is None else dns.metric_counts,
        dns_worker_stats=None if dns_workers is None else dns_workers.totals.total,
        worker_processes=None if feed_server is None else reports.processes,
        agent_info=lambda: {
            "pid": os.getpid(),
            "started_at": started_at,
            "config": describe(config),
            "sandboxes": (
                {"enabled": False, "reason": missing} if sandboxes is None else sandboxes.describe()
            ),
            "capabilities": held,
        },
        gossip_stats=cluster.stats,
        keyring=keyring,
        lb=lb.describe,
        lb_counters=lb.counters,
        lb_sample=lb.sample,
        http_stats=None if http is None else http.snapshot,
        route_problems=route_problems.by_service,
        lb_problems=_lb_problems(lb),
        lb_healthz=lambda name: healthz(lb.view, name),
        node_statuses=cluster.node_statuses,
        sandboxes=sandboxes,
    )
    api = web.AppRunner(make_app(deps), access_log=None, shutdown_timeout=API_SHUTDOWN_GRACE)
    api_ssl = _api_ssl(config)
    return Agent(
        config=config,
        loaded=loaded,
        incarnation=incarnation,
        stopping=stopping,
        store=store,
        liveness=liveness,
        feed=feed,
        writer=writer,
        control=control,
        health_recorder=recorder,
        health=health,
        reaper=reaper,
        tombstones=tombstones,
        dns=dns,
        lb=lb,
        lb_healthz=lb_healthz,
        http=http,
        route_problems=route_problems,
        sandboxes=sandboxes,
        vtep=vtep,
        feed_server=feed_server,
        dns_workers=dns_workers,
        cluster_state=cluster_state,
        gossip=gossip,
        cluster=cluster,
        keyring=keyring,
        api=api,
        api_ssl=api_ssl,
    )


def _api_ssl(config: AgentConfig) -> ssl.SSLContext | None:
    if config.api_tls_cert is None or config.api_tls_key is None:
        return None
    try:
        return server_context(config.api_tls_cert, config.api_tls_key, config.api_tls_ca)
    except TlsError as exc:
        raise MeshStartError(str(exc)) from None


def _check_capabilities(config: AgentConfig) -> dict[str, list[str]]:
    """One warning line per capability this agent lacks, naming what it turns off
    (`mesh.core.capabilities`); what `GET /v1/agent` shows under `capabilities`."""
    caps = effective()
    lowest = unprivileged_port_start()
    listeners = [("api", config.api), ("dns", config.dns), ("gossip", config.advertise)]
    listeners += [("http", config.http), ("https", config.https)]
    low_ports = [
        f"{role} {where}" for role, where in listeners if where is not None and where.port < lowest
    ]
    lacking = capabilities.missing(
        caps,
        low_ports=low_ports,
        kernel_lb=None if config.lb == "userspace" else config.lb,
        sandboxes=True,
    )
    for item in lacking:
        event(
            log,
            "capability_missing",
            logging.WARNING,
            capability=item.capability,
            disables=item.disables,
        )
    return {
        "effective": [name for bit, name in sorted(capabilities.NAMES.items()) if caps.has(bit)],
        "missing": [item.line() for item in lacking],
    }


def _lb(config: AgentConfig, feed: ChangeFeed) -> LbDriver:
    try:
        choice = choose(
            config.lb,
            ProxySettings(
                publish_address=config.publish_address,
                tcp_idle_timeout=config.lb_tcp_idle,
                # connects from the client's address for traffic-policy=local ports
                transparent=effective().net_admin,
                access_log=AccessLogSettings(
                    config.access_log, config.access_log_sample, config.access_log_format
                ),
            ),
            fwmark=config.fwmark,
            data_dir=config.data_dir,
        )
    except SelectError as exc:
        raise MeshStartError(str(exc)) from None
    if choice.backend.name != "ipvs":
        # The IPVS backend of a run killed with -9 left the host's sysctls changed.
        try:
            restored = restore_leftover(config.data_dir)
        except (SysctlError, OSError) as exc:
            event(log, "lb_sysctls_not_restored", logging.WARNING, error=str(exc))
        else:
            if restored:
                event(log, "lb_sysctls_restored", sysctls=restored)
    event(
        log, "lb_backend_chosen", backend=choice.backend.name, asked=config.lb, reason=choice.reason
    )
    # What the state wants, built from scratch (not by the view), for `mesh doctor`.
    # A kernel backend refuses the PROXY label (a problem on the service: lb.policy).
    proxy = choice.backend.name in PROXY_BACKENDS
    return LbDriver(
        LbView(config.node_name, proxy_supported=proxy),
        choice.backend,
        choice.reason,
        desired=lambda: build_table(feed.snapshot()[1], config.node_name, proxy_supported=proxy),
        # A false suspicion is refuted within a few gossip rounds; a suspect that has
        # not refuted after this long is taken out of the table (lb/failover.py).
        suspect_hold=suspect_hold(getattr(GossipConfig, config.gossip_profile)().probe_interval),
        # A real that leaves SYNs unanswered is ejected before gossip's verdict
        # (lb/outlier.py); it reads conntrack: the nftables backend only.
        outlier_reader=UnansweredReader()
        if config.lb_outlier_detection and choice.backend.name == "nftables"
        else None,
    )


def _lb_problems(lb: LbDriver) -> Callable[[], dict[str, list[Problem]]]:
    """Every service's L4 options the backend refuses or honours only in part."""

    def by_service() -> dict[str, list[Problem]]:
        keeps = getattr(lb.backend, "keeps_client_address", None)
        transparent = bool(keeps()) if callable(keeps) else False
        return lb_problems(lb.view, lb.backend.name, transparent=transparent)

    return by_service


def _vtep(config: AgentConfig) -> str | None:
    """The underlay address of this node's overlays: its advertise address, which must
    be an IPv4 literal (other nodes send VXLAN packets there)."""
    try:
        return str(ipaddress.IPv4Address(config.advertise.host))
    except ValueError:
        event(
            log,
            "overlays_disabled",
            logging.WARNING,
            reason=f"--advertise {config.advertise.host} is not an IPv4 address (the VTEP)",
        )
        return None


def _sandboxes(
    config: AgentConfig, dns: DnsService | None, lb: LbDriver, vtep: str | None
) -> SandboxManager:
    """The sandbox manager of an agent that may make namespaces and links (without,
    one line says what is off and the API answers those requests 422 needs_privileges)."""
    drivers = {name: create_driver(name) for name in sorted(available())}
    drivers.pop("overlay", None)
    if vtep is not None:
        # The overlay driver needs this node's VTEP and the cluster's data-path port.
        drivers["overlay"] = OverlayDriver(vtep=vtep, port=config.data_path_port)
    # DNS first: a sandbox's names answer before its VIPs are programmed.
    servers: list[SandboxServer] = [lb] if dns is None else [dns, lb]
    node = config.node_name
    event(log, "sandboxes_enabled", drivers=sorted(drivers), prefix=netns_prefix(node))
    return SandboxManager(node, drivers, Sandboxes(netns_prefix(node)), servers, delete_veth)


def _http(config: AgentConfig) -> HttpMesh | None:
    if config.http is None:
        return None
    return HttpMesh(
        HttpEndpoints(
            host=config.http.host,
            port=config.http.port,
            https_host=config.https.host if config.https else None,
            https_port=config.https.port if config.https else 0,
            certs=tuple(CertSpec.parse(c) for c in config.tls_certs),
        ),
        RouterSettings(
            header_timeout=config.http_header_timeout,
            connect_timeout=min(5.0, config.http_upstream_timeout),
            upstream_timeout=config.http_upstream_timeout,
            max_body=config.http_max_body,
            access_log=config.http_access_log,
            access_log_rate=config.access_log_sample,
            access_log_path=config.access_log,
            access_log_format=config.access_log_format,
            body_deadline=config.http_body_deadline,
            body_min_rate=config.http_body_min_rate,
        ),
        config.http_workers,
        config.log_level,
    )


def _gossip(
    config: AgentConfig,
    control: Control,
    liveness: Liveness,
    incarnation: int,
    lb: LbDriver,
) -> tuple[GossipShell, ClusterState, Cluster, ClusterKeyring | None]:
    """Gossip's parts: the core's delegate, the core, the shell around it, then the
    cluster and the keyring's control, which drive the core through the shell."""
    profile = getattr(GossipConfig, config.gossip_profile)()
    advertise = (config.advertise.host, config.advertise.port)
    keyring = load_keyring(config.keyring) if config.keyring else None
    local = (
        None
        if keyring is None or config.keyring is None
        else LocalKeyringControl(keyring, config.keyring)
    )
    label = config.cluster_label.encode()
    # Sealing adds its envelope to what the core packs, a label its header: keep room.
    sealed = keyring is not None and config.gossip_verify_outgoing
    overhead = OVERHEAD if sealed else (2 + len(label) if label else 0)
    profile = dataclasses.replace(profile, packet_overhead=overhead)
    state = ClusterState(control, None if local is None else RemoteKeyring(local))
    core = gossip_core(profile, config.node_name, advertise, state, incarnation=incarnation)
    shell = GossipShell(
        core,
        config.advertise.host,
        config.advertise.port,
        keyring=keyring,
        label=label,
        on_event=NodeWatch(liveness, control.feed, suspects=lb).on_event,
        tcp_timeout=profile.tcp_timeout,
        verify_incoming=config.gossip_verify_incoming,
        verify_outgoing=config.gossip_verify_outgoing,
    )
    cluster = Cluster(control, core, shell, state, liveness, config.node_name)
    control_keyring = None if local is None else ClusterKeyring(local, core, shell)
    return shell, state, cluster, control_keyring
