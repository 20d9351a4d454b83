"""Passive outlier detection (lb/outlier.py, lb/outlier_watch.py; the filter's ejection path)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

import pytest

from lb.outlier import OutlierDetector, Unanswered
from lb.outlier_watch import OutlierWatch, answers
from lb.table import DeleteReal, Op, PutReal, Real, VirtualKey, VirtualService, apply_ops
from mesh.api.models import LbOutliersOut
from tests.unit.test_lb_failover import Rig, three_nodes
from tests.unit.test_lb_view import PUBLISHED, VIP_FRONT, put, service, task

DEAD = Real("10.0.1.11", 80)
ALIVE = Real("10.0.1.21", 80)


def flow(port: int, real: Real = DEAD) -> Unanswered:
    return Unanswered(("10.9.0.1", port, "10.0.0.3", 30080), real)


def test_a_flow_unanswered_past_the_threshold_makes_its_real_a_candidate() -> None:
    core = OutlierDetector(threshold=0.3)
    assert core.observe(10.0, [flow(1000)]) == []
    assert core.next_due() == 10.3  # the shell reads again then
    assert core.observe(10.15, [flow(1000)]) == []
    assert core.observe(10.3, [flow(1000), flow(1001)]) == [DEAD]
    # being checked: not a candidate again meanwhile
    assert core.observe(10.45, [flow(1000), flow(1001)]) == []
    assert core.next_due() is None
    assert core.counts().checks == 1


def test_an_answered_flow_is_forgotten() -> None:
    core = OutlierDetector(threshold=0.3)
    core.observe(0.0, [flow(1000)])
    core.observe(0.2, [])  # answered: gone from the reading
    assert core.observe(0.35, [flow(1000)]) == []  # seen anew: its age starts again
    assert core.observe(0.65, [flow(1000)]) == [DEAD]


def test_a_dead_check_ejects_and_an_answer_restores() -> None:
    core = OutlierDetector(threshold=0.3, recheck=1.0)
    core.observe(0.0, [flow(1000)])
    assert core.observe(0.3, [flow(1000)]) == [DEAD]
    assert core.checked(DEAD, alive=False, now=0.6) == "eject"
    assert core.ejected == {DEAD}
    assert core.due_rechecks(1.0) == []
    assert core.due_rechecks(1.6) == [DEAD]
    assert core.checked(DEAD, alive=False, now=1.9) == ""  # still dead: stays out
    assert core.due_rechecks(2.9) == [DEAD]
    assert core.checked(DEAD, alive=True, now=3.0) == "restore"
    counts = core.counts()
    assert (counts.ejections, counts.restored, counts.checks, counts.ejected) == (1, 1, 3, [])


def test_a_lost_syn_on_a_live_real_is_a_false_candidate_not_an_ejection() -> None:
    """A lossy path loses a SYN: the flow stays unanswered past the threshold, but the
    direct check is answered, so nothing is ejected, and that flow never counts again."""
    core = OutlierDetector(threshold=0.3, recheck=1.0)
    core.observe(0.0, [flow(1000, ALIVE)])
    assert core.observe(0.3, [flow(1000, ALIVE)]) == [ALIVE]
    assert core.checked(ALIVE, alive=True, now=0.4) == ""
    assert core.ejected == frozenset()
    # the same flow, still unanswered (until its retransmitted SYN): excused for good
    assert core.observe(1.5, [flow(1000, ALIVE)]) == []
    # a new flow unanswered counts again, but not before the recheck interval
    core.observe(1.2, [flow(1000, ALIVE), flow(1001, ALIVE)])
    assert core.observe(2.0, [flow(1000, ALIVE), flow(1001, ALIVE)]) == [ALIVE]
    counts = core.counts()
    assert (counts.false_candidates, counts.ejections) == (1, 0)


def test_the_last_real_is_never_ejected() -> None:
    core = OutlierDetector(threshold=0.3)
    core.observe(0.0, [flow(1000)])
    core.observe(0.3, [flow(1000)])
    assert core.checked(DEAD, alive=False, now=0.6, can_eject=False) == ""
    assert core.ejected == frozenset()
    assert core.counts().kept_last == 1


def test_a_real_that_leaves_the_table_is_forgotten() -> None:
    core = OutlierDetector(threshold=0.3)
    core.observe(0.0, [flow(1000)])
    core.observe(0.3, [flow(1000)])
    core.checked(DEAD, alive=False, now=0.6)
    assert core.retain({ALIVE}) == [DEAD]
    assert core.ejected == frozenset()
    assert core.due_rechecks(5.0) == []


def test_the_reading_is_bounded() -> None:
    core = OutlierDetector(threshold=0.3, max_flows=10)
    core.observe(0.0, [flow(port) for port in range(1000)])
    assert core.counts().flows_unanswered == 10


# -- the filter's side: an ejected real leaves every virtual service it is in --------


def test_the_filter_ejects_a_real_from_every_service_and_restores_it() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    everyone = rig.reals()
    assert rig.filter.can_eject(DEAD)
    ops = rig._take(list(rig.filter.eject(DEAD)))
    assert DeleteReal(PUBLISHED, DEAD) in ops and DeleteReal(VIP_FRONT, DEAD) in ops
    assert all(isinstance(op, DeleteReal) for op in ops)
    assert DEAD not in rig.reals() and len(rig.reals()) == 2
    rig.consistent()
    back = rig._take(list(rig.filter.restore(DEAD)))
    assert back and all(isinstance(op, PutReal) for op in back)
    assert rig.reals() == everyone
    rig.consistent()


def test_the_filter_keeps_the_last_real() -> None:
    web = service()
    only = task("a", "10.0.1.11", node="n1")
    rig = Rig([web, only])
    assert not rig.filter.can_eject(DEAD)
    assert rig.filter.eject(DEAD) == []  # ejected, but kept: the service's last
    assert rig.reals() == {DEAD: 1}
    other = task("c", "10.0.1.21", node="n2")
    ejected_now = rig.change(put(None, other))
    assert PutReal(PUBLISHED, ALIVE, 1) in ejected_now
    assert DEAD not in rig.reals()  # another real arrived: the ejected one goes
    rig.consistent()


# -- the shell: fed by a fake conntrack, checking through a fake connect -------------


class FakeReader:
    def __init__(self) -> None:
        self.flows: list[Unanswered] = []
        self.reads = 0
        self.truncated = 0

    async def read(self, table: Mapping[VirtualKey, VirtualService]) -> list[Unanswered]:
        self.reads += 1
        return [f for f in self.flows if any(f.real in s.reals for s in table.values())]


async def test_the_watch_ejects_a_dead_real_and_restores_it_when_it_answers() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    reader = FakeReader()
    alive = {DEAD: False}

    async def check(real: Real) -> bool:
        return alive.get(real, True)

    def emit(ops: list[Op]) -> None:
        apply_ops(rig.backend, ops)

    watch = OutlierWatch(rig.filter, emit, reader, "n3", check=check, interval=0.02)
    watch.detector.threshold = 0.05
    watch.detector.recheck = 0.1
    watch.start()
    try:
        reader.flows = [flow(1000, DEAD), flow(1001, ALIVE)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if DEAD not in rig.reals():
                break
        assert DEAD not in rig.reals()
        assert ALIVE in rig.reals()  # a live real's unanswered flow: checked, kept
        reader.flows = []
        alive[DEAD] = True
        for _ in range(100):
            await asyncio.sleep(0.02)
            if DEAD in rig.reals():
                break
        assert DEAD in rig.reals()
        counts = watch.counts()
        assert counts["ejections"] == 1 and counts["restored"] == 1
        assert counts["false_candidates"] >= 1
        rig.consistent()
    finally:
        await watch.close()


async def test_the_watch_reads_nothing_without_remote_reals() -> None:
    web = service()
    mine = task("a", "10.0.1.31", node="n3")
    rig = Rig([web, mine])
    reader = FakeReader()
    watch = OutlierWatch(rig.filter, lambda ops: None, reader, "n3", interval=0.01)
    watch.start()
    try:
        await asyncio.sleep(0.1)
        assert reader.reads == 0
        rig.change(put(None, task("b", "10.0.1.21", node="n2")))
        watch.table_changed()
        await asyncio.sleep(0.1)
        assert reader.reads > 0
    finally:
        await watch.close()


async def test_a_direct_check_tells_a_listener_and_a_refusal_from_silence() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await answers(Real("127.0.0.1", port))
    finally:
        server.close()
        await server.wait_closed()
    assert await answers(Real("127.0.0.1", port))  # refused: the host is there
    # silence: a listener whose accept queue is full drops SYNs (loopback only)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        address = full.getsockname()
        waiting = [socket.socket() for _ in range(3)]
        try:
            for sock in waiting:
                sock.setblocking(False)
                sock.connect_ex(address)
            await asyncio.sleep(0.05)
            assert not await answers(Real(*address), within=0.2)
        finally:
            for sock in waiting:
                sock.close()


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_settings_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        OutlierDetector(threshold=bad)


async def test_the_counters_are_what_the_openapi_model_describes() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    watch = OutlierWatch(rig.filter, lambda ops: None, FakeReader(), "n3")
    watch.detector.observe(0.0, [flow(1000)])
    watch.detector.observe(0.3, [flow(1000)])
    watch.detector.checked(DEAD, alive=False, now=0.6)
    shown = LbOutliersOut.model_validate(watch.counts())  # extra keys are refused
    assert shown.ejected == ["10.0.1.11:80"] and shown.ejections == 1
