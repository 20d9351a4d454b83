"""The DNS server's TCP connection budget (RFC 7766 §6.2): per client, in all, idle out first."""

from __future__ import annotations

import pytest

from dns.tcpslots import TcpSlots


def test_per_client_limit_refuses_only_that_client() -> None:
    slots = TcpSlots(max_total=10, max_per_client=2)
    assert slots.admit(1, "a") == [] and slots.admit(2, "a") == []
    assert slots.admit(3, "a") is None
    assert slots.admit(4, "b") == []
    slots.release(1)
    assert slots.admit(5, "a") == []
    assert slots.stats["refused_per_client"] == 1 and len(slots) == 3


def test_at_the_cap_the_longest_idle_goes_and_busy_ones_never() -> None:
    slots = TcpSlots(max_total=3, max_per_client=3)
    for conn, client in ((1, "a"), (2, "b"), (3, "c")):
        assert slots.admit(conn, client) == []
    slots.busy(1)  # answering a query: owed a reply, not to be closed
    slots.idle(2)  # 2 just finished a query: now the most recent idle one
    assert slots.admit(4, "d") == [3]
    assert slots.admit(5, "e") == [2]
    slots.busy(4)
    slots.busy(5)
    assert slots.admit(6, "f") is None  # every one busy: refused, nothing lost
    assert slots.stats["evicted_idle"] == 2 and slots.stats["refused_full"] == 1
    slots.release(3)  # the shell releases a victim again when its task ends: no harm
    assert len(slots) == 3
    slots.idle(1)
    assert slots.admit(7, "a") == [1]


def test_victims_free_their_clients_share() -> None:
    slots = TcpSlots(max_total=2, max_per_client=1)
    assert slots.admit(1, "a") == [] and slots.admit(2, "b") == []
    assert slots.admit(3, "c") == [1]
    assert slots.admit(4, "a") == [2]  # a's share is free again


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="room for one TCP connection"):
        TcpSlots(max_total=0)
