"""sd_notify (mesh/agent/sdnotify.py) against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.agent.sdnotify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_states_go_in_one_datagram_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "OTHER": "x"}
    notifier = Notifier.from_environment(env)
    # Taken out of the environment: the agent's children do not inherit it.
    assert env == {"OTHER": "x"}
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notifier.notify("STOPPING=1")
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_an_abstract_socket_is_named_with_at() -> None:
    name = f"meshplane-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert socket_address(f"@{name}") == b"\0" + name.encode()
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier.from_environment({}).notify("READY=1")
    for unusable in ("", "@", "vsock:2:1234", "relative/path"):
        assert socket_address(unusable) is None
    # A socket that went away: counted, never raised.
    gone = Notifier(str(tmp_path / "absent"))
    assert not gone.notify("READY=1")
    assert gone.failed == 1


def test_watchdog_pings_at_half_the_interval_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}, 42) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}, 42) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
