"""The agent's parts entered in order, each one's cleanup pushed on one AsyncExitStack.

`stages` lists the parts in the order they start (see the start-up order in
`mesh.agent`); `enter` starts them one by one, pushing each one's `stop`
before its `start` runs, so a part that fails half-way is undone too. When a
start fails, or later when the agent stops, the stack undoes every part
entered so far in reverse order, even when one of the cleanups fails (it is
logged; the error that stopped the agent stays the one reported).

Each view follows the change feed (`ChangeFeed.follow`: its snapshot, then
every change) right before it starts, with nothing between, and stops
following before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mesh.agent.build import Agent, MeshStartError
from mesh.api.app import DEPS
from mesh.api_tokens import Scope
from mesh.config import ConfigError, read_api_tokens
from mesh.core.logs import event
from mesh.core.model import INGRESS, Change
from mesh.core.sockets import bind_failure, family_of
from mesh.core.view import View
from mesh.errors import MeshError
from mesh.hostresolver import HostResolver, ResolverConfigError
from mesh.ipam import capacity_of
from mesh.seeds import SeedResolver

log = logging.getLogger("mesh.agent")


@dataclass(frozen=True, slots=True)
class Stage:
    """One part's start and its undoing (`stop` is safe to call when `start` failed)."""

    name: str
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


async def enter(stages: list[Stage], stack: AsyncExitStack) -> None:
    """Start every stage in order; the stack undoes them in reverse when it closes."""
    for stage in stages:
        stack.push_async_callback(_undo, stage)
        await stage.start()


async def _undo(stage: Stage) -> None:
    """Stop one part; a part that fails to stop is logged, and the others still stop
    (the error that stopped the agent stays the one it reports)."""
    try:
        await stage.stop()
    except Exception as exc:
        event(log, "agent_part_stop_failed", logging.ERROR, part=stage.name, error=repr(exc))
        log.exception("stopping %s failed", stage.name)


async def _nothing() -> None:
    pass


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
        raise MeshStartError(
            bind_failure(role, protocols, host, port, cause, ours=family_of(os.getpid()))
        ) from None


