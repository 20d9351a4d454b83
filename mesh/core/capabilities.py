"""The Linux capabilities the agent runs with, and what each one it lacks turns off.

The agent needs no full root. Its features need these capabilities (in the
effective set; an agent started by systemd gets them as ambient capabilities, so
the tools it runs, `nft`, `ip`, `sysctl`, and its worker processes, inherit them):

- CAP_NET_ADMIN: the kernel load balancers (IPVS over netlink, the nftables
  table), the sysctls they set (`net.*`, writable with CAP_NET_ADMIN in the
  agent's network namespace), and every link, address and route of a sandbox;
- CAP_NET_BIND_SERVICE: the listeners on ports below 1024 (DNS on :53, the HRM
  on :80/:443, published ports below 1024 of the userspace proxy);
- CAP_SYS_ADMIN, only where sandboxes are used: `unshare` and the bind mount of
  a named network namespace under /run/netns.

Nothing else is needed: no raw sockets (CAP_NET_RAW: health checks are TCP and
HTTP), no CAP_SYS_RESOURCE (the agent raises its RLIMIT_NOFILE soft limit up to
the hard one only; `LimitNOFILE=` sets both), no CAP_SYS_MODULE (ip_vs is used
when loaded, and a missing one is `--lb auto`'s reason to pass over it).

Read from `/proc/self/status` (`CapEff:`): no library. This module does no I/O
but the one read in `effective()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

#: the capabilities the agent's features use, by the names systemd's
#: `AmbientCapabilities=` and `capsh` know them by
NAMES = {
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
}

#: where the kernel lets an unprivileged process bind: ports at or above this one
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def parse_cap_eff(status: str) -> int | None:
    """The CapEff mask of a /proc/<pid>/status text; None when it has no such line."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return None
    return None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """An effective capability set, as a bit mask (bit N: capability number N)."""

    mask: int

    def has(self, capability: int) -> bool:
        return bool(self.mask >> capability & 1)

    @property
    def net_admin(self) -> bool:
        return self.has(CAP_NET_ADMIN)

    @property
    def net_bind_service(self) -> bool:
        return self.has(CAP_NET_BIND_SERVICE)

    @property
    def sys_admin(self) -> bool:
        return self.has(CAP_SYS_ADMIN)


#: every capability: what root has, and what a test asks for when it does not care
ALL = Capabilities((1 << 64) - 1)


def effective(status_path: str = "/proc/self/status") -> Capabilities:
    """This process's effective capabilities (none when the file cannot be read)."""
    try:
        mask = parse_cap_eff(Path(status_path).read_text())
    except OSError:
        mask = None
    return Capabilities(mask or 0)


def unprivileged_port_start(path: Path = UNPRIVILEGED_PORT_START) -> int:
    """The lowest port any process may bind in this network namespace (1024 unless a
    container runtime lowered it: Docker and Kubernetes set 0)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 1024


@dataclass(frozen=True, slots=True)
class Missing:
    """A capability the agent lacks and the features that are off without it."""

    capability: str
    disables: str

    def line(self) -> str:
        return f"no {self.capability}: {self.disables}"


def missing(
    caps: Capabilities,
    *,
    low_ports: list[str],
    kernel_lb: str | None,
    sandboxes: bool,
) -> list[Missing]:
    """One entry per capability this agent's config needs and `caps` lacks.

    `low_ports`: the listeners on ports the kernel keeps for privileged processes
    (e.g. "dns 127.0.0.11:53"); `kernel_lb`: the kernel backend `--lb` asks for by
    name, or "auto" (None: userspace, which needs nothing); `sandboxes`: whether
    this agent would make sandboxes (/run/netns usable).
    """
    found: list[Missing] = []
    if not caps.net_admin:
        what = "sandboxes and bridge/overlay/macvlan networks"
        if kernel_lb == "auto":
            what = f"the kernel load balancers (--lb auto takes userspace), {what}"
        elif kernel_lb is not None:
            what = f"--lb {kernel_lb} (the agent refuses to start), {what}"
        found.append(Missing(NAMES[CAP_NET_ADMIN], what))
    if not caps.net_bind_service and low_ports:
        found.append(
            Missing(
                NAMES[CAP_NET_BIND_SERVICE],
                f"ports below 1024 cannot be bound ({', '.join(low_ports)}: the agent "
                "refuses to start; give it the capability or ports >= 1024)",
            )
        )
    if not caps.sys_admin and sandboxes:
        found.append(
            Missing(
                NAMES[CAP_SYS_ADMIN],
                "sandboxes (network namespaces) are disabled: bridge networks and "
                "sandboxed tasks are refused with 422 needs_privileges",
            )
        )
    return found
