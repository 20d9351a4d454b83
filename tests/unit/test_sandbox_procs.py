"""Ending a sandbox's processes (mesh/sandbox/procs.py): which pids are in a namespace
(a fake /proc), and the SIGTERM-then-SIGKILL schedule with a fake clock and kill."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mesh.sandbox import procs
from mesh.sandbox.procs import Host, end_processes, pids_in


def fake_proc(root: Path, links: dict[int, str | None]) -> str:
    """/proc with a ns/net link per pid (None: a process whose link cannot be read)."""
    for pid, link in links.items():
        ns = root / str(pid) / "ns"
        ns.mkdir(parents=True)
        if link is not None:
            (ns / "net").symlink_to(link)
    (root / "self").mkdir()
    (root / "meminfo").write_text("")
    return str(root)


def test_pids_in_a_namespace_are_those_whose_link_names_its_inode(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {10: "net:[4026532001]", 11: "net:[4026531840]", 12: "net:[4026532001]", 13: None},
    )
    host = Host(proc_dir=proc, own_pid=12)
    # 12 is ourselves (the agent's thread may be inside); 13 vanished; 11 is elsewhere
    assert host.find(4026532001) == [10]
    assert pids_in(4026531840, host.net_links(), own_pid=1) == [11]
    assert Host(proc_dir=str(tmp_path / "none")).net_links() == []


def test_an_inode_is_only_a_namespaces(tmp_path: Path) -> None:
    host = Host()
    assert host.netns_inode("/proc/self/ns/net") == os.stat("/proc/self/ns/net").st_ino
    plain = tmp_path / "mountpoint"
    plain.write_text("")  # the empty file a crash between mkdir and mount leaves
    assert host.netns_inode(str(plain)) is None
    assert host.netns_inode(str(tmp_path / "gone")) is None


class World:
    """Processes that end on the signals they heed, a clock that sleep advances."""

    def __init__(self, heeds: dict[int, set[int]]) -> None:
        self.heeds = heeds
        self.alive = set(heeds)
        self.now = 100.0
        self.sent: list[tuple[float, int, int]] = []
        self.denied: set[int] = set()
        self.spawn_at: dict[float, int] = {}

    async def find(self) -> list[int]:
        return sorted(self.alive)

    def kill(self, pid: int, sig: int) -> None:
        if pid in self.denied:
            raise PermissionError(1, "not permitted")
        if pid not in self.alive:
            raise ProcessLookupError(3, "no such process")
        self.sent.append((self.now, pid, sig))
        if sig in self.heeds[pid]:
            self.alive.discard(pid)

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        for at, pid in list(self.spawn_at.items()):
            if self.now >= at:
                del self.spawn_at[at]
                self.alive.add(pid)
                self.heeds[pid] = {signal.SIGKILL}

    def clock(self) -> float:
        return self.now


async def end(world: World, grace: float = 3.0) -> procs.Ended:
    return await end_processes(world.find, world.kill, world.sleep, world.clock, grace)


async def test_sigterm_ends_the_polite_at_once() -> None:
    world = World({7: {signal.SIGTERM, signal.SIGKILL}, 8: {signal.SIGTERM, signal.SIGKILL}})
    ended = await end(world)
    assert world.sent == [(100.0, 7, signal.SIGTERM), (100.0, 8, signal.SIGTERM)]
    assert (ended.ended, ended.killed, ended.left) == (2, 0, 0)


async def test_sigkill_after_the_grace_for_one_that_ignores_sigterm() -> None:
    world = World({7: {signal.SIGKILL}, 8: {signal.SIGTERM}})
    ended = await end(world, grace=2.0)
    kills = [(at, pid) for at, pid, sig in world.sent if sig == signal.SIGKILL]
    assert kills and kills[0][1] == 7 and kills[0][0] == pytest.approx(102.0, abs=0.1)
    # SIGTERM once per process, however many scans it stays through
    assert [pid for _, pid, sig in world.sent if sig == signal.SIGTERM] == [7, 8]
    assert (ended.ended, ended.killed, ended.left) == (2, 1, 0)


async def test_one_forked_during_the_grace_is_ended_too() -> None:
    world = World({7: set()})  # 7 heeds nothing: stays (unkillable, e.g. in D state)
    world.spawn_at[101.0] = 9
    ended = await end(world, grace=2.0)
    assert 9 not in world.alive
    assert (9, signal.SIGTERM) in [(pid, sig) for _, pid, sig in world.sent]
    # bounded: given up KILL_WAIT after the grace, the unkillable one counted as left
    assert world.now == pytest.approx(100.0 + 2.0 + procs.KILL_WAIT, abs=0.1)
    assert (ended.ended, ended.left) == (1, 1)


async def test_vanished_and_forbidden_pids_are_no_error() -> None:
    world = World({7: {signal.SIGTERM}, 8: {signal.SIGTERM}})
    world.denied.add(8)

    async def find_with_a_ghost() -> list[int]:
        return [*sorted(world.alive), 99]  # 99 ends between the scan and the kill

    ended = await end_processes(find_with_a_ghost, world.kill, world.sleep, world.clock, grace=0.5)
    assert 8 in world.alive and 7 not in world.alive
    assert ended.left == 2  # 8 (not ours to signal) and the ghost still listed
    assert ended.ended == 1


async def test_nothing_inside_is_nothing_sent() -> None:
    world = World({})
    ended = await end(world)
    assert world.sent == [] and world.now == 100.0
    assert (ended.signalled, ended.left) == (0, 0)
