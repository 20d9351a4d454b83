"""The agent's side of L4: the view follows the change feed, the backend follows the view.

`LbDriver` is a view of the change feed (`mesh.core.view.View`): `load` takes
the snapshot, and `start` starts the backend with the table the view gives
then; from then on `on_change` (called synchronously in feed order) turns each
change into ops and queues them (changes made while the backend starts wait
in the queue), and
one task applies the queued batches in order, so the backend sees exactly the
sequence the view emitted. A `BackendError` is logged and counted, never fatal:
one entry the kernel refuses must not stop the others.

Sandboxes (issue 15): `open_sandbox(key, netns, networks)` adds a `SandboxLb`
(lb/sandbox.py) that follows the same view, each batch of ops filtered to the
VIPs of the sandbox's networks; `close_sandbox(key)` removes its table. Their
work goes through the same queue, in feed order with the node's, so `settled()`
covers it too; a sandbox's failure is counted against that sandbox and never
stops the node's backend or another sandbox. A namespace that vanished (its
task removed before the manager called `close_sandbox`, a container gone) is
dropped and counted in `sandboxes_vanished`.

`open_sandbox` and `close_sandbox` are synchronous and may be called from any
thread (the sandbox manager's kernel worker, for one): off the event loop's
thread they hop onto it (and wait until it has queued the work), since the
view is the loop's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lb.backend import Backend, BackendError
from lb.failover import SuspectFilter
from lb.outlier_watch import FlowReader, OutlierWatch
from lb.sandbox import SandboxLb
from lb.servicestats import Sample, ServiceStats
from lb.table import DeleteService, Op, Table, VirtualKey
from lb.view import LbView
from mesh.core.logs import event
from mesh.core.model import Change, Record

log = logging.getLogger("lb")

#: How long a call from another thread waits for the event loop to take it.
ON_LOOP_TIMEOUT = 30.0
#: A reading of the backend's counters per service serves the scrapes of this long
#: (a kernel backend reads the kernel for it: scrapes cannot flood it).
SAMPLE_MAX_AGE = 1.0
#: A virtual service whose socket could not be made (its port held by another process,
#: or by a client connection's TIME_WAIT for a minute) is tried again after this long,
#: the wait doubling up to UNBOUND_RETRY_MAX while any is left: as kube-proxy keeps
#: trying a port it could not open, so the port serves once it is free.
UNBOUND_RETRY_FIRST = 1.0
UNBOUND_RETRY_MAX = 30.0


@dataclass(frozen=True, slots=True)
class _Job:
    """One piece of queued work: for the node's backend, or for one sandbox."""

    stage: str  # "apply", "start", "close": for the error log
    run: Callable[[], Awaitable[None]]
    sandbox: SandboxLb | None = None


