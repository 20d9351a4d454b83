"""`mesh agent`: the composition root of one node.

Start-up order: read the config; lock the data dir (one agent per data dir,
before anything touches it or binds a port); check its format version
(`mesh.state.dataformat`: migrate an older layout, refuse a newer one); settle the
gossip keys (secure by default, `mesh.gossip_keys`: the data dir's keyring, made at
a first start or from a join token); load the durable state; build
every part from the config, once, in dependency order (`mesh.agent.build`:
nothing is wired into a part after it is made); then enter the parts in order
(`mesh.agent.lifetime`): start the state writer; load the state into the store
and make sure the built-in `ingress` network exists; start the health runner
and the two reapers, the DNS server, the feed socket and the worker processes,
the load balancer, the HTTP routing mesh, the sandbox manager (where the
agent may make namespaces: it reconciles the kernel with the state first),
gossip (then join the cluster),
each view following the change feed (snapshot, then every change) right
before it starts; bind the HTTP API last, so nothing is answered before the
state is whole.

Every part's cleanup is pushed on one AsyncExitStack as it is entered. A
start that fails anywhere undoes what was entered, in reverse order; so does
the stop (SIGTERM, SIGINT, or a failed disk): stop accepting requests, leave
the cluster, stop the listeners and the checks, then let the writer finish
every queued commit.

Under systemd (`Type=notify`, deploy/meshplane.service) the agent says
`READY=1` once every part is entered (the API answers) and the HRM's worker
processes, if any, listen (bounded: 15 s, then a warning), pings `WATCHDOG=1` at
half of `WATCHDOG_USEC` from its event loop, and says `STOPPING=1` when the stop
begins (`mesh.agent.sdnotify`).

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
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from gossip.security import KeyringError
from lb.fds import raise_open_file_limit
from mesh import gossip_keys
from mesh.agent.build import Agent, MeshStartError, Stopping, build
from mesh.agent.lifetime import enter, stages
from mesh.agent.sdnotify import Notifier, watchdog_interval
from mesh.config import AgentConfig, ConfigError, describe, load_config
from mesh.core import upkeep
from mesh.core.heap import freeze_startup_heap
from mesh.core.logs import event, setup
from mesh.core.net import HostPort
from mesh.hostresolver import HostResolver
from mesh.state import dataformat, persist
from mesh.state.lock import DataDirError, lock_data_dir

__all__ = ["MeshStartError", "main", "run"]

log = logging.getLogger("mesh.agent")

#: seconds READY=1 waits for the HRM's worker processes to listen
WORKERS_READY_TIMEOUT = 15.0


async def run(config: AgentConfig) -> int:
    stopping = Stopping()
    notifier = Notifier.from_environment()
    interval = watchdog_interval(os.environ, os.getpid())
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)  # for this process only, not the ones it starts
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.stop)
    event(log, "agent_starting", **describe(config))
    async with contextlib.AsyncExitStack() as stack:
        try:
            loaded = await asyncio.to_thread(persist.load, config.data_dir)
            agent = build(config, loaded, stopping)
            await enter(stages(agent, stack), stack)
        except Exception as exc:  # a port in use, an unreadable data dir, or a bug: stop cleanly
            known = isinstance(exc, OSError | persist.PersistError | KeyringError | MeshStartError)
            reason = str(exc) if known else f"start failed: {exc!r} (a bug: see the log)"
            reason = " ".join(reason.splitlines())  # one line, whatever the error held
            event(log, "agent_start_failed", logging.ERROR, error=reason)
            if not known:
                log.exception("start failed")
            await stack.aclose()
            # The last word, in one line, after the log lines of the stop.
            print(f"mesh agent: {reason}", file=sys.stderr, flush=True)
            notifier.notify(f"STATUS=start failed: {reason}")
            notifier.close()
            return 1
        await _workers_serving(agent)
        frozen = freeze_startup_heap()
        event(log, "agent_ready", node=config.node_name, api=config.api, frozen_objects=frozen)
        # Every part is entered, the API last: systemd may start what needs the agent.
        notifier.notify("READY=1", f"STATUS=serving, API on {config.api}", f"MAINPID={os.getpid()}")
        watchdog = None
        if notifier.enabled and interval is not None:
            watchdog = asyncio.create_task(_watchdog(notifier, interval))
            event(log, "watchdog_enabled", interval=interval)
        await stopping.wait()
        event(log, "agent_stopping")
        notifier.notify("STOPPING=1", "STATUS=stopping")
        if watchdog is not None:
            watchdog.cancel()
    notifier.close()
    return stopping.exit_code


def _restore_host_resolver(config: AgentConfig) -> None:
    """A run killed with the host's resolver pointed at it left a backup: put the
    resolver back first (before the DNS server reads its upstreams from it)."""
    host = HostResolver(config.data_dir, config.dns_domain or "", HostPort("127.0.0.11", 53))
    try:
        restored = host.undo()
    except OSError as exc:
        event(log, "host_resolver_restore_failed", logging.ERROR, error=str(exc))
        return
    if restored:
        event(log, "host_resolver_restored", logging.WARNING, mode=restored, after="crash")


def _log_migration(step: dataformat.Migration) -> None:
    event(log, "data_dir_migrated", source=step.source, to=step.source + 1, what=step.what)


def with_gossip_keys(config: AgentConfig) -> AgentConfig:
    """The config with the keyring file and label gossip runs with, settled from the
    flags and the data dir (which this may write: the data dir is locked)."""
    keys = gossip_keys.resolve(
        config.data_dir,
        keyring=config.keyring,
        token=config.join_token,
        insecure=config.insecure_gossip,
        joins=bool(config.join),
        label=config.cluster_label,
        fresh=not (config.data_dir / persist.DB_NAME).exists(),
    )
    if keys.keyring is None:
        event(
            log,
            "gossip_insecure",
            logging.WARNING,
            reason="--insecure-gossip: gossip is plaintext, readable and forgeable by anyone "
            "on the network",
        )
    else:
        event(log, "gossip_keyring", source=keys.source, path=keys.keyring)
        if keys.token_ignored:
            event(
                log,
                "gossip_token_ignored",
                logging.WARNING,
                reason="the data dir's keyring, which wins, lacks the join token's key",
                path=keys.keyring,
            )
        if not (config.gossip_verify_incoming and config.gossip_verify_outgoing):
            event(
                log,
                "gossip_partly_plaintext",
                logging.WARNING,
                verify_incoming=config.gossip_verify_incoming,
                verify_outgoing=config.gossip_verify_outgoing,
                reason="moving to encryption: turn both back on once every node has the key",
            )
    # The token has done its part: its keys are in the keyring file now.
    return dataclasses.replace(
        config, keyring=keys.keyring, cluster_label=keys.label, join_token=None
    )


async def _workers_serving(agent: Agent) -> None:
    """Wait (bounded) for the HRM's worker processes to listen: they start after the
    agent's own parts, and READY=1 means the node serves. (DNS workers share a port the
    agent itself answers on.) Past the bound, one warning and the agent goes on; a stop
    meanwhile ends the wait."""
    http = agent.http
    if http is None or http.workers == 0:
        return
    waits = [asyncio.create_task(http.serving.wait()), asyncio.create_task(agent.stopping.wait())]
    done, pending = await asyncio.wait(
        waits, timeout=WORKERS_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    if not done:
        event(log, "http_workers_not_ready", logging.WARNING, waited=WORKERS_READY_TIMEOUT)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds, from the event loop: a loop that hangs stops
    pinging, and systemd restarts the agent (WatchdogSec=)."""
    while True:
        notifier.notify("WATCHDOG=1")
        await upkeep.sleep(interval)  # rides a wake-up taken anyway (mesh.core.upkeep)


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
        # Under the lock, before anything reads the state: migrate an older layout,
        # refuse a newer one.
        try:
            outcome = dataformat.ensure(config.data_dir, on_step=_log_migration)
        except (dataformat.FormatError, OSError) as exc:
            reason = f"{config.data_dir}: {exc}"
            event(log, "agent_start_failed", logging.ERROR, error=reason)
            print(f"mesh agent: {reason}", file=sys.stderr)
            return 1
        event(log, "data_dir_format", found=outcome.found, version=outcome.version)
        _restore_host_resolver(config)
        # Every forwarded query, proxied connection and check holds a descriptor: allow many.
        soft, hard = raise_open_file_limit()
        event(log, "open_file_limit", soft=soft, hard=hard)
        try:
            config = with_gossip_keys(config)
        except (gossip_keys.GossipKeysError, KeyringError, OSError) as exc:
            event(log, "agent_start_failed", logging.ERROR, error=str(exc))
            print(f"mesh agent: {exc}", file=sys.stderr, flush=True)
            return 1
        return uvloop.run(run(config))
    finally:
        lock.release()
