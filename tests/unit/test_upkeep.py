"""mesh.core.upkeep: periodic jobs ride the wake-ups the loop takes anyway."""

from __future__ import annotations

import asyncio
import math

import pytest

from mesh.core import upkeep
from mesh.core.upkeep import Upkeep, window


@pytest.mark.parametrize("period", [0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("now", [0.0, 0.1, 3.37, 1234.999, 98765.4321])
def test_the_window_is_the_last_quarter_of_the_period_ending_on_its_grid(
    now: float, period: float
) -> None:
    earliest, latest = window(now, period)
    assert earliest == pytest.approx(now + 0.75 * period)
    assert earliest <= latest <= now + period + 1e-9  # never later than a plain sleep
    step = period / 4
    assert latest / step == pytest.approx(round(latest / step))  # on the grid


def test_jobs_of_one_and_two_seconds_begun_apart_fall_due_together() -> None:
    # without a ride, a 1 s and a 2 s job started at different times still wake the
    # loop at the same instants: their latest times are points of one grid
    one = {window(0.13 + k, 1.0)[1] for k in range(8)}
    two = {window(0.61 + 2 * k, 2.0)[1] for k in range(4)}
    grid = {round(t * 4) / 4 for t in one}
    assert one == grid
    assert two <= {math.floor(t * 2) / 2 for t in two}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_nudge_releases_only_the_sleepers_whose_earliest_time_has_come() -> None:
    clock = Clock()
    keeper = Upkeep(asyncio.get_running_loop(), clock)
    short = asyncio.ensure_future(keeper.sleep(100.0))  # earliest at 175
    long = asyncio.ensure_future(keeper.sleep(1000.0))  # earliest at 850
    await asyncio.sleep(0)
    assert len(keeper) == 2
    clock.now = 170.0
    keeper.nudge()
    await asyncio.sleep(0)
    assert not short.done() and not long.done()
    clock.now = 175.0
    keeper.nudge()
    await asyncio.sleep(0)
    assert short.done() and not long.done()
    assert len(keeper) == 1
    long.cancel()  # a cancelled sleeper leaves nothing behind
    with pytest.raises(asyncio.CancelledError):
        await long
    assert len(keeper) == 0
    keeper.nudge()  # nothing to release: harmless


async def test_without_a_ride_a_sleep_ends_by_its_period() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(upkeep.sleep(0.08), 5.0)
    assert loop.time() - started >= 0.75 * 0.08 - 0.005
    assert len(upkeep.upkeep()) == 0


async def test_the_module_sleep_is_released_by_a_nudge_of_the_running_loops_upkeep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    keeper = upkeep.upkeep()
    assert keeper is upkeep.upkeep()  # one per loop
    nudge = keeper.nudge  # what mesh.cluster gives the gossip shell as its on_wake
    sleeper = asyncio.ensure_future(upkeep.sleep(100.0))
    await asyncio.sleep(0)
    nudge()
    await asyncio.sleep(0)
    assert not sleeper.done()
    monkeypatch.setattr(keeper, "_clock", lambda: loop.time() + 80.0)  # 80 s on
    nudge()
    await asyncio.wait_for(sleeper, 1.0)
