"""File descriptors of the process: its limit, how many are open, and telling a shortage apart.

A proxy that cannot make a socket (EMFILE: the process's limit; ENFILE: the
system's; ENOBUFS/ENOMEM: the kernel's memory for sockets) has learned
something about itself, not about the task it was connecting to: such an
error must never count as the task's failure (no ejection, no failed check).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource

#: errnos of socket()/connect()/accept() that mean "this process (or host) is out of
#: descriptors or socket memory", whatever the peer
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_fd_shortage(error: BaseException) -> bool:
    """True when `error` (or what it wraps, as aiohttp's connector errors do) is a shortage."""
    seen = 0
    cause: BaseException | None = error
    while cause is not None and seen < 4:
        if isinstance(cause, OSError) and cause.errno in SHORTAGE_ERRNOS:
            return True
        wrapped = getattr(cause, "os_error", None)  # aiohttp.ClientConnectorError
        cause = wrapped if isinstance(wrapped, BaseException) else cause.__cause__
        seen += 1
    return False


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE: how many descriptors this process may hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return hard if hard != resource.RLIM_INFINITY else 1 << 20
    return int(soft)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; the (soft, hard) in force after.

    Every client, task connection, forwarded query and health check holds a
    descriptor; the usual soft default (1024) runs out long before any of
    the router's own limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or (hard == resource.RLIM_INFINITY and soft != hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(hard)


def open_fds() -> int:
    """Descriptors this process holds now (0 where /proc is not there to say)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return 0