def stages(agent: Agent, stack: AsyncExitStack) -> list[Stage]:
    """The agent's parts in start order, each with its cleanup."""
    config = agent.config

    def follow(view: View) -> None:
        """Follow the feed from now (snapshot and changes); stop following when undone."""
        stack.callback(agent.feed.follow(view))

    async def writer_start() -> None:
        agent.writer.start(asyncio.get_running_loop())

    async def writer_stop() -> None:
        # Last of all: every queued commit is written before the agent exits.
        await asyncio.to_thread(agent.writer.close)
        event(log, "agent_stopped", commits=agent.writer.commits, batches=agent.writer.batches)

    async def state_start() -> None:
        await _load_state(agent)

    async def health_start() -> None:
        follow(agent.health)
        await agent.health.start()

    async def reaper_start() -> None:
        follow(agent.reaper)
        agent.reaper.start()

    async def tombstones_start() -> None:
        follow(agent.tombstones)
        agent.tombstones.start()

    async def route_problems_start() -> None:
        follow(agent.route_problems)

    result = [
        Stage("state writer", writer_start, writer_stop),
        Stage("state", state_start, _nothing),
        Stage("health reports", _nothing, agent.health_recorder.stop),
        Stage("health checks", health_start, agent.health.stop),
        Stage("drain reaper", reaper_start, agent.reaper.stop),
        Stage("tombstone reaper", tombstones_start, agent.tombstones.stop),
        Stage("route problems", route_problems_start, _nothing),
    ]
    if (dns := agent.dns) is not None:

        async def dns_start() -> None:
            assert dns is not None
            follow(dns)
            with binding("dns", ("udp", "tcp"), dns.settings.host, dns.settings.port):
                await dns.start()

        result.append(Stage("dns", dns_start, dns.stop))
        if config.configure_resolver:
            result.append(_host_resolver_stage(agent))
    if (feed_server := agent.feed_server) is not None:
        result.append(Stage("feed socket", feed_server.start, feed_server.stop))
    if (dns_workers := agent.dns_workers) is not None:

        async def dns_workers_start() -> None:
            assert dns_workers is not None
            dns_workers.start()

        result.append(Stage("dns workers", dns_workers_start, dns_workers.stop))

    async def lb_start() -> None:
        # Ops made while the backend starts wait in the driver's queue.
        follow(agent.lb)
        await agent.lb.start()

    result.append(Stage("load balancer", lb_start, agent.lb.close))
    if (lb_healthz := agent.lb_healthz) is not None:

        async def lb_healthz_start() -> None:
            assert lb_healthz is not None
            with binding("lb-healthz", ("tcp",), lb_healthz.host, lb_healthz.port):
                await lb_healthz.start()

        result.append(Stage("lb health listener", lb_healthz_start, lb_healthz.stop))
    if (http := agent.http) is not None:

        async def http_start() -> None:
            assert http is not None
            follow(http)
            await _start_http(agent)

        result.append(Stage("http routing mesh", http_start, http.stop))

    if (sandboxes := agent.sandboxes) is not None:

        async def sandboxes_start() -> None:
            # After DNS and the LB: the start's reconciliation opens every sandbox's
            # resolver and VIPs on them. A clean stop leaves the sandboxes in place.
            assert sandboxes is not None
            follow(sandboxes)
            await sandboxes.start()

        result.append(Stage("sandboxes", sandboxes_start, sandboxes.stop))

    async def gossip_start() -> None:
        with binding("gossip", ("udp", "tcp"), config.advertise.host, config.advertise.port):
            await agent.gossip.start()
        event(
            log,
            "gossip_listening",
            address=str(config.advertise),
            profile=config.gossip_profile,
            encrypted=agent.gossip.keyring is not None,
            incarnation=agent.incarnation,
        )

    async def cluster_start() -> None:
        follow(agent.cluster)
        await agent.cluster.join(
            config.join,
            SeedResolver(config.join_resolvers),
            max_rounds=config.retry_join_max,
            on_give_up=agent.stopping.fail,
        )

    async def api_start() -> None:
        await agent.api.setup()
        api = config.api
        site = web.TCPSite(
            agent.api, api.host, api.port, reuse_address=True, ssl_context=agent.api_ssl
        )
        with binding("api", ("tcp",), api.host, api.port):
            await site.start()
        if config.api_token_file is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_tokens, agent)
        tokens = agent.api.app[DEPS].access.tokens
        event(
            log,
            "api_listening",
            address=str(api),
            tls=config.api_tls,
            mtls=config.api_tls_ca is not None,
            read_tokens=tokens.count(Scope.READ),
            write_tokens=tokens.count(Scope.WRITE),
        )
        _warn_if_others_read(config.api_token_file)
        if not api.is_loopback and not config.api_tls:
            event(
                log,
                "api_plaintext",
                logging.WARNING,
                address=str(api),
                hint="--api-insecure: requests and their tokens cross the network in clear",
            )

    async def api_stop() -> None:
        if config.api_token_file is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await agent.api.cleanup()

    result += [
        Stage("gossip", gossip_start, agent.gossip.stop),
        Stage("cluster", cluster_start, agent.cluster.leave),
        # Last: nothing is answered before the state is whole.
        Stage("api", api_start, api_stop),
    ]
    return result


def _warn_if_others_read(path: Path | None) -> None:
    """One warning when every user of the host may read the token file (mode o+r)."""
    if path is None:
        return
    with contextlib.suppress(OSError):  # it was read a moment ago; gone now is no news
        mode = path.stat().st_mode
        if mode & stat.S_IROTH:
            event(
                log,
                "api_token_file_readable",
                logging.WARNING,
                file=str(path),
                mode=oct(stat.S_IMODE(mode)),
                hint="every user of this host can read the API tokens: chmod o-r",
            )


def _reload_tokens(agent: Agent) -> None:
    """SIGHUP: read --api-token-file again and use it from the next request on; a file
    that does not parse keeps the tokens in use (the line says why, never a token)."""
    config = agent.config
    access = agent.api.app[DEPS].access
    try:
        fresh = read_api_tokens(config.api_token, config.api_token_file)
    except ConfigError as exc:
        event(log, "api_tokens_reload_failed", logging.WARNING, error=str(exc), kept="previous")
        return
    access.tokens = fresh
    event(
        log,
        "api_tokens_reloaded",
        read_tokens=fresh.count(Scope.READ),
        write_tokens=fresh.count(Scope.WRITE),
    )


