"""`mesh.core.netns.entered`: into a namespace and back (root: makes one namespace)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from mesh.core import netns
from tests.helpers.netns import unavailable


def test_a_missing_path_raises_and_leaves_the_thread_where_it_was() -> None:
    before = netns.current()
    with pytest.raises(FileNotFoundError), netns.entered("/run/netns/no-such-namespace-x"):
        pass
    assert netns.current() == before


def test_a_file_that_is_no_namespace_is_refused() -> None:
    before = netns.current()
    with pytest.raises(netns.NetnsError, match="setns"), netns.entered("/proc/self/status"):
        pass
    assert netns.current() == before


@pytest.fixture
def namespace() -> Iterator[str]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    name = f"t15drv-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_entered_switches_this_thread_only_and_comes_back(namespace: str) -> None:
    path = f"/run/netns/{namespace}"
    before = netns.current()
    inside = os.readlink(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net")
    assert inside == before
    with netns.entered(path):
        assert netns.current() == f"net:[{os.stat(path).st_ino}]"
        assert netns.current() != before
        # netlink made here sees the fresh namespace: its loopback and nothing else
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
    assert netns.current() == before


def test_an_exception_inside_still_comes_back(namespace: str) -> None:
    before = netns.current()
    with pytest.raises(RuntimeError), netns.entered(f"/run/netns/{namespace}"):
        raise RuntimeError("boom")
    assert netns.current() == before
