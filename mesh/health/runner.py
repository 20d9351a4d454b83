"""The asyncio shell around `HealthPlanner`: it runs the probes and one timer, nothing else.

Every input (a change, a heartbeat, a probe result, the timer) goes into the
planner with the time; the transitions that come out are handed to `report`,
and the single timer is re-armed at the planner's next deadline. Probes run
as their own asyncio tasks, at most `max_concurrent` at once, each bounded by
its check's `timeout`, so one slow task cannot hold up the checks of others.

`report` is called synchronously, after the planner has taken the input
whole: the agent's `report` writes to the store, whose feed calls `on_change`
straight back, and that re-entry finds the planner in a consistent state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp
from yarl import URL

from lb.fds import is_fd_shortage
from mesh.core.logs import event
from mesh.core.model import KIND_OF, Change, Health, HealthCheck, Record
from mesh.health.core import HealthPlanner, ProbeOrder, Transition

log = logging.getLogger(__name__)

Report = Callable[[str, Health, str], None]
#: probes in flight at once; more wait their turn (a node rarely runs this many tasks).
MAX_CONCURRENT_PROBES = 64
USER_AGENT = "meshplane-health/1"


class HealthRunner:
    """Checks the tasks that `node` owns and reports each change of their health.

    `loop_time` is the monotonic clock of the schedule (default time.monotonic);
    the wall clock (time.time) is read only to place a task's `created_at`.
    """

    def __init__(
        self,
        node: str,
        report: Report,
        *,
        loop_time: Callable[[], float] | None = None,
        max_concurrent: int = MAX_CONCURRENT_PROBES,
    ) -> None:
        self.planner = HealthPlanner(node)
        self._report = report
        self._now = loop_time or time.monotonic
        self._limit = asyncio.Semaphore(max_concurrent)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: the planner deadline `_timer` was armed for
        self._armed_for: float | None = None
        self._probes: set[asyncio.Task[None]] = set()
        #: probes not made for want of descriptors here: no verdict on their tasks
        self.fd_shortage = 0

    def __repr__(self) -> str:
        state = "running" if self._session is not None else "stopped"
        return f"<HealthRunner {state} probes={len(self._probes)} {self.planner!r}>"

    # -- inputs ----------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """The state to check (networks, then services, then tasks: a task's check
        lives on its service); before `start` too."""
        for record in records:
            self.on_change(Change(KIND_OF[type(record)], record.key, None, record))

    def on_change(self, change: Change) -> None:
        """Follow the change feed (every change, in order; before `start` too)."""
        self._emit(self.planner.on_change(change, self._now(), time.time()))
        self._rearm()

    def heartbeat(self, task_id: str, healthy: bool, output: str) -> None:
        """A task's report through `PUT /v1/tasks/{id}/health` (a ttl heartbeat or not)."""
        self._emit(_some(self.planner.report(task_id, healthy, output, self._now())))
        self._rearm()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self._loop = asyncio.get_running_loop()
        # No keep-alive: a pooled connection to a task could outlive the task's listener.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": USER_AGENT}, auto_decompress=False
        )
        self._rearm()

    async def stop(self) -> None:
        """Cancel the timer and every probe in flight, then close the HTTP session."""
        session, self._session = self._session, None
        self._rearm()
        for probe in self._probes:
            probe.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        if session is not None:
            await session.close()

    # -- the shell -------------------------------------------------------------------

    def _rearm(self) -> None:
        """Point the one timer at the planner's next deadline (or nowhere)."""
        deadline = self.planner.next_deadline()
        if self._session is None or self._loop is None or deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if deadline == self._armed_for:
                return  # most changes (every task of the cluster) leave the deadline be
            self._timer.cancel()
        self._armed_for = deadline
        delay = max(0.0, deadline - self._now())
        self._timer = self._loop.call_later(delay, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        self._timer = None
        # The loop may fire a hair early (its clock resolution): the deadline has come.
        now = max(self._now(), deadline)
        self._emit(self.planner.expire(now))
        for order in self.planner.due(now):
            self._spawn(order)
        self._rearm()

    def _spawn(self, order: ProbeOrder) -> None:
        assert self._loop is not None
        probe = self._loop.create_task(self._run_probe(order))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)

    async def _run_probe(self, order: ProbeOrder) -> None:
        try:
            async with self._limit:
                passed, output = await self._probe(order)
        except asyncio.CancelledError:
            self.planner.abandon(order)  # so a later `start` probes this task again
            raise
        if passed is None:  # this node's shortage of descriptors: the task is not at fault
            if not self.fd_shortage:
                event(
                    log,
                    "health_probe_fd_shortage",
                    logging.WARNING,
                    task=order.task_id,
                    output=output,
                )
            self.fd_shortage += 1
            self.planner.postpone(order, self._now())
        else:
            self._emit(_some(self.planner.record_probe(order, passed, output, self._now())))
        self._rearm()

    async def _probe(self, order: ProbeOrder) -> tuple[bool | None, str]:
        """The probe's verdict, or None when this node could not make a socket for it."""
        if order.port is None:
            return False, "no port to check"
        try:
            if order.check.type == "http":
                assert self._session is not None
                return await probe_http(self._session, order.host, order.port, order.check)
            return await probe_tcp(order.host, order.port, order.check)
        except Exception as exc:  # a probe that breaks is a failed probe, not a dead runner
            if is_fd_shortage(exc):
                return None, f"no descriptor for the probe: {exc}"
            event(log, "health_probe_error", logging.WARNING, task=order.task_id, error=repr(exc))
            return False, f"probe error: {exc!r}"

    def _emit(self, transitions: Iterable[Transition]) -> None:
        for t in transitions:
            event(
                log,
                "health_transition",
                logging.DEBUG,
                task=t.task_id,
                health=t.health.value,
                output=t.output,
            )
            try:
                self._report(t.task_id, t.health, t.output)
            except Exception:  # the agent's trouble must not stop the checks
                log.exception("event=health_report_failed task=%s", t.task_id)


async def probe_http(
    session: aiohttp.ClientSession, host: str, port: int, check: HealthCheck
) -> tuple[bool, str]:
    """GET the check's path; pass iff the status is in [status_min, status_max].

    Redirects are not followed: a 3xx is itself the answer (as Consul and Docker's curl).
    """
    url = _url(host, port, check.path)
    try:
        async with session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=check.timeout)
        ) as response:
            status = response.status
    except TimeoutError:
        return False, f"GET {url}: timed out after {check.timeout:g} s"
    except aiohttp.ClientError as exc:
        if is_fd_shortage(exc):
            raise  # this node's shortage, not the task's failure (see HealthRunner._probe)
        return False, f"GET {url}: {str(exc) or type(exc).__name__}"
    return check.status_min <= status <= check.status_max, f"HTTP {status}"


async def probe_tcp(host: str, port: int, check: HealthCheck) -> tuple[bool, str]:
    """Pass iff a TCP connection opens within the check's `timeout`; it is closed at once."""
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return False, f"connect {host}:{port}: timed out after {check.timeout:g} s"
    except OSError as exc:
        if is_fd_shortage(exc):
            raise  # this node's shortage, not the task's failure (see HealthRunner._probe)
        return False, f"connect {host}:{port}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"connected to {host}:{port}"


def _url(host: str, port: int, path: str) -> URL:
    path, _, query = path.partition("?")
    return URL.build(
        scheme="http",
        host=host,
        port=port,
        path=path if path.startswith("/") else "/" + path,
        query_string=query,
    )


def _some(transition: Transition | None) -> list[Transition]:
    return [] if transition is None else [transition]
