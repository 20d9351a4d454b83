"""Running a command inside a sandbox's network namespace, in the foreground.

A sandbox the agent made is a named namespace (`/run/netns/mp-...`) with its
resolver file in `/etc/netns/<name>/resolv.conf` (nameserver 127.0.0.11). The
command is run with `ip netns exec NAME` then, which also bind-mounts that
file over `/etc/resolv.conf` in a private mount namespace of the command's own,
so the glibc resolver inside asks the agent's DNS. Any other namespace (an
adopted `/proc/PID/ns/net`, a name without a resolver file) is entered with
`nsenter --net=PATH` (util-linux): the network only, the host's resolv.conf.
Both exec the command, so its pid is the child's pid and signals reach it.

`run_foreground` forwards SIGINT, SIGTERM and SIGHUP to the command and waits
for it (bounded), so that whoever called it can clean up (remove the task)
whatever ended the command; the exit status is the command's, 128+N when a
signal N ended it, as a shell reports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from mesh.cli.errors import CliError

NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: after a forwarded signal, how long the command is given before it is killed
GRACE = 10.0


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside the namespace at `netns` (a path or a name)."""
    if not argv:
        raise CliError("no command given: write it after `--`")
    path = Path(netns) if "/" in netns else NETNS_RUN / netns
    if not path.exists():
        raise CliError(
            f"namespace {path} does not exist on this host (is the task on another node?)"
        )
    name = path.name
    if path.parent == NETNS_RUN and (NETNS_ETC / name / "resolv.conf").exists():
        return [_tool("ip"), "netns", "exec", name, *argv]
    return [_tool("nsenter"), f"--net={path}", "--", *argv]


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (
            p
            for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
            if os.access(p := f"{d}/{name}", os.X_OK)
        ),
        None,
    )
    if found is None:
        raise CliError(f"`{name}` is not installed: it is needed to enter a namespace")
    return found


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N for a signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_foreground(
    netns: str,
    argv: Sequence[str],
    *,
    grace: float = GRACE,
    on_start: Callable[[], None] | None = None,
) -> int:
    """Run `argv` inside `netns` until it exits; its exit status (signals forwarded)."""
    command = netns_argv(netns, argv)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        raise CliError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
    with _forwarding(child):
        if on_start is not None:
            on_start()
        return _wait(child, grace)


def start_detached(netns: str, argv: Sequence[str]) -> int:
    """Start `argv` inside `netns` in its own session, stdio on /dev/null; its pid."""
    command = netns_argv(netns, argv)
    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        raise CliError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
    return child.pid


class _Signalled:
    """The first signal forwarded, to bound the wait that follows it."""

    first: int | None = None


def _wait(child: subprocess.Popen[bytes], grace: float) -> int:
    while True:
        try:
            return exit_status(child.wait(timeout=0.2))
        except subprocess.TimeoutExpired:
            pass
        if _Signalled.first is not None:
            try:
                return exit_status(child.wait(timeout=grace))
            except subprocess.TimeoutExpired:
                child.kill()
                return exit_status(child.wait())


@contextlib.contextmanager
def _forwarding(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """While the command runs, SIGINT/SIGTERM/SIGHUP to `mesh` go to the command instead."""

    # Ctrl-C at a terminal reaches the whole foreground group, the command too:
    # forwarding it again would deliver it twice.
    terminal = _on_terminal()

    def forward(signum: int, frame: FrameType | None) -> None:
        if _Signalled.first is None:
            _Signalled.first = signum
        if signum == signal.SIGINT and terminal:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    _Signalled.first = None
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_terminal() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back (then delivered) while cleaning up."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


@contextlib.contextmanager
def signals_recorded() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP recorded (not acted on) inside the block: a task being
    created then is still removed, since the caller sees the signal once it has the id."""
    seen: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in FORWARDED}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
