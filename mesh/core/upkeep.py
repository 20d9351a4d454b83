"""Periodic upkeep that rides the wake-ups the loop takes anyway.

An idle agent is woken by its gossip: probes, acks and the pings of others, four or five
times a second on a five-node cluster. Its other periodic jobs (the HTTP router's deadline
sweep, the sandbox DNS sweep, the reconnect to failed members, the state digest
announcement) each woke it on their own besides, about as often again, and on a VM a
wake-up of an asyncio loop costs ~0.3 ms of CPU before it does anything
(docs/performance.md, idle CPU).

A job sleeping here for a period P may run from 3P/4 on, at the first wake-up the loop
takes anyway (`nudge`, which the gossip shell calls on every datagram and timer), and runs
at the latest at a point of a grid of step P/4, no later than P: jobs that get no ride
still wake the loop together (a 1 s and a 2 s job share the half seconds). A job runs at
least every P, as before, and at most a third more often (an early run is Python work on
a wake-up taken anyway; from P/2 on, the sleeps of an idle agent ran ~10 times a second).
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable


def window(now: float, period: float) -> tuple[float, float]:
    """(earliest, latest) for a sleep of `period` begun at `now`: the earliest is 3P/4 on,
    the latest the last point of the P/4 grid at or before now + P."""
    step = period / 4
    earliest = now + period - step
    latest = math.floor((now + period) / step) * step
    return earliest, max(earliest, latest)


class Upkeep:
    """The sleepers of one event loop. `clock` is the loop's time (injected for tests)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._clock = clock
        self._sleepers: dict[asyncio.Future[None], float] = {}  # -> earliest
        self._soonest = math.inf

    async def sleep(self, period: float) -> None:
        """Return between 3/4 of `period` and `period` from now; on a nudge as soon as allowed."""
        now = self._clock()
        earliest, latest = window(now, period)
        waiter: asyncio.Future[None] = self._loop.create_future()
        fallback = self._loop.call_later(latest - now, _release, waiter)
        self._sleepers[waiter] = earliest
        self._soonest = min(self._soonest, earliest)
        try:
            await waiter
        finally:
            fallback.cancel()
            if self._sleepers.pop(waiter, None) is not None and not self._sleepers:
                self._soonest = math.inf

    def nudge(self) -> None:
        """The loop is awake anyway: release every sleeper whose earliest time has come.
        Called per gossip datagram, so a nudge before the soonest is one clock read."""
        now = self._clock()
        if self._soonest > now:
            return
        soonest = math.inf
        for waiter, earliest in list(self._sleepers.items()):
            if earliest <= now:
                del self._sleepers[waiter]
                _release(waiter)
            else:
                soonest = min(soonest, earliest)
        self._soonest = soonest

    def __len__(self) -> int:
        return len(self._sleepers)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_UPKEEPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Upkeep] = weakref.WeakKeyDictionary()


def upkeep() -> Upkeep:
    """The running loop's Upkeep (made on first use)."""
    loop = asyncio.get_running_loop()
    found = _UPKEEPS.get(loop)
    if found is None:
        found = _UPKEEPS[loop] = Upkeep(loop, loop.time)
    return found


async def sleep(period: float) -> None:
    """Sleep for upkeep: between 3/4 of `period` and `period`, on a wake-up taken anyway if any."""
    await upkeep().sleep(period)
