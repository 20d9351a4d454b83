"""Ending the processes inside a sandbox namespace the agent made, before it goes.

A detached task's command (`mesh task run --detach`) runs in the task's sandbox,
reparented to PID 1 once the CLI exits; nothing but the namespace ties it to the
task. Deleting the namespace's /run/netns file does not end it: the process keeps
the namespace alive, unnamed, and goes on running. So, as `docker rm -f` does, the
agent ends every process whose network namespace is the sandbox before removing
it: SIGTERM, then SIGKILL to what is left after a short grace.

A process is in the namespace when readlink(/proc/PID/ns/net) is "net:[INODE]",
INODE being the st_ino of /run/netns/NAME. Never for an adopted namespace (its
processes are the operator's): the manager calls this only for namespaces it made.

No asyncio here: `end_processes` takes its clock, sleep and the scan as functions,
so the schedule is tested with fakes; the scan (`Host`) reads /proc through `os`,
with its directory, the kill and our own pid injectable.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Awaitable, Callable, Iterable

PROC_DIR = "/proc"
#: seconds between SIGTERM and SIGKILL (docs/networking.md, `mesh task rm`)
TERM_GRACE = 3.0
#: seconds SIGKILLs are sent again (to what forked meanwhile) before giving up
KILL_WAIT = 1.0
#: seconds between two scans while waiting for the processes to go
POLL = 0.05


@dataclasses.dataclass(slots=True)
class Ended:
    """What became of one namespace's processes."""

    #: distinct processes signalled (SIGTERM, or SIGKILL alone when first seen late)
    signalled: int = 0
    #: of those, the ones gone at the end
    ended: int = 0
    #: of those, the ones sent SIGKILL: still there after the grace
    killed: int = 0
    #: found at the end still (not ours to signal, or unkillable)
    left: int = 0


def net_link(inode: int) -> str:
    """What readlink(/proc/PID/ns/net) says of a process in the namespace `inode`."""
    return f"net:[{inode}]"


def pids_in(inode: int, links: Iterable[tuple[int, str | None]], own_pid: int) -> list[int]:
    """The pids (sorted) whose net link is the namespace's; never `own_pid`."""
    want = net_link(inode)
    return sorted(pid for pid, link in links if link == want and pid != own_pid)


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """The processes of this host, as /proc shows them, and the way to signal them."""

    proc_dir: str = PROC_DIR
    kill: Callable[[int, int], None] = os.kill
    own_pid: int = dataclasses.field(default_factory=os.getpid)

    def netns_inode(self, path: str) -> int | None:
        """The namespace's inode; None when `path` is gone or is not a namespace (the
        empty mountpoint file a crash between mkdir and mount leaves)."""
        try:
            st = os.stat(path)
            nsfs = os.stat(f"{self.proc_dir}/self/ns/net")
        except OSError:
            return None
        return st.st_ino if st.st_dev == nsfs.st_dev else None

    def net_links(self) -> list[tuple[int, str | None]]:
        """(pid, readlink of its ns/net) of every process; None where it cannot be read:
        the process just ended, or is not ours to look at."""
        try:
            entries = os.listdir(self.proc_dir)
        except OSError:
            return []
        links: list[tuple[int, str | None]] = []
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                link: str | None = os.readlink(f"{self.proc_dir}/{entry}/ns/net")
            except OSError:  # ENOENT (gone, or a zombie), EACCES
                link = None
            links.append((int(entry), link))
        return links

    def find(self, inode: int) -> list[int]:
        return pids_in(inode, self.net_links(), self.own_pid)


async def end_processes(
    find: Callable[[], Awaitable[list[int]]],
    kill: Callable[[int, int], None],
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    grace: float = TERM_GRACE,
) -> Ended:
    """SIGTERM to every process `find` returns, then (after `grace` seconds) SIGKILL to
    those still there, sent again to any found later until `KILL_WAIT` more seconds
    pass. Returns once none is found, or at that bound. A process that vanished
    before its signal is nothing; one we may not signal is counted as left."""
    ended = Ended()
    pids = await find()
    if not pids:
        return ended
    termed: set[int] = set()
    killed: set[int] = set()
    denied: set[int] = set()
    deadline = clock() + grace
    while pids:
        now = clock()
        if now >= deadline + KILL_WAIT:
            break
        sig = signal.SIGTERM if now < deadline else signal.SIGKILL
        sent = termed if sig == signal.SIGTERM else killed
        for pid in pids:
            if pid in sent or pid in denied:
                continue
            try:
                kill(pid, sig)
            except ProcessLookupError:
                continue  # ended meanwhile
            except PermissionError:
                denied.add(pid)
                continue
            sent.add(pid)
        await sleep(POLL)
        pids = await find()
    ended.signalled = len(termed | killed)
    ended.ended = len((termed | killed) - set(pids))
    ended.killed = len(killed)
    ended.left = len(pids)
    return ended
