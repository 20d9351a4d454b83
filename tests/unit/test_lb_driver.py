"""The agent's LB driver: view ops reach the backend in order; a refused op is counted."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lb.backend import BackendError
from lb.driver import LbDriver
from lb.table import Op, PutReal, Table, apply_ops
from lb.view import LbView
from mesh.core.model import Change, Health, Kind, PortConfig, Service, Task

SERVICE = Service(
    name="web", id="s1", ports=(PortConfig(protocol="tcp", target_port=80, published_port=30080),)
)


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.table: Table = {}
        self.batches: list[list[Op]] = []
        self.started: Table | None = None
        self.closed = False
        self.refuse: set[str] = set()  # real addresses whose PutReal fails

    async def start(self, desired: Table) -> None:
        self.started = dict(desired)
        self.table = dict(desired)

    async def apply(self, ops: Sequence[Op]) -> None:
        self.batches.append(list(ops))
        refused = [op for op in ops if isinstance(op, PutReal) and op.real.address in self.refuse]
        apply_ops(self.table, [op for op in ops if op not in refused])
        if refused:
            raise BackendError(f"refused {refused}")

    async def read(self) -> Table:
        return dict(self.table)

    async def close(self) -> None:
        self.closed = True


def task(task_id: str, address: str) -> Task:
    return Task(
        id=task_id,
        name=f"web.1.{task_id}",
        service="web",
        slot=1,
        node="n1",
        address=address,
        health=Health.HEALTHY,
    )


async def test_ops_are_applied_in_order_and_errors_counted_not_fatal() -> None:
    backend = RecordingBackend()
    driver = LbDriver(LbView("n1"), backend, "test")
    first = task("a", "10.0.0.5")
    driver.load([SERVICE, first])
    await driver.start()
    assert backend.started == driver.view.table()
    backend.refuse = {"10.0.0.6"}
    driver.on_change(Change(Kind.TASK, "b", None, task("b", "10.0.0.6")))
    driver.on_change(Change(Kind.TASK, "c", None, task("c", "10.0.0.7")))
    driver.on_change(Change(Kind.TASK, "a", first, dataclasses.replace(first, deleted=True)))
    await driver.settled()
    assert len(backend.batches) == 3
    assert driver.errors == 1
    described = await driver.describe()
    assert described["errors"] == 1 and described["backend"] == "recording"
    reals = {(r["address"], r["weight"]) for r in described["services"][0]["reals"]}
    assert reals == {("10.0.0.7", 1)}
    await driver.close()
    assert backend.closed


class CountingBackend(RecordingBackend):
    """Counts per virtual service as a kernel backend would: read anew on each call."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.fail = False

    async def service_counters(self) -> dict[object, dict[str, int]]:
        self.reads += 1
        if self.fail:
            raise BackendError("the kernel said no")
        return {key: {"connections": 10 * self.reads} for key in self.table}


async def test_counters_per_service_are_read_at_most_once_a_second_and_go_with_it() -> None:
    backend = CountingBackend()
    driver = LbDriver(LbView("n1"), backend, "test")
    driver.load([SERVICE, task("a", "10.0.0.5")])
    await driver.start()
    await driver.sample()
    await driver.sample()  # a second scrape at once: the same reading
    assert backend.reads == 1
    assert driver.counters()["services"] == {"web": {"connections": 10}}
    await driver.sample(max_age=0)
    assert driver.counters()["services"] == {"web": {"connections": 20}}
    backend.fail = True
    await driver.sample(max_age=0)
    assert driver.sample_errors == 1
    assert driver.counters()["services"] == {"web": {"connections": 20}}  # the last stands
    backend.fail = False
    gone = dataclasses.replace(SERVICE, deleted=True)
    driver.on_change(Change(Kind.SERVICE, SERVICE.id, SERVICE, gone))
    await driver.settled()
    await driver.sample(max_age=0)
    assert driver.counters()["services"] == {}
    await driver.close()


class SquattedBackend(RecordingBackend):
    """A userspace-like backend whose one published port is held for `held` retries."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.held = held
        self.retries = 0
        self.waits: list[float] = []  # the driver's next wait, seen at each retry
        self.driver: LbDriver | None = None
        self._unbound = {"tcp/0.0.0.0:30080": "cannot listen: in use"}

    def unbound(self) -> dict[str, str]:
        return dict(self._unbound)

    async def retry_unbound(self) -> list[str]:
        assert self.driver is not None
        self.retries += 1
        self.waits.append(self.driver._unbound_wait)
        if self.retries <= self.held:
            return []
        bound, self._unbound = list(self._unbound), {}
        return bound


async def test_an_unbound_port_is_retried_backing_off_until_it_binds(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import lb.driver

    monkeypatch.setattr(lb.driver, "UNBOUND_RETRY_FIRST", 0.01)
    monkeypatch.setattr(lb.driver, "UNBOUND_RETRY_MAX", 0.04)
    backend = SquattedBackend(held=3)
    driver = backend.driver = LbDriver(LbView("n1"), backend, "test")
    driver.load([SERVICE])
    await driver.start()
    driver.on_change(Change(Kind.TASK, "a", None, task("a", "10.0.0.5")))  # a job: the watch
    for _ in range(500):
        if backend.retries == 4:
            break
        await asyncio.sleep(0.01)
    await driver.settled()
    assert backend.unbound() == {} and driver.unbound_rebound == 1
    # retried after 0.01 s, then 0.02, then 0.04 (the cap) twice: the wait set for the
    # next retry, doubled each time, seen as each ran
    assert backend.waits == [0.02, 0.04, 0.04, 0.04]
    assert driver._unbound_wait == 0.01  # none left: a later failure starts again at 1 s
    await asyncio.sleep(0.1)
    assert backend.retries == 4  # nothing left to retry: no timer
    await driver.close()
