"""IPAM: subnets carved from the pool, VIPs handed out once, released with their owner."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import Conflict, Invalid
from mesh.ipam import Ipam, gateway_of, parse_pool, parse_subnet

Net = ipaddress.IPv4Network


def test_next_subnet_is_first_free_24_of_pool() -> None:
    ipam = Ipam(parse_pool("10.0.0.0/8"))
    assert ipam.next_subnet() == Net("10.0.0.0/24")
    ipam.add_network("ingress", Net("10.0.0.0/24"))
    ipam.add_network("big", Net("10.0.2.0/23"))
    assert ipam.next_subnet() == Net("10.0.1.0/24")
    ipam.add_network("c", Net("10.0.1.0/24"))
    assert ipam.next_subnet() == Net("10.0.4.0/24")


def test_overlap_is_refused() -> None:
    ipam = Ipam(parse_pool("127.64.0.0/12"))
    ipam.add_network("a", Net("127.70.0.0/16"))
    assert ipam.overlapping(Net("127.70.1.0/24")) == "a"
    with pytest.raises(Conflict) as info:
        ipam.add_network("b", Net("127.70.1.0/24"))
    assert info.value.code == "subnet_overlaps"


def test_vips_skip_gateway_and_are_never_shared() -> None:
    ipam = Ipam(parse_pool("127.64.0.0/12"))
    subnet = Net("127.64.5.0/29")  # hosts .1-.6, gateway .1
    ipam.add_network("n", subnet)
    got = [ipam.allocate("n") for _ in range(5)]
    assert gateway_of(subnet) not in got
    assert len(set(got)) == 5
    with pytest.raises(Conflict):
        ipam.allocate("n")
    ipam.release("n", [got[2]])
    assert ipam.allocate("n") == got[2]


def test_removed_network_frees_its_subnet() -> None:
    ipam = Ipam(parse_pool("10.0.0.0/16"))
    ipam.add_network("a", ipam.next_subnet())
    ipam.remove_network("a")
    assert ipam.overlapping(Net("10.0.0.0/24")) is None


@pytest.mark.parametrize("text", ["10.0.0.1/24", "nonsense", "::/64", "10.0.0.0/30", ""])
def test_bad_subnets_are_invalid(text: str) -> None:
    with pytest.raises(Invalid):
        parse_subnet(text)


def test_pool_must_hold_a_24() -> None:
    with pytest.raises(Invalid):
        parse_pool("10.0.0.0/25")


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80))
def test_claimed_addresses_are_unique_under_any_sequence(ops: list[tuple[bool, int]]) -> None:
    """Allocate or release in any order: no address is ever held twice."""
    ipam = Ipam(parse_pool("127.64.0.0/12"))
    ipam.add_network("n", Net("127.64.9.0/27"))
    held: list[ipaddress.IPv4Address] = []
    for allocate, index in ops:
        if allocate:
            try:
                address = ipam.allocate("n")
            except Conflict:
                assert len(held) == 29  # /27: 30 hosts minus the gateway
                continue
            assert address not in held
            held.append(address)
        elif held:
            ipam.release("n", [held.pop(index % len(held))])
        assert ipam.claimed_count("n") == len(held)


def test_a_16_fills_to_the_last_address_and_the_lowest_free_is_reused() -> None:
    ipam = Ipam(parse_pool("127.64.0.0/12"))
    ipam.add_network("ingress", Net("127.64.0.0/16"))
    got = [ipam.allocate("ingress") for _ in range(65533)]
    assert got[0] == ipaddress.IPv4Address("127.64.0.2")
    assert got[-1] == ipaddress.IPv4Address("127.64.255.254")
    with pytest.raises(Conflict) as info:
        ipam.allocate("ingress")
    assert info.value.message == (
        "network ingress (127.64.0.0/16) has no free address: all 65533 are VIPs of services"
        " or sandbox endpoints"
    )
    ipam.release("ingress", [got[40000], got[7]])
    assert ipam.allocate("ingress") == got[7]
    assert ipam.allocate("ingress") == got[40000]


@given(
    st.lists(
        st.tuples(st.sampled_from(["allocate", "release", "claim"]), st.integers(0, 40)),
        max_size=120,
    )
)
def test_allocate_always_gives_the_lowest_free_address(ops: list[tuple[str, int]]) -> None:
    """The search floor never skips a free address, whatever was claimed or released."""
    subnet = Net("127.64.9.0/26")
    ipam = Ipam(parse_pool("127.64.0.0/12"))
    ipam.add_network("n", subnet)
    hosts = [a for a in subnet.hosts() if a != gateway_of(subnet)]
    held: set[ipaddress.IPv4Address] = set()
    for op, index in ops:
        address = hosts[index]
        if op == "allocate":
            free = [a for a in hosts if a not in held]
            if not free:
                with pytest.raises(Conflict):
                    ipam.allocate("n")
                continue
            assert ipam.allocate("n") == free[0]
            held.add(free[0])
        elif op == "release":
            ipam.release("n", [address])
            held.discard(address)
        else:
            ipam.claim("n", address)
            held.add(address)


def test_endpoints_and_vips_share_one_set_and_skip_the_reserved() -> None:
    """Sandbox endpoints from the ip_range, VIPs from the subnet: never the gateway, an aux
    address or each other's; the lowest free first, and a released one is found again."""
    ipam = Ipam(parse_pool("10.0.0.0/8"))
    A = ipaddress.IPv4Address
    ipam.add_network(
        "n",
        Net("10.9.0.0/28"),
        gateway=A("10.9.0.9"),
        ip_range=Net("10.9.0.8/29"),
        aux=[A("10.9.0.10")],
    )
    assert ipam.is_claimed("n", A("10.9.0.9")) and ipam.is_claimed("n", A("10.9.0.10"))
    got = [ipam.allocate_endpoint("n") for _ in range(5)]
    assert got == [A(f"10.9.0.{i}") for i in (8, 11, 12, 13, 14)]  # .15 is the broadcast
    with pytest.raises(Conflict) as info:
        ipam.allocate_endpoint("n")
    assert info.value.code == "no_free_address"
    vips = [ipam.allocate("n") for _ in range(7)]
    assert vips == [A(f"10.9.0.{i}") for i in range(1, 8)]  # the subnet below the range
    with pytest.raises(Conflict):
        ipam.allocate("n")
    ipam.release("n", [A("10.9.0.12"), A("10.9.0.9")])  # the gateway is never released
    assert ipam.is_claimed("n", A("10.9.0.9"))
    assert ipam.allocate("n") == A("10.9.0.12")  # a VIP may take a freed endpoint address
    ipam.release("n", [A("10.9.0.11")])
    assert ipam.allocate_endpoint("n") == A("10.9.0.11")
    assert ipam.prefixlen("n") == 28
