"""A small network-namespace harness for cluster tests (root only).

`Lab` creates namespaces, veth pairs and bridges under one unique prefix and
removes every one of them on `close()` (or when its `with` block ends, however
it ends): the processes still running inside its namespaces are killed by pid
first, then the namespaces, bridges and per-namespace `/etc/netns/<ns>/` files
are removed. Nothing outside the prefix is touched, so parallel runs coexist.

A `Netns` runs commands inside with `ip netns exec`, which also bind-mounts
`/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf`: that is how a client
namespace gets its own resolver. For work in this Python process, `Netns.call`
runs a function on a thread that has joined the namespace (setns(2)); a socket
made there stays in the namespace for its whole life, whichever thread uses it
later. Fake servers bind their sockets that way and serve from ordinary threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # the longest interface name Linux takes


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"mpdns-probe-{secrets.token_hex(3)}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _run(["ip", "netns", "delete", probe], check=False)
    return None


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Netns:
    """One named network namespace (`ip netns`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<Netns {self.name}>"

    # -- commands inside --------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside, capturing text output (bounded by `timeout`)."""
        return _run(self.argv(argv), check=check, timeout=timeout, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside; `ip netns exec` execs it, so the pid is the command's."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args])

    # -- configuration ------------------------------------------------------------

    def up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def add_address(self, dev: str, cidr: str) -> None:
        self.ip("address", "add", cidr, "dev", dev)

    def add_route(self, destination: str, via: str) -> None:
        self.ip("route", "add", destination, "via", via)

    def write_etc(self, filename: str, text: str) -> Path:
        """A file `ip netns exec` shows inside at /etc/<filename> (resolv.conf, hosts)."""
        directory = NETNS_ETC / self.name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / filename
        path.write_text(text)
        return path

    def write_resolv_conf(self, *nameservers: str, options: str = "") -> Path:
        lines = [f"nameserver {n}" for n in nameservers]
        if options:
            lines.append(f"options {options}")
        return self.write_etc("resolv.conf", "\n".join(lines) + "\n")

    def pids(self) -> list[int]:
        done = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    # -- this process, inside -----------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on a thread that lives in this namespace; return its result."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{self.name}", initializer=self._enter
            )
        return self._executor.submit(fn, *args, **kwargs).result()

    def _enter(self) -> None:
        fd = os.open(NETNS_RUN / self.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def socket(
        self,
        family: int = socket.AF_INET,
        kind: int = socket.SOCK_DGRAM,
        bind: tuple[str, int] | None = None,
    ) -> socket.socket:
        """A socket of this namespace (bound there when `bind` is given)."""

        def make() -> socket.socket:
            sock = socket.socket(family, kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if bind is not None:
                    sock.bind(bind)
            except OSError:
                sock.close()
                raise
            return sock

        return self.call(make)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Lab:
    """Namespaces, veths and bridges under one unique prefix, all removed on close."""

    def __init__(self, prefix: str = "mpdns") -> None:
        self.tag = secrets.token_hex(3)
        self.prefix = f"{prefix}-{self.tag}"
        self.namespaces: list[Netns] = []
        self.bridges: list[str] = []
        self._devices = 0
        self._made_etc = not NETNS_ETC.exists()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, role: str) -> Netns:
        """A fresh namespace `<prefix>-<role>` with its loopback up."""
        ns = Netns(f"{self.prefix}-{role}")
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.up("lo")
        return ns

    def device_name(self, hint: str) -> str:
        """A short unique interface name (at most 15 characters)."""
        self._devices += 1
        return f"mp{self.tag}{self._devices}{hint}"[:IFNAMSIZ]

    def veth(self, a: Netns | None, a_dev: str, b: Netns | None, b_dev: str) -> None:
        """A veth pair, one end in each namespace (None: the host's), both up.

        Each end is made under a unique temporary name in the host namespace,
        moved, then renamed, so names like `eth0` never collide on the host.
        """
        tmp_a, tmp_b = self.device_name("a"), self.device_name("b")
        _run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        for ns, tmp, dev in ((a, tmp_a, a_dev), (b, tmp_b, b_dev)):
            try:
                if ns is None:
                    if tmp != dev:
                        _run(["ip", "link", "set", tmp, "name", dev])
                    _run(["ip", "link", "set", dev, "up"])
                    continue
                _run(["ip", "link", "set", tmp, "netns", ns.name])
                ns.ip("link", "set", tmp, "name", dev)
                ns.up(dev)
            except RuntimeError:
                _run(["ip", "link", "delete", tmp], check=False)
                raise

    def bridge(self, ns: Netns | None, name: str | None = None) -> str:
        """A bridge (in `ns`, or in the host namespace where it is removed on close)."""
        name = name or self.device_name("br")
        if ns is None:
            _run(["ip", "link", "add", name, "type", "bridge"])
            self.bridges.append(name)
            _run(["ip", "link", "set", name, "up"])
        else:
            ns.ip("link", "add", name, "type", "bridge")
            ns.up(name)
        return name

    def close(self) -> None:
        """Remove everything made here, best effort; raise the first failure at the end."""
        errors: list[str] = []
        for ns in reversed(self.namespaces):
            ns.close()
            _kill_all(ns)
            done = _run(["ip", "netns", "delete", ns.name], check=False)
            if done.returncode != 0 and (NETNS_RUN / ns.name).exists():
                errors.append(f"ip netns delete {ns.name}: {done.stderr.strip()}")
            shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
        for bridge in self.bridges:
            _run(["ip", "link", "delete", bridge], check=False)
        if self._made_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only when empty: other runs' files stay
        self.namespaces.clear()
        self.bridges.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


def _kill_all(ns: Netns, grace: float = 3.0) -> None:
    """End the processes left inside a namespace of ours (by pid): TERM, then KILL."""
    own = os.getpid()
    pids = [p for p in ns.pids() if p != own]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is dead for this purpose; reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False
