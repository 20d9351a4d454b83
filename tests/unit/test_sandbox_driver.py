"""The driver registry (mesh/sandbox/driver.py)."""

from __future__ import annotations

import pytest

from mesh.sandbox.bridge import BridgeDriver
from mesh.sandbox.driver import Driver, available, create_driver


def test_bridge_is_registered_by_name() -> None:
    assert "bridge" in available()
    driver: Driver = create_driver("bridge", "/run/netns/some-node")
    assert isinstance(driver, BridgeDriver)
    assert driver.name == "bridge" and driver.node_netns == "/run/netns/some-node"


def test_an_unknown_driver_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no kernel driver for networks of driver 'ipvlan'"):
        create_driver("ipvlan")
