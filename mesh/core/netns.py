"""Entering a network namespace for a moment: `entered(path)`.

setns(2) moves only the calling thread, and everything that thread makes
while inside (sockets, netlink handles, child processes) belongs to that
namespace for its whole life, whichever thread uses it later. So the way to
open a socket in a sandbox is a short synchronous block, or a dedicated
thread, inside `with entered(path):`; the thread is put back in its original
namespace when the block ends, however it ends. Never await inside the block:
another coroutine would run in the wrong namespace.

Python 3.11 has no `os.setns`, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the block with this thread in the network namespace at `path`.

    Raises OSError when the namespace cannot be opened or entered (the thread
    is then still where it was). If the thread cannot be put back, that is
    fatal for the thread's work: the error propagates rather than leave it
    silently in the sandbox.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
