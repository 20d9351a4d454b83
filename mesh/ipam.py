"""IP address management: subnets for networks, VIPs for services.

Pure bookkeeping with no I/O. Networks get a subnet, either given or the next
free /24 of the address pool (Swarm carves its default pool 10.0.0.0/8 the
same way); overlapping subnets are refused. The built-in ingress network,
which holds a VIP for every service that publishes a port, gets a /16 of the
pool (`ingress_prefix`), as kube-proxy's service range is far larger than one
network's. Inside a subnet the gateway (the first host address unless given)
and the aux addresses (`--aux-address`, as Docker) are reserved and never handed
out. VIPs are the lowest free host addresses of the subnet; sandbox endpoint
addresses the lowest free ones of the network's `ip_range` (or the subnet).
Both come from one set of claimed addresses, so a VIP never takes an
endpoint's address nor an endpoint a VIP's. The store keeps an `Ipam` in step
with every change, so an address is claimed exactly while a live service or
task holds it.
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


def parse_address_in(text: str, subnet: IPv4Network, what: str) -> IPv4Address:
    """An IPv4 host address of `subnet` (not its network or broadcast address)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"{what} {text!r} is not an IPv4 address") from None
    if not isinstance(address, IPv4Address):
        raise Invalid(f"{what} {text!r}: only IPv4 is supported")
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
        raise Invalid(f"{what} {address} is not a host address of subnet {subnet}")
    return address


def parse_ip_range(text: str, subnet: IPv4Network) -> IPv4Network:
    """A CIDR inside `subnet` that sandbox addresses come from (Docker's --ip-range)."""
    try:
        ip_range = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise Invalid(
            f"ip_range {text!r} is not an IPv4 CIDR such as 10.0.1.128/25: {exc}"
        ) from None
    if not isinstance(ip_range, IPv4Network):
        raise Invalid(f"ip_range {text!r}: only IPv4 is supported")
    if not ip_range.subnet_of(subnet):
        raise Invalid(f"ip_range {ip_range} is not inside subnet {subnet}")
    return ip_range


@dataclass(slots=True)
class _Pool:
    subnet: IPv4Network
    claimed: set[IPv4Address] = field(default_factory=set)
    #: every VIP address below this one is claimed: where the search for a free one
    #: starts, so filling a /16 costs one step per VIP, not one per address before it
    floor: int = 0
    #: the gateway and aux addresses: never claimed, never released, never handed out
    reserved: frozenset[IPv4Address] = frozenset()
    #: where endpoint addresses come from; None: the whole subnet
    ip_range: IPv4Network | None = None
    #: as `floor`, for endpoint addresses
    endpoint_floor: int = 0


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

    def add_network(
        self,
        name: str,
        subnet: IPv4Network,
        *,
        overlap_ok: bool = False,
        gateway: IPv4Address | None = None,
        ip_range: IPv4Network | None = None,
        aux: Iterable[IPv4Address] = (),
    ) -> None:
        """Track a network's subnet; `overlap_ok`: it exists already (written elsewhere),
        so an overlap is recorded rather than refused. `gateway` (default: the first
        host address) and `aux` are reserved; endpoints come from `ip_range`."""
        other = None if overlap_ok else self.overlapping(subnet)
        if other is not None and other != name:
            raise Conflict(f"subnet {subnet} overlaps network {other!r}", code="subnet_overlaps")
        reserved = frozenset([gateway or gateway_of(subnet), *aux])
        self._networks.setdefault(name, _Pool(subnet, reserved=reserved, ip_range=ip_range))

    def remove_network(self, name: str) -> None:
        self._networks.pop(name, None)

    # -- VIPs ------------------------------------------------------------

    def allocate(self, network: str) -> IPv4Address:
        """Claim the lowest free host address of `network` for a VIP."""
        pool = self._networks[network]
        first = int(pool.subnet.network_address) + 1
        last = int(pool.subnet.broadcast_address) - 1
        found = _lowest_free(pool, max(first, pool.floor), last)
        pool.floor = last + 1 if found is None else int(found) + 1
        if found is None:
            raise Conflict(
                f"network {network} ({pool.subnet}) has no free address: all "
                f"{capacity_of(pool.subnet)} are VIPs of services or sandbox endpoints",
                code="no_free_address",
            )
        return found

    def allocate_endpoint(self, network: str, within: IPv4Network | None = None) -> IPv4Address:
        """Claim the lowest free address of `network`'s ip_range (or subnet) for a sandbox;
        `within`: only from this part of it (a macvlan network's slice for this node)."""
        pool = self._networks[network]
        span = within or pool.ip_range or pool.subnet
        # the subnet's network and broadcast addresses are never hosts, whatever the range
        first = max(int(span.network_address), int(pool.subnet.network_address) + 1)
        last = min(int(span.broadcast_address), int(pool.subnet.broadcast_address) - 1)
        if within is not None:  # the floor is the whole range's, not this slice's
            found = _lowest_free(pool, first, last)
        else:
            found = _lowest_free(pool, max(first, pool.endpoint_floor), last)
            pool.endpoint_floor = last + 1 if found is None else int(found) + 1
        if found is None:
            raise Conflict(
                f"network {network} has no free address for a sandbox in {span}: "
                "every one is a VIP, an endpoint or reserved",
                code="no_free_address",
            )
        return found

    def prefixlen(self, network: str) -> int:
        return self._networks[network].subnet.prefixlen

    def claim(self, network: str, address: IPv4Address) -> None:
        """Mark an address taken (on load, or a VIP or endpoint that gossip brought in)."""
        pool = self._networks.get(network)
        if pool is not None and address not in pool.reserved:
            pool.claimed.add(address)

    def release(self, network: str, addresses: Iterable[IPv4Address]) -> None:
        pool = self._networks.get(network)
        if pool is not None:
            for address in addresses:
                pool.claimed.discard(address)
                pool.floor = min(pool.floor, int(address))
                pool.endpoint_floor = min(pool.endpoint_floor, int(address))

    def is_claimed(self, network: str, address: IPv4Address) -> bool:
        """Taken: claimed, or reserved (the gateway, an aux address)."""
        pool = self._networks.get(network)
        return pool is not None and (address in pool.claimed or address in pool.reserved)

    def claimed_count(self, network: str) -> int:
        pool = self._networks.get(network)
        return 0 if pool is None else len(pool.claimed)


def _lowest_free(pool: _Pool, first: int, last: int) -> IPv4Address | None:
    """Claim and return the lowest address in [first, last] neither claimed nor reserved."""
    for value in range(first, last + 1):
        address = IPv4Address(value)
        if address not in pool.claimed and address not in pool.reserved:
            pool.claimed.add(address)
            return address
    return None
