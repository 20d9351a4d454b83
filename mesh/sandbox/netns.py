"""Named network namespaces for sandboxes: made, adopted, listed and removed.

A sandbox namespace is made the way `ip netns add` makes one (pyroute2's
`netns.create` is a port of it): `/run/netns` is made a shared mount (bound
onto itself first if it is not a mount point), then a child process unshares
its network namespace and bind-mounts it onto `/run/netns/<name>`. Because the
directory is a shared mount, the namespace is visible to every process of the
host's mount namespace: `ip netns exec <name>`, `nsenter --net=/run/netns/<name>`
and the CLI all see it. (A process started with `ip netns exec` runs in a
private copy of the mount namespace, so an agent started that way would make
namespaces nobody else sees: start agents in a node namespace with
`nsenter --net=...` instead.)

`/etc/netns/<name>/resolv.conf` points at 127.0.0.11, where the agent answers
DNS inside the sandbox; `ip netns exec` bind-mounts it over /etc/resolv.conf.

Only names with this instance's prefix (`names.netns_prefix(node)`) are ever
deleted; an adopted namespace (a name or a path such as /proc/PID/ns/net that
is not ours) is never removed here, only the endpoints put into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from mesh.core.netns import CLONE_NEWNET, entered
from mesh.sandbox.names import NETNS_DIR

ETC_NETNS_DIR = "/etc/netns"
SANDBOX_DNS = "127.0.0.11"
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux 4.11
NAME_MAX = 255


class SandboxError(RuntimeError):
    """A namespace that cannot be made, adopted or removed; the message says why."""


class Sandboxes:
    """The named namespaces under /run/netns whose names start with `prefix`."""

    def __init__(self, prefix: str, run_dir: str = NETNS_DIR, etc_dir: str = ETC_NETNS_DIR) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"a sandbox prefix must be a non-empty name, not {prefix!r}")
        self.prefix = prefix
        self.run_dir = Path(run_dir)
        self.etc_dir = Path(etc_dir)

    def path(self, name: str) -> str:
        return str(self.run_dir / name)

    def create(self, name: str) -> str:
        """/run/netns/<name> with its loopback up; an existing one is kept (idempotent)."""
        # pyroute2 on first use: importing it costs ~10 MB, and an agent without
        # sandboxes never needs it.
        from pyroute2 import IPRoute
        from pyroute2 import netns as pyroute2_netns

        self._check_ours(name)
        path = self.path(name)
        if not is_netns(path):
            if os.path.lexists(path):
                # a file left by a crash between "create mountpoint" and "mount": retry
                os.unlink(path)
            try:
                pyroute2_netns.create(path)
            except OSError as error:
                raise SandboxError(f"cannot create namespace {name}: {error}") from error
        with entered(path), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return path

    def adopt(self, spec: str) -> str:
        """The path of an existing namespace given by name (under /run/netns) or path."""
        path = spec if "/" in spec else self.path(_valid_name(spec))
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise SandboxError(f"no network namespace at {path}")
        if not is_netns(path):
            raise SandboxError(f"{path} is not a network namespace")
        return path

    def delete(self, name: str) -> None:
        """Unmount and remove /run/netns/<name> (ours only) and its /etc/netns files."""
        from pyroute2 import netns as pyroute2_netns  # on first use, as in `create`

        self._check_ours(name)
        path = self.path(name)
        if os.path.lexists(path):
            try:
                pyroute2_netns.remove(path)
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise SandboxError(f"cannot remove namespace {name}: {error}") from error
        shutil.rmtree(self.etc_dir / name, ignore_errors=True)

    def list(self, prefix: str) -> list[str]:
        """The names under /run/netns that start with `prefix` (sorted)."""
        try:
            entries = os.listdir(self.run_dir)
        except FileNotFoundError:
            return []
        return sorted(name for name in entries if name.startswith(prefix))

    def write_resolv_conf(self, name: str) -> None:
        """/etc/netns/<name>/resolv.conf: the agent's DNS inside the sandbox."""
        _valid_name(name)
        directory = self.etc_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "resolv.conf"
        text = f"nameserver {SANDBOX_DNS}\noptions ndots:0\n"
        with contextlib.suppress(FileNotFoundError):
            if target.read_text() == text:
                return
        scratch = directory / ".resolv.conf.new"
        scratch.write_text(text)
        os.replace(scratch, target)

    def _check_ours(self, name: str) -> None:
        _valid_name(name)
        if not name.startswith(self.prefix):
            raise SandboxError(f"namespace {name} is not ours (prefix {self.prefix})")


def is_netns(path: str) -> bool:
    """Whether `path` is (a mount of) a network namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False  # not an nsfs file (e.g. the empty mountpoint file)
    finally:
        os.close(fd)


def _valid_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > NAME_MAX or "\0" in name:
        raise SandboxError(f"{name!r} is not a valid namespace name")
    return name
