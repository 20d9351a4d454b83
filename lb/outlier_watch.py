"""The asyncio shell of passive outlier detection (the core: lb/outlier.py).

Runs on the nftables backend only: IPVS keeps its own connection table (and
`expire_nodest_conn` drops a removed real's flows), and the userspace proxy
connects to the task itself, so a connect that fails there is retried on
another real already (lb/userspace). While the table has reals of other nodes
(none: no reading at all, the task sleeps until the table changes) it reads
the unanswered flows every `interval` seconds, checks each candidate real with
`CHECK_TRIES` TCP connects at once from this node (`CHECK_TIMEOUT` each: any
answer, a refusal or a reset too, means alive), and ejects the dead through the
failover filter (lb/failover.py: the same path as a hidden node's reals, the
last real of weight > 0 kept, the removed flows flushed by the backend). An
ejected real is checked again every second and comes back once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from lb.failover import SuspectFilter
from lb.outlier import OutlierDetector, Unanswered
from lb.table import Op, Real, Table, VirtualKey, VirtualService
from mesh.core.logs import event

log = logging.getLogger("lb")

#: seconds from one reading of the unanswered flows to the next while the table has
#: remote reals (a reading takes a few ms: a netlink dump on a worker thread)
INTERVAL = 0.1
#: one direct check: this many connects at once, each given this long
CHECK_TRIES = 2
CHECK_TIMEOUT = 0.3


class FlowReader(Protocol):
    """Reads the unanswered flows to a table's reals (lb/nft/unanswered.py)."""

    truncated: int  # readings cut short at the cap

    async def read(self, table: Mapping[VirtualKey, VirtualService]) -> list[Unanswered]: ...


async def answers(real: Real, within: float = CHECK_TIMEOUT, tries: int = CHECK_TRIES) -> bool:
    """Whether `real` answers a TCP connect from here within `within` s (of `tries` at once)."""

    async def one() -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(real.address, real.port), within
            )
        except TimeoutError:
            return False
        except ConnectionError:  # refused, reset: the host is there
            return True
        except OSError:  # unreachable: nobody there
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return any(await asyncio.gather(*(one() for _ in range(tries))))


class OutlierWatch:
    def __init__(
        self,
        failover: SuspectFilter,
        emit: Callable[[list[Op]], None],
        reader: FlowReader,
        local_node: str,
        detector: OutlierDetector | None = None,
        check: Callable[[Real], Awaitable[bool]] = answers,
        interval: float = INTERVAL,
    ) -> None:
        self.failover = failover
        self.emit = emit
        self.reader = reader
        self.local_node = local_node
        self.detector = detector or OutlierDetector()
        self.check = check
        self.interval = interval
        self.poll_errors = 0
        self._wake = asyncio.Event()
        self._wake.set()
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._seen_generation = -1
        self._retained_generation = -1
        self._table: Table = {}
        self._remote = False

    def table_changed(self) -> None:
        """The table changed: look again whether it has remote reals."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._checks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._checks.clear()

    def _snapshot(self) -> tuple[Table, bool]:
        """The programmed table and whether it has remote reals, rebuilt only when the
        filter's generation moved: a reading every 0.1 s costs no O(reals) copy."""
        if self._seen_generation != self.failover.generation:
            self._seen_generation = self.failover.generation
            self._table = self.failover.table()
            self._remote = any(
                self.failover.is_remote(r, self.local_node) for r in self.failover.reals()
            )
        return self._table, self._remote

    def _has_remote_reals(self) -> bool:
        return self._snapshot()[1]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if self._retained_generation != self.failover.generation:
                # forget the reals the view no longer wants (O(reals): on a change only)
                self._retained_generation = self.failover.generation
                for real in self.detector.retain(self.failover.reals()):
                    self.emit(self.failover.restore(real))
            if not self._has_remote_reals() and not self.detector.ejected:
                await self._wake.wait()  # idle: nothing read until the table changes
                continue
            started = loop.time()
            try:
                flows = await self.reader.read(self._snapshot()[0])
            except Exception as exc:  # a kernel that refuses: counted, tried again
                self.poll_errors += 1
                log.debug("reading the unanswered flows failed: %s", exc)
                flows = []
            now = loop.time()
            for real in self.detector.observe(now, flows):
                self._spawn(real)
            for real in self.detector.due_rechecks(now):
                self._spawn(real)
            # the next reading: an interval on, or as a flow seen reaches the threshold
            wake = started + self.interval
            due = self.detector.next_due()
            if due is not None:
                wake = min(wake, due + 0.005)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    def _spawn(self, real: Real) -> None:
        task = asyncio.get_running_loop().create_task(self._check(real))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, real: Real) -> None:
        try:
            alive = await self.check(real)
        except Exception as exc:  # a check that cannot run says nothing: alive
            log.debug("checking %s failed: %s", real, exc)
            alive = True
        now = asyncio.get_running_loop().time()
        since = self.detector.unanswered_since(real)
        can_eject = self.failover.can_eject(real)
        verdict = self.detector.checked(real, alive, now, can_eject=can_eject)
        if verdict == "eject":
            self.emit(self.failover.eject(real))
            event(
                log,
                "lb_real_ejected",
                logging.WARNING,
                real=str(real),
                reason="unanswered, and a direct connect too",
                unanswered_for=None if since is None else round(now - since, 3),
            )
        elif verdict == "restore":
            self.emit(self.failover.restore(real))
            event(log, "lb_real_restored", real=str(real))

    def counts(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.detector.counts()),
            "poll_errors": self.poll_errors,
            "truncated": self.reader.truncated,
        }
