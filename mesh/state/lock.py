"""One agent per data dir: an exclusive `flock` on `<data-dir>/agent.lock`.

Two agents on one data dir would both write `state.db`, hand out the same
subnets, VIPs and published ports, and unlink each other's feed socket. So
the agent takes this lock before anything else touches the data dir or binds
a port, and holds it, by keeping the descriptor open, until it exits.

Why `flock` on a file that stays, rather than a PID file: the kernel drops the
lock when its holder dies, however it dies (kill -9 included), so a stale file
can never block a start, and there is no PID to check for liveness or reuse.
The file is never unlinked: a holder unlinking it while a second agent waits on
the old inode would let a third lock a new file, and then two would run. The
holder's PID is written into the file after the lock is taken, only to be named
in the refusal; `/proc/locks` names it too while the file is being rewritten.

The descriptor is opened O_CLOEXEC: worker and health-check processes the agent
starts never inherit it, so they can neither keep the lock after the agent died
nor release it early.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "agent.lock"


class DataDirError(Exception):
    """The data dir cannot be used: it is locked by another agent, or unusable."""


class DataDirInUse(DataDirError):
    def __init__(self, data_dir: Path, lock: Path, holder: int | None) -> None:
        who = f"PID {holder}" if holder is not None else "another process"
        super().__init__(f"data dir {data_dir} is in use by {who} (lock {lock})")
        self.holder = holder


class DataDirLock:
    """The held lock; `release()` (or the process's exit) lets the next agent in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Create the data dir if need be and lock it, or raise DataDirError naming why not."""
    path = data_dir / LOCK_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DataDirError(
            f"cannot use data dir {data_dir}: {exc.strerror or exc} ({exc.filename or path})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        if holder is None:
            holder = _flock_holder(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, path, holder) from None
    except OSError as exc:  # ENOLCK: a filesystem without locks; refuse rather than risk two
        os.close(fd)
        raise DataDirError(
            f"cannot lock data dir {data_dir} ({path}): {exc.strerror or exc}"
        ) from None
    # Informative only: a failure to write it must not stop an agent that holds the lock.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)


def _pid_in(fd: int) -> int | None:
    """The PID the holder wrote, if it has written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() and text.isascii() else None


def _flock_holder(fd: int) -> int | None:
    """The PID /proc/locks gives for a FLOCK on this file (between the holder's lock
    and its write of the file)."""
    info = os.fstat(fd)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None
