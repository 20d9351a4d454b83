"""`mesh agent`: the composition root of one node.

Start-up order: read the config; lock the data dir (one agent per data dir,
before anything touches it or binds a port); load the durable state; build
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
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from gossip.security import KeyringError
from lb.fds import raise_open_file_limit
from mesh.agent.build import Agent, MeshStartError, Stopping, build
from mesh.agent.lifetime import enter, stages
from mesh.agent.sdnotify import Notifier, watchdog_interval
from mesh.config import AgentConfig, ConfigError, describe, load_config
from mesh.core.logs import event, setup
from mesh.state import persist
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
        event(log, "agent_ready", node=config.node_name, api=config.api)
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
        await asyncio.sleep(interval)


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
