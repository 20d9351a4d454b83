"""The `ipvs` L4 backend: the kernel's IP Virtual Server, programmed as Swarm does it."""

from lb.ipvs.backend import DEFAULT_TIMEOUTS, IpvsBackend
from lb.ipvs.netlink import Timeouts

__all__ = ["DEFAULT_TIMEOUTS", "IpvsBackend", "Timeouts"]
