"""IP address management: subnets for networks, VIPs for services.

Pure bookkeeping with no I/O. Networks get a subnet, either given or the next
free /24 of the address pool (Swarm carves its default pool 10.0.0.0/8 the
same way); overlapping subnets are refused. The built-in ingress network,
which holds a VIP for every service that publishes a port, gets a /16 of the
pool (`ingress_prefix`), as kube-proxy's service range is far larger than one
network's. Inside a subnet the first host address is the gateway and is never
handed out; VIPs are the lowest free host addresses after it. The store keeps
an `Ipam` in step with every change, so an address is claimed exactly while a
live service holds it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.errors import Conflict, Invalid

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

DEFAULT_POOL = "10.0.0.0/8"
#: Without root the VIPs must work on loopback, so the pool lies in 127/8; it
#: starts above 127.0.0.0/24, which holds 127.0.0.1 and the DNS address 127.0.0.11.
UNPRIVILEGED_POOL = "127.16.0.0/12"
SUBNET_PREFIX = 24
#: The ingress network's size when the pool has room for it (65,533 VIPs).
INGRESS_PREFIX = 16


def parse_subnet(text: str) -> IPv4Network:
    """A strict IPv4 CIDR with room for a gateway and at least one VIP."""
    try:
        subnet = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise Invalid(f"subnet {text!r} is not an IPv4 CIDR such as 10.0.1.0/24: {exc}") from None
    if not isinstance(subnet, IPv4Network):
        raise Invalid(f"subnet {text!r}: only IPv4 networks are supported")
    if subnet.prefixlen > 29:
        raise Invalid(f"subnet {text!r} is too small: the prefix may be at most /29")
    return subnet


def parse_pool(text: str) -> IPv4Network:
    pool = parse_subnet(text)
    if pool.prefixlen > SUBNET_PREFIX:
        raise Invalid(f"address pool {text!r} must be /{SUBNET_PREFIX} or larger")
    return pool


def ingress_prefix(pool: IPv4Network) -> int:
    """A /16 for ingress; from a pool of /16 or smaller, half of it (a /24 pool: all of it),
    so that other networks still find room."""
    return min(max(INGRESS_PREFIX, pool.prefixlen + 1), SUBNET_PREFIX)


def gateway_of(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address + 1


def capacity_of(subnet: IPv4Network) -> int:
    """How many VIPs a subnet holds: its host addresses but the gateway."""
    return subnet.num_addresses - 3  # the network and broadcast addresses, the gateway


@dataclass(slots=True)
class _Pool:
    subnet: IPv4Network
    claimed: set[IPv4Address] = field(default_factory=set)
    #: every VIP address below this one is claimed: where the search for a free one
    #: starts, so filling a /16 costs one step per VIP, not one per address before it
    floor: int = 0


class Ipam:
    """Subnets of live networks and the VIPs claimed inside each."""

    def __init__(self, pool: IPv4Network) -> None:
        self.pool = pool
        self._networks: dict[str, _Pool] = {}

    def __repr__(self) -> str:
        used = sum(len(p.claimed) for p in self._networks.values())
        return f"<Ipam pool={self.pool} networks={len(self._networks)} vips={used}>"

    # -- subnets ---------------------------------------------------------

    def overlapping(self, subnet: IPv4Network) -> str | None:
        """The name of a network whose subnet overlaps `subnet`, if any."""
        for name, pool in self._networks.items():
            if pool.subnet.overlaps(subnet):
                return name
        return None

    def next_subnet(self, prefix: int = SUBNET_PREFIX) -> IPv4Network:
        """The first /`prefix` of the pool that overlaps no network."""
        for candidate in self.pool.subnets(new_prefix=prefix):
            if self.overlapping(candidate) is None:
                return candidate
        raise Conflict(
            f"address pool {self.pool} has no free /{prefix} left: give the "
            "network a subnet outside it, or remove a network",
            code="pool_exhausted",
        )

    def add_network(self, name: str, subnet: IPv4Network, *, overlap_ok: bool = False) -> None:
        """Track a network's subnet; `overlap_ok`: it exists already (written elsewhere),
        so an overlap is recorded rather than refused."""
        other = None if overlap_ok else self.overlapping(subnet)
        if other is not None and other != name:
            raise Conflict(f"subnet {subnet} overlaps network {other!r}", code="subnet_overlaps")
        self._networks.setdefault(name, _Pool(subnet))

    def remove_network(self, name: str) -> None:
        self._networks.pop(name, None)

    # -- VIPs ------------------------------------------------------------

    def allocate(self, network: str) -> IPv4Address:
        """Claim the lowest free host address of `network` after its gateway."""
        pool = self._networks[network]
        first = int(gateway_of(pool.subnet)) + 1
        last = int(pool.subnet.broadcast_address) - 1
        for value in range(max(first, pool.floor), last + 1):
            address = IPv4Address(value)
            if address not in pool.claimed:
                pool.claimed.add(address)
                pool.floor = value + 1
                return address
        pool.floor = last + 1
        raise Conflict(
            f"network {network} ({pool.subnet}) has no free address: all "
            f"{capacity_of(pool.subnet)} are VIPs of services",
            code="no_free_address",
        )

    def claim(self, network: str, address: IPv4Address) -> None:
        """Mark an address taken (on load, or a VIP that gossip brought in)."""
        pool = self._networks.get(network)
        if pool is not None:
            pool.claimed.add(address)

    def release(self, network: str, addresses: Iterable[IPv4Address]) -> None:
        pool = self._networks.get(network)
        if pool is not None:
            for address in addresses:
                pool.claimed.discard(address)
                pool.floor = min(pool.floor, int(address))

    def is_claimed(self, network: str, address: IPv4Address) -> bool:
        pool = self._networks.get(network)
        return pool is not None and address in pool.claimed

    def claimed_count(self, network: str) -> int:
        pool = self._networks.get(network)
        return 0 if pool is None else len(pool.claimed)
