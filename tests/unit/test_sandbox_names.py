"""The names of the kernel objects the agent owns (mesh/sandbox/names.py)."""

from __future__ import annotations

import hashlib

import pytest

from mesh.sandbox import names


def test_node_id_is_six_hex_of_sha256() -> None:
    assert names.node_id("node-1") == hashlib.sha256(b"node-1").hexdigest()[:6]
    assert len(names.node_id("x")) == 6
    assert names.node_id("a") != names.node_id("b")


def test_netns_names_carry_the_node_prefix() -> None:
    prefix = names.netns_prefix("node-1")
    assert prefix == f"mp-{names.node_id('node-1')}-"
    assert names.netns_name("node-1", "abc123") == prefix + "abc123"
    assert names.netns_path("mp-x-y") == "/run/netns/mp-x-y"


def test_interface_names_fit_ifnamsiz() -> None:
    task = "0123456789abcdef0123"
    assert names.bridge_name("fedcba9876543210") == "mpbr-fedcba98"
    assert names.veth_name(task, 0) == "mpv012345670"
    assert names.veth_name(task, 15) == "mpv01234567f"
    for name in (names.bridge_name(task), names.veth_name(task, 15)):
        assert len(name) <= names.IFNAME_MAX
    assert names.sandbox_interface(2) == "eth2"


@pytest.mark.parametrize("index", [-1, 16])
def test_veth_index_is_one_hex_digit(index: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        names.veth_name("abcdef12", index)


def test_mac_is_docker_style() -> None:
    assert names.mac_of("10.0.1.5") == "02:42:0a:00:01:05"
    assert names.mac_of("172.18.255.254") == "02:42:ac:12:ff:fe"
    with pytest.raises(ValueError, match="4 octets"):
        names.mac_of("fe80::1")