def _host_resolver_stage(agent: Agent) -> Stage:
    """Once the DNS server answers: the host's resolver asks it for the mesh's names."""
    config = agent.config
    assert config.dns is not None and config.dns_domain
    host = HostResolver(config.data_dir, config.dns_domain, config.dns)

    async def start() -> None:
        try:
            mode = await asyncio.to_thread(host.apply)
        except (ResolverConfigError, OSError) as exc:
            raise MeshStartError(f"--configure-resolver: {exc}") from None
        event(log, "host_resolver_configured", mode=mode, domain=config.dns_domain)

    async def stop() -> None:
        restored = await asyncio.to_thread(host.undo)
        if restored:
            event(log, "host_resolver_restored", mode=restored)

    return Stage("host resolver", start, stop)


async def _load_state(agent: Agent) -> None:
    """The state from disk into the store, the ingress network, this start's incarnation."""
    config, loaded, store = agent.config, agent.loaded, agent.store
    store.load(loaded.records, loaded.clock)
    previous = loaded.meta.get("node_name")
    if previous and previous != config.node_name:
        event(
            log,
            "node_renamed",
            logging.WARNING,
            previous=previous,
            now=config.node_name,
            hint="tasks registered before keep the old name",
        )
    ingress = _ensure_ingress(agent)
    if agent.vtep is not None:
        # This node serves overlays: its own record (VTEP, an address on each overlay).
        ingress += store.serve_overlays(agent.vtep)
    await agent.writer.write(
        [c.after for c in ingress],
        store.clock,
        {"node_name": config.node_name, "incarnation": str(agent.incarnation)},
    )
    event(
        log,
        "state_loaded",
        records=len(loaded.records),
        skipped=loaded.skipped,
        clock=store.clock,
        data_dir=config.data_dir,
    )


def _ensure_ingress(agent: Agent) -> list[Change]:
    """The ingress network as --ingress-subnet asks, or a /16 of the pool; one that
    exists (a data dir of an older agent may hold a /24) is kept as it is."""
    store = agent.store
    asked = agent.config.ingress_subnet
    mismatch = store.ingress_mismatch(asked)
    if mismatch is not None:
        raise MeshStartError(mismatch)
    try:
        created = store.ensure_ingress(asked)
    except MeshError as exc:
        raise MeshStartError(f"--ingress-subnet {asked}: {exc.message}") from None
    ingress = store.network(INGRESS)
    event(
        log,
        "ingress_network",
        subnet=ingress.subnet,
        created=bool(created),
        capacity=capacity_of(ipaddress.IPv4Network(ingress.subnet)),
    )
    return created


async def _start_http(agent: Agent) -> None:
    http = agent.http
    assert http is not None
    server = agent.feed_server

    async def feed_socket() -> str:
        assert server is not None, "made by build when worker processes need it"
        return str(server.path)

    try:
        await http.start(feed_socket)
    except OSError as exc:
        failed = _failed_http_listener(agent)
        if failed is None:
            raise
        role, host, port = failed
        with binding(role, ("tcp",), host, port):
            raise exc from None


def _failed_http_listener(agent: Agent) -> tuple[str, str, int] | None:
    """Which of the routing mesh's two listeners failed to bind (None: both were,
    the failure came after). The HTTPS one is bound only once the HTTP one is: in
    the agent's loop, where start() does nothing but bind, its TLS listener exists
    only then; for workers, the ports are reserved in that order."""
    http = agent.http
    assert http is not None
    ends = http.endpoints
    service = http.service
    if service is not None:
        bound = 0 if service.tls is None else 1
    else:
        bound = len(http._reserved)
        if bound == (1 if ends.https_host is None else 2):
            return None  # e.g. the workers failed to start
    if bound and ends.https_host is not None:
        return "https", ends.https_host, ends.https_port
    return "http", ends.host, ends.port
