"""Fixtures for cluster tests: fresh network namespaces and agents running inside them.

Every test here needs root and `ip netns`; without them the whole tier is
skipped with the reason, never failed. `lab` gives a module its own
namespaces (unique names, removed afterwards however the module ends), and
`NetnsAgent` is the integration tests' `AgentProcess` moved into a namespace:
started with `ip netns exec`, its API reached from a thread that has joined
the namespace, so the API can stay on the namespace's own 127.0.0.1.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord

from tests.helpers.agent import AgentProcess
from tests.helpers.netns import Lab, Netns, unavailable

API = "127.0.0.1:2377"  # inside the node's namespace, so the default port is free
#: a mesh-space name: answered NXDOMAIN by the agent itself, never forwarded
PROBE = bytes(DNSRecord.question("tasks.probe", "A").pack())


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip (with the reason) where namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lab(netns_ready: None) -> Iterator[Lab]:
    with Lab("mpdns") as made:
        yield made


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


class NetnsAgent(AgentProcess):
    """A real `mesh agent` process inside `ns`, its API on the namespace's loopback."""

    def __init__(
        self,
        ns: Netns,
        data_dir: Path,
        *,
        dns: tuple[str, int] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        super().__init__(data_dir, node_name=f"{ns.name}-agent", extra=extra)
        self.ns = ns
        self.dns = dns
        self.api = API

    def argv(self) -> list[str]:
        # The flags given in `extra` come last, so they win over the loopback
        # defaults of AgentProcess (--dns, --address-pool).
        return self.ns.argv(super().argv())

    def start(self, timeout: float = 20.0) -> NetnsAgent:
        """Start; wait for the API, then for the DNS over UDP (when `dns` was given)."""
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while not self.dns_answers():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent's DNS does not answer:\n{self.log()}")
            time.sleep(0.05)
        return self

    def dns_answers(self) -> bool:
        """Whether the DNS answers one UDP query (a mesh-space name: never forwarded)."""
        if self.dns is None:
            return True
        dns = self.dns

        def ask() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2.0)
                try:
                    sock.sendto(PROBE, dns)
                    return bool(sock.recv(512))
                except OSError:  # a timeout, or ICMP port unreachable
                    return False

        return self.ns.call(ask)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        return self.ns.call(AgentProcess.request, self, method, path, body, raw, headers, timeout)

    def api_ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        """A request that must answer `status`; its JSON body."""
        got, payload = self.request(method, path, body)
        assert got == status, f"{method} {path} answered {got}: {payload}"
        return payload

    def shutdown(self) -> None:
        """Stop (kill if it hangs); fail if it ever answered with an internal error."""
        if self.proc is None:
            return
        try:
            self.stop(timeout=10)
        except Exception:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        log = self.log()
        for marker in ("api_internal_error", "dns_internal_error"):
            assert marker not in log, f"the agent logged {marker}:\n{log}"
