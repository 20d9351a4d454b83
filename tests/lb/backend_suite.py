"""The one test suite every L4 backend passes (docs/design.md, "Load-balancer backends").

A backend's test module subclasses `BackendSuite` and provides a `harness`
fixture: something that makes fresh backend instances (a new instance over the
same kernel state is what an agent restart looks like), gives addresses usable
as VIPs and real servers in its environment, runs echo servers on the reals,
and sends real traffic through a virtual service. Nothing is mocked: the
kernel backends run in a network namespace (or the IPVS VM), the userspace one
on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import ClassVar, Protocol

import pytest

from lb.backend import Backend
from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    VirtualKey,
    VirtualService,
)


class Harness(Protocol):
    async def new_backend(self) -> Backend:
        """A fresh backend instance (not started) over the same environment."""

    def vip(self, index: int) -> str:
        """An address to use as a service VIP."""

    def real(self, index: int, protocol: str = "tcp") -> Real:
        """A real server; an echo server answering its own `str(real)` runs there."""

    async def hit(self, key: VirtualKey) -> Real | None:
        """One new connection (or datagram) through `key`: the real that answered, or None."""

    async def make_foreign(self) -> None:
        """Create objects of the same kind as the backend's that it did not create."""

    async def foreign_intact(self) -> bool:
        """Whether everything `make_foreign` made is still there, unchanged."""


@contextlib.asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[Backend]:
    """A fresh backend started with an empty table, closed however the test ends."""
    backend = await harness.new_backend()
    await backend.start({})
    try:
        yield backend
    finally:
        await backend.close()


async def spread(harness: Harness, key: VirtualKey, count: int) -> Counter[Real | None]:
    return Counter([await harness.hit(key) for _ in range(count)])


