"""Which conntrack entries of a removed real the nftables backend deletes."""

from __future__ import annotations

from lb.nft.conntrack import IPS_DST_NAT, IPS_SEEN_REPLY, flushed
from lb.table import VirtualKey

TCP = VirtualKey("tcp", "10.9.9.9", 80)
UDP = VirtualKey("udp", "10.9.9.9", 53)
ASSURED = 1 << 2


def test_an_answered_tcp_flow_is_left_to_finish() -> None:
    # a task that failed its health check keeps the connections it serves
    assert not flushed(TCP, IPS_DST_NAT | IPS_SEEN_REPLY | ASSURED)


def test_an_unanswered_tcp_flow_is_deleted_so_the_next_syn_is_balanced_anew() -> None:
    assert flushed(TCP, IPS_DST_NAT)


def test_every_udp_flow_is_deleted() -> None:
    assert flushed(UDP, IPS_DST_NAT)
    assert flushed(UDP, IPS_DST_NAT | IPS_SEEN_REPLY | ASSURED)