class LbDriver:
    def __init__(
        self,
        view: LbView,
        backend: Backend,
        reason: str = "",
        desired: Callable[[], Table] | None = None,
        make_sandbox: Callable[[str, str, Sequence[str]], SandboxLb] = SandboxLb,
        suspect_hold: float = 0.5,
        outlier_reader: FlowReader | None = None,
    ) -> None:
        self.view = view
        #: the `--lb-healthz` listener's counters, shown in `GET /v1/lb`; None: not served
        self.healthz_stats: Callable[[], dict[str, int]] | None = None
        #: between the view and the backends: a suspect node's reals leave the table
        #: `suspect_hold` seconds into its suspicion (lb/failover.py)
        self.failover = SuspectFilter(suspect_hold)
        self._failover_timer: asyncio.TimerHandle | None = None
        self._unbound_timer: asyncio.TimerHandle | None = None
        self._unbound_wait = UNBOUND_RETRY_FIRST
        # The backend's unbound entries and their retry, looked up once: only the
        # userspace backend has sockets that can fail to bind (None: no retry to watch).
        has_retry = callable(getattr(backend, "retry_unbound", None))
        unbound = getattr(backend, "unbound", None)
        self._unbound_of: Callable[[], dict[str, str]] | None = (
            unbound if has_retry and callable(unbound) else None
        )
        #: sockets made by a retry after their first attempt failed
        self.unbound_rebound = 0
        #: passive outlier detection (lb/outlier.py; nftables only): reads the unanswered
        #: flows through `outlier_reader`; None: off
        self._outlier_reader = outlier_reader
        self.outliers: OutlierWatch | None = None
        self._make_sandbox = make_sandbox
        #: the table the state wants, built from scratch (not by the view): `mesh doctor`
        #: compares it with what the backend has programmed
        self._desired = desired or view.table
        self.backend = backend
        self.reason = reason
        self.errors = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._sandboxes: dict[str, SandboxLb] = {}
        #: failures programming sandboxes (each also counted on its sandbox)
        self.sandbox_errors = 0
        #: sandboxes dropped because their namespace was gone
        self.sandboxes_vanished = 0
        #: the L4 counters per service (`sample` fills it from the backend's readings)
        self.service_stats = ServiceStats()
        #: readings of the backend's counters that failed
        self.sample_errors = 0
        # Whose each virtual service was when the view last emitted ops for it: a
        # service removed takes its keys' ownership with it, and their last counts
        # still belong to it.
        self._key_owners: dict[VirtualKey, str] = {}
        self._sampled_at: float | None = None
        self._sample_lock = asyncio.Lock()

    def load(self, records: Iterable[Record]) -> None:
        records = list(records)
        self.view.load(records)
        self.failover.track_records(records)
        self.failover.load(self.view.table())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        desired = self.failover.table()
        self._note_owners(desired)
        try:
            await self.backend.start(desired)
        except BackendError as exc:
            self._failed("start", exc)
        self._worker = asyncio.get_running_loop().create_task(self._apply_forever())
        if self._outlier_reader is not None:
            self.outliers = OutlierWatch(
                self.failover, self._emit, self._outlier_reader, self.view.node
            )
            self.outliers.start()
        event(
            log,
            "lb_started",
            backend=self.backend.name,
            services=len(desired),
            reals=sum(len(s.reals) for s in desired.values()),
        )

    def on_change(self, change: Change) -> None:
        self.failover.track(change)
        self._emit(self.failover.apply(self.view.on_change(change)))

    def _emit(self, ops: list[Op]) -> None:
        """Queue ops for the node's backend and each sandbox's."""
        if not ops:
            return
        if self.outliers is not None:
            self.outliers.table_changed()
        self._note_owners(op.key for op in ops if not isinstance(op, DeleteService))
        self._put(_Job("apply", lambda: self.backend.apply(ops)))
        for sandbox in self._sandboxes.values():
            mine = sandbox.filter(ops, self.view.vip_network)
            if mine:
                self._put(_Job("apply", _applier(sandbox, mine), sandbox))

    def _put(self, job: _Job) -> None:
        self._idle.clear()
        self._queue.put_nowait(job)

    # -- member states (mesh/cluster.py's NodeWatch calls these, on the loop) ------------

    def node_suspected(self, node: str) -> None:
        """Gossip suspects `node`: its reals leave the table after the hold, unless
        it refutes first (`node_cleared`) or no other real would be left."""
        loop = asyncio.get_running_loop()
        self.failover.suspect(node, loop.time())
        self._schedule_failover(loop)

    def node_cleared(self, node: str, *, refuted: bool) -> None:
        """`node` is suspect no more: alive again (`refuted`: its reals come back), or
        dead or left (the state has hidden its tasks already)."""
        was_hidden = node in self.failover.hidden_nodes
        now = asyncio.get_running_loop().time()
        self._emit(self.failover.clear(node, refuted=refuted, now=now))
        if was_hidden:
            event(log, "lb_node_shown" if refuted else "lb_node_gone", node=node)

    def _failover_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._failover_timer = None
        before = self.failover.hidden_nodes
        self._emit(self.failover.tick(loop.time()))
        for node in sorted(self.failover.hidden_nodes - before):
            event(log, "lb_node_hidden", logging.WARNING, node=node, hold=self.failover.hold)
        self._schedule_failover(loop)

    def _schedule_failover(self, loop: asyncio.AbstractEventLoop) -> None:
        due = self.failover.next_due()
        if due is None:
            return
        if self._failover_timer is not None:
            if self._failover_timer.when() <= due:
                return
            self._failover_timer.cancel()
        self._failover_timer = loop.call_at(due, self._failover_tick)

    # -- sandboxes ------------------------------------------------------------------

    def open_sandbox(self, key: str, netns: str, networks: Sequence[str]) -> None:
        """Balance the VIPs of `networks` inside the namespace at `netns` (a path).

        Idempotent: opening a key again with the same namespace and networks does
        nothing; with other networks (its service joined or left one), the table
        is brought to the new set in place, touching only what differs; with
        another namespace, the old table is removed and a new one made. When it
        returns, the work is queued: `settled()` waits for it.
        """
        if self._off_loop():
            self._on_loop(self.open_sandbox, key, netns, tuple(networks))
            return
        networks = tuple(networks)
        sandbox = self._sandboxes.get(key)
        if sandbox is not None and sandbox.netns != netns:
            self.close_sandbox(key)
            sandbox = None
        if sandbox is None:
            sandbox = self._make_sandbox(key, netns, networks)
            self._sandboxes[key] = sandbox
        elif sandbox.networks == networks:
            return
        else:
            sandbox.rescope(networks)
        desired = sandbox.initial(self.failover.table(), self.view.vip_network)
        # `start` reads what the kernel has (a fresh namespace: nothing; a table
        # left by a previous run, or the old scope's: that) and changes only the rest.
        self._put(_Job("start", _starter(sandbox, desired), sandbox))

    def close_sandbox(self, key: str) -> None:
        """Remove the sandbox's table (idempotent; a vanished namespace is fine)."""
        if self._off_loop():
            self._on_loop(self.close_sandbox, key)
            return
        sandbox = self._sandboxes.pop(key, None)
        if sandbox is not None:
            self._put(_Job("close", sandbox.close, sandbox))

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` on the event loop's thread and wait until it has (the view is the loop's)."""
        assert self._loop is not None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn(*args)
                done.set_result(None)
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        done.result(timeout=ON_LOOP_TIMEOUT)

    def sandboxes(self) -> dict[str, SandboxLb]:
        return dict(self._sandboxes)

    def _off_loop(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running() and self._loop_thread != threading.get_ident()

    # -- the worker -------------------------------------------------------------------

    async def _apply_forever(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await job.run()
            except BackendError as exc:
                self._job_failed(job, exc)
            except Exception as exc:  # a backend bug: log it, keep the agent serving
                log.exception("lb backend %s failed", self.backend.name)
                self._job_failed(job, exc)
            self._watch_unbound()
            if self._queue.empty():
                self._idle.set()

    def _watch_unbound(self) -> None:
        """After each job: while the backend has services it could not make a socket
        for, a retry is due (`UNBOUND_RETRY_FIRST`, doubling); none left resets the wait."""
        if self._unbound_of is None:
            return
        if not self._unbound_of():
            self._unbound_wait = UNBOUND_RETRY_FIRST
            return
        if self._unbound_timer is None:
            loop = asyncio.get_running_loop()
            self._unbound_timer = loop.call_later(self._unbound_wait, self._retry_unbound)
            self._unbound_wait = min(self._unbound_wait * 2, UNBOUND_RETRY_MAX)

    def _retry_unbound(self) -> None:
        self._unbound_timer = None
        self._put(_Job("retry", self._rebind))  # queued: in order with the ops

    async def _rebind(self) -> None:
        for key in await self.backend.retry_unbound():  # type: ignore[attr-defined]
            self.unbound_rebound += 1
            event(log, "lb_listening_after_retry", key=str(key))

    def _job_failed(self, job: _Job, exc: Exception) -> None:
        sandbox = job.sandbox
        if sandbox is None:
            self._failed(job.stage, exc)
            return
        if sandbox.vanished():
            # Its task went with the namespace: nothing left to program or remove.
            if self._sandboxes.get(sandbox.key) is sandbox:
                del self._sandboxes[sandbox.key]
                self.sandboxes_vanished += 1
                event(log, "lb_sandbox_vanished", sandbox=sandbox.key, netns=sandbox.netns)
            return
        sandbox.errors += 1
        self.sandbox_errors += 1
        event(
            log,
            "lb_sandbox_error",
            logging.WARNING,
            sandbox=sandbox.key,
            stage=job.stage,
            error=str(exc),
            errors=sandbox.errors,
        )

    def _failed(self, stage: str, exc: Exception) -> None:
        self.errors += 1
        event(
            log,
            "lb_backend_error",
            logging.WARNING,
            backend=self.backend.name,
            stage=stage,
            error=str(exc),
            errors=self.errors,
        )

    async def settled(self) -> None:
        """Wait until every queued op has been applied."""
        await self._idle.wait()

    def counters(self) -> dict[str, Any]:
        """The backend's name, the ops it refused, its own counters (the userspace
        proxy's; a kernel backend has none here) and the counters per service as the
        last `sample` left them, read without touching the kernel: what `GET /metrics`
        exports."""
        stats = getattr(self.backend, "stats", None)
        return {
            "backend": self.backend.name,
            "errors": self.errors,
            "sandbox_errors": self.sandbox_errors,
            "sample_errors": self.sample_errors,
            "stats": stats() if callable(stats) else {},
            "services": self.service_stats.snapshot(),
        }

    # -- counters per service ---------------------------------------------------------

    def _note_owners(self, keys: Iterable[VirtualKey]) -> None:
        for key in keys:
            name = self.view.service_of(key)
            if name is not None:
                self._key_owners[key] = name

    def _owner(self, key: VirtualKey) -> str | None:
        return self.view.service_of(key) or self._key_owners.get(key)

    async def sample(self, max_age: float = SAMPLE_MAX_AGE) -> None:
        """Read the backend's counters per virtual service into `service_stats`, unless a
        reading younger than `max_age` seconds stands (concurrent scrapes share one).

        A backend without `service_counters` counts nothing per service. A failed
        reading is counted in `sample_errors` and tried again `max_age` later.
        """
        reader = getattr(self.backend, "service_counters", None)
        if reader is None:
            return
        async with self._sample_lock:
            now = time.monotonic()
            if self._sampled_at is not None and now - self._sampled_at < max_age:
                return
            self._sampled_at = now
            try:
                found = reader()
                sample: Sample = await found if inspect.isawaitable(found) else found
            except Exception as exc:  # a kernel that refuses: the last totals stand
                self.sample_errors += 1
                log.debug("reading the %s backend's counters failed: %s", self.backend.name, exc)
                return
        self.service_stats.fold(sample, self._owner)
        self.service_stats.retain(self.view.service_names())
        table = self.view.table()
        for key in [k for k in self._key_owners if k not in sample and k not in table]:
            del self._key_owners[key]

    async def describe(self) -> dict[str, Any]:
        """The table as programmed (read back from the backend), for `GET /v1/lb`."""
        table: Table = await self.backend.read()
        stats = getattr(self.backend, "stats", None)
        unbound = getattr(self.backend, "unbound", None)
        return {
            "backend": self.backend.name,
            "reason": self.reason,
            "errors": self.errors,
            "pending": self._queue.qsize(),
            "stats": stats() if callable(stats) else {},
            "unbound": unbound() if callable(unbound) else {},
            "unbound_rebound": self.unbound_rebound,
            "services": render(table),
            # the state's table as the failover filter would program it now
            "desired": render(self.failover.visible(self._desired())),
            "failover": dataclasses.asdict(self.failover.counts()),
            **({} if self.outliers is None else {"outliers": self.outliers.counts()}),
            "sandboxes": [
                {
                    "key": key,
                    "netns": sandbox.netns,
                    "networks": list(sandbox.networks),
                    "errors": sandbox.errors,
                    "vips": len(sandbox.scope.keys),
                }
                for key, sandbox in sorted(self._sandboxes.items())
            ],
            "sandbox_errors": self.sandbox_errors,
            "sandboxes_vanished": self.sandboxes_vanished,
            "sample_errors": self.sample_errors,
            **({} if self.healthz_stats is None else {"healthz": self.healthz_stats()}),
        }

    async def close(self) -> None:
        """Stop; the node's backend removes its objects, sandboxes keep their tables
        (the sandboxes outlive the agent; the next start reconciles each)."""
        for sandbox in self._sandboxes.values():
            await sandbox.abandon()
        self._sandboxes.clear()
        if self._failover_timer is not None:
            self._failover_timer.cancel()
            self._failover_timer = None
        if self._unbound_timer is not None:
            self._unbound_timer.cancel()
            self._unbound_timer = None
        if self.outliers is not None:
            await self.outliers.close()
            self.outliers = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        try:
            await self.backend.close()
        except BackendError as exc:
            self._failed("close", exc)


def render(table: Table) -> list[dict[str, Any]]:
    """A table as `GET /v1/lb` shows it."""
    return [
        {
            "protocol": key.protocol,
            "address": key.address,
            "port": key.port,
            "scheduler": str(service.options.scheduler),
            "proxy_protocol": service.options.proxy_protocol,
            "traffic_policy": "local" if service.options.local else "cluster",
            "affinity": service.options.affinity,
            "reals": [
                {"address": real.address, "port": real.port, "weight": service.reals[real]}
                for real in sorted(service.reals)
            ],
        }
        for key, service in sorted(table.items())
    ]


def _starter(sandbox: SandboxLb, desired: Table) -> Callable[[], Awaitable[None]]:
    return lambda: sandbox.start(desired)


def _applier(sandbox: SandboxLb, ops: list[Op]) -> Callable[[], Awaitable[None]]:
    return lambda: sandbox.apply(ops)