class BackendSuite:
    """Subclass and provide a `harness` fixture (function scope)."""

    #: whether the backend balances by least connections (nftables refuses `lc`)
    least_connections: ClassVar[bool] = True

    async def test_add_service_with_reals_routes_traffic(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            reals = [harness.real(1), harness.real(2)]
            await backend.apply([PutService(key), *(PutReal(key, r, 1) for r in reals)])
            assert await backend.read() == {
                key: VirtualService(key, ServiceOptions(), {r: 1 for r in reals})
            }
            seen = await spread(harness, key, 20)
            assert set(seen) == set(reals), seen
            assert min(seen.values()) >= 5, f"round robin should alternate: {seen}"

    async def test_udp_service(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("udp", harness.vip(2), 5353)
            real = harness.real(3, "udp")
            await backend.apply([PutService(key), PutReal(key, real, 1)])
            assert await harness.hit(key) == real

    async def test_published_port_on_any_address(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", ANY_ADDRESS, 30080)
            real = harness.real(1)
            await backend.apply([PutService(key), PutReal(key, real, 1)])
            assert await harness.hit(key) == real

    async def test_remove_real_and_service(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            one, two = harness.real(1), harness.real(2)
            await backend.apply([PutService(key), PutReal(key, one, 1), PutReal(key, two, 1)])
            await backend.apply([DeleteReal(key, one)])
            assert set(await spread(harness, key, 6)) == {two}
            assert (await backend.read())[key].reals == {two: 1}
            await backend.apply([DeleteService(key)])
            assert await backend.read() == {}
            assert await harness.hit(key) is None
            # Deleting what is gone is not an error: ops are idempotent.
            await backend.apply([DeleteService(key), DeleteReal(key, one)])

    async def test_put_twice_is_an_update(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            real = harness.real(1)
            await backend.apply([PutService(key), PutReal(key, real, 1)])
            scheduler = (
                Scheduler.LEAST_CONNECTIONS
                if self.least_connections
                else Scheduler.WEIGHTED_ROUND_ROBIN
            )
            await backend.apply(
                [
                    PutService(key, ServiceOptions(scheduler)),
                    PutReal(key, real, 5),
                    PutReal(key, real, 5),
                ]
            )
            table = await backend.read()
            assert table[key].options.scheduler == scheduler
            assert table[key].reals == {real: 5}
            assert await harness.hit(key) == real

    async def test_weight_zero_drains(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            one, two = harness.real(1), harness.real(2)
            await backend.apply([PutService(key), PutReal(key, one, 1), PutReal(key, two, 1)])
            await backend.apply([PutReal(key, one, 0)])
            assert (await backend.read())[key].reals == {one: 0, two: 1}
            assert set(await spread(harness, key, 8)) == {two}

    async def test_weights_shape_the_spread(self, harness: Harness) -> None:
        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            one, two = harness.real(1), harness.real(2)
            await backend.apply(
                [
                    PutService(key, ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)),
                    PutReal(key, one, 3),
                    PutReal(key, two, 1),
                ]
            )
            seen = await spread(harness, key, 40)
            assert set(seen) == {one, two}
            assert seen[one] >= 2 * seen[two], seen

    async def test_restart_reconciles_without_touching_what_matches(self, harness: Harness) -> None:
        first = await harness.new_backend()
        await first.start({})
        key = VirtualKey("tcp", harness.vip(1), 8080)
        stale = VirtualKey("tcp", harness.vip(2), 9090)
        one, two, three = harness.real(1), harness.real(2), harness.real(3)
        await first.apply(
            [
                PutService(key),
                PutReal(key, one, 1),
                PutReal(key, two, 1),
                PutService(stale),
                PutReal(stale, one, 1),
            ]
        )
        # The agent dies without cleaning up: a kernel backend's objects stay behind.
        abandon = getattr(first, "abandon", None)
        if abandon is not None:
            await abandon()
        second = await harness.new_backend()
        desired = {key: VirtualService(key, ServiceOptions(), {two: 1, three: 1})}
        await second.start(desired)
        try:
            assert await second.read() == desired
            assert set(await spread(harness, key, 10)) == {two, three}
            assert await harness.hit(stale) is None
        finally:
            await second.close()

    async def test_close_removes_everything_it_made(self, harness: Harness) -> None:
        backend = await harness.new_backend()
        await backend.start({})
        key = VirtualKey("tcp", harness.vip(1), 8080)
        await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
        await backend.close()
        assert await harness.hit(key) is None
        after = await harness.new_backend()
        await after.start({})
        try:
            assert await after.read() == {}
        finally:
            await after.close()

    async def test_leaves_foreign_objects_alone(self, harness: Harness) -> None:
        await harness.make_foreign()
        backend = await harness.new_backend()
        await backend.start({})
        key = VirtualKey("tcp", harness.vip(1), 8080)
        await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
        assert await backend.read() == {
            key: VirtualService(key, ServiceOptions(), {harness.real(1): 1})
        }
        await backend.close()
        assert await harness.foreign_intact()

    async def test_real_under_missing_service_is_an_error_not_a_crash(
        self, harness: Harness
    ) -> None:
        from lb.backend import BackendError

        async with running(harness) as backend:
            key = VirtualKey("tcp", harness.vip(1), 8080)
            with pytest.raises(BackendError):
                await backend.apply([PutReal(key, harness.real(1), 1)])
            # and the backend still works afterwards
            await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
            assert await harness.hit(key) == harness.real(1)

    async def test_counts_new_connections_per_virtual_service(self, harness: Harness) -> None:
        """`service_counters` (what GET /metrics reads) counts each virtual service's new
        connections and flows exactly, TCP, UDP and a published port, apart."""
        async with running(harness) as backend:
            if getattr(backend, "service_counters", None) is None:
                pytest.skip(f"the {type(backend).__name__} counts nothing per service")
            tcp = VirtualKey("tcp", harness.vip(1), 8080)
            idle = VirtualKey("tcp", harness.vip(1), 8081)
            udp = VirtualKey("udp", harness.vip(2), 5353)
            published = VirtualKey("tcp", ANY_ADDRESS, 30080)
            ops = []
            for key, real in (
                (tcp, harness.real(1)),
                (idle, harness.real(2)),
                (udp, harness.real(3, "udp")),
                (published, harness.real(2)),
            ):
                ops += [PutService(key), PutReal(key, real, 1)]
            await backend.apply(ops)
            sent = {tcp: 7, udp: 5, published: 3}
            for key, count in sent.items():
                answered = await spread(harness, key, count)
                assert None not in answered, (key, answered)
            # IPVS sums its per-CPU counts into the service stats every 2 s (its
            # estimator): a reading may lag that much; the others count at once.
            loop = asyncio.get_running_loop()
            started = loop.time()
            while True:
                counters = await service_counters(backend)
                done = all(counters[k]["connections"] >= n for k, n in sent.items())
                if done or loop.time() - started > 10:
                    break
                await asyncio.sleep(0.2)
            waited = loop.time() - started
            print(f"{type(backend).__name__} service_counters after {waited:.1f} s: {counters}")
            for key, count in sent.items():
                assert counters[key]["connections"] == count, (key, counters[key])
            assert counters[idle]["connections"] == 0


async def service_counters(backend: Backend) -> dict[VirtualKey, dict[str, int]]:
    """The backend's counters per virtual service (a kernel backend reads the kernel)."""
    import inspect

    found = backend.service_counters()  # type: ignore[attr-defined]
    result: dict[VirtualKey, dict[str, int]] = await found if inspect.isawaitable(found) else found
    return result
