"""Run a short piece of code inside another network namespace: `entered(path)`.

A socket belongs to the network namespace of the thread that created it, for
its whole life; so does a netlink connection. To open a listener inside a
sandbox, or to run `nft` there (a child inherits its parent thread's
namespace), a thread switches with setns(2), does that, and switches back.

setns changes the namespace of the calling *thread* only. So `entered` must
run either in a dedicated thread, or as a short synchronous block that does
not await (the event loop's thread must not be switched across an await: any
other coroutine scheduled meanwhile would open its sockets in the sandbox).
Python 3.11 has no `os.setns` (3.12 adds it), hence ctypes (loaded on first use).

Not sans-IO (it is a system call), but it imports no asyncio and no socket.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

CLONE_NEWNET = 0x40000000
_OWN_NETNS = "/proc/thread-self/ns/net"


class NetnsError(OSError):
    """A namespace that could not be entered (or, worse, left)."""


@functools.cache
def _libc_setns() -> tuple[Callable[[int, int], int], Callable[[], int]]:
    """libc's setns and ctypes' errno, loaded on first use: a process that never
    switches (a DNS worker, which imports this with the sandbox listener) holds no
    ctypes. dlopen(NULL) is the process's own symbols, libc's among them: no
    `ctypes.util.find_library`, which runs `ldconfig -p` (a subprocess) to find it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    call = libc.setns
    call.argtypes = (ctypes.c_int, ctypes.c_int)
    call.restype = ctypes.c_int
    return call, ctypes.get_errno


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread; raises OSError with errno."""
    call, get_errno = _libc_setns()
    if call(fd, nstype) != 0:
        errno = get_errno()
        raise NetnsError(errno, f"setns: {os.strerror(errno)}")


def current() -> str:
    """An identity of the calling thread's network namespace, e.g. 'net:[4026531840]'."""
    return os.readlink(_OWN_NETNS)


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Inside the block, this thread is in the network namespace at `path`
    (/run/netns/<name> or /proc/<pid>/ns/net); afterwards it is back where it was.

    Raises FileNotFoundError for a path that does not exist and NetnsError if
    the namespace cannot be entered. If the way back fails the process is in an
    unknown state, so that is raised too (never swallowed).
    """
    original = os.open(_OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(original)
    finally:
        os.close(original)
