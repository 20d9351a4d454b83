"""A real `mesh agent` process on loopback, for integration tests.

The agent runs as a separate process (`python -m mesh agent`), exactly as an
operator starts it, on free ports of 127.0.0.1 and a private data dir, with a
127.x address pool so that nothing it allocates leaves loopback.

Gossip is encrypted by default (docs/gossip.md "Secure by default"): an agent
that joins needs the cluster's key. Unless a test chooses its own (`--keyring`,
`--token`, `--token-file`, `--insecure-gossip`, MESH_JOIN_TOKEN) every agent
here gets `--keyring` with one shared test key (a private copy each, since a
keyring change rewrites the file), so any two of them can form a cluster, with
real encryption, as they did in plaintext before.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.helpers.sessions import xdist_worker

REPO = Path(__file__).resolve().parents[2]

#: the gossip key every test agent shares unless its test gives its own (see above)
TEST_GOSSIP_KEY = base64.b64encode(bytes(range(7, 39))).decode()
#: the flags (and variable) by which a test chooses its agent's gossip security itself
GOSSIP_SECURITY_FLAGS = ("--keyring", "--token", "--token-file", "--insecure-gossip")


class NotTheAgentsAnswer(AssertionError):
    """An answer on the agent's API port that is not the API's JSON."""


#: ports this test process handed out already: never twice, even once released
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def bindable(port: int, address: str = "0.0.0.0") -> bool:
    """Nothing holds `port` on `address`, TCP or UDP (on 0.0.0.0: on any address)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports for a test's listeners, none handed out before.

    They are below the kernel's ephemeral range: a port of that range, released
    after the check, can be taken as the local port of any connection the test
    makes next (an API request, a gossip stream), and a client socket on
    127.0.0.1:P, even in TIME_WAIT for 60 s after, makes an agent's 0.0.0.0:P
    listener fail with EADDRINUSE (seen in CI: a published port never answered).
    Each pytest-xdist worker takes only the ports of its own residue (port modulo
    the workers): two workers never hand out one port, even in the second between
    a check and the agent's bind.
    """
    low, high = _ephemeral_range()
    # below the ephemeral range; above it where that starts too low to leave room
    first, last = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    index, workers = xdist_worker()
    ports: list[int] = []
    generator = random.SystemRandom()
    for _ in range(10_000):
        if len(ports) == count:
            return ports
        port = generator.randint(first, last)
        port -= (port - index) % workers  # this worker's residue, at or below the pick
        if port < first or port in _HANDED_OUT or not bindable(port):
            continue
        _HANDED_OUT.add(port)
        ports.append(port)
    raise RuntimeError(f"no {count} free ports in {first}-{last}")


def free_port() -> int:
    return free_ports(1)[0]


class AgentProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        node_name: str = "node-1",
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        publish_address: str = "127.0.0.1",
        nofile: int | None = None,
        sandboxes: bool = False,
        tls: ssl.SSLContext | None = None,
        shared_key: bool = True,
    ) -> None:
        self.data_dir = data_dir
        #: the client side of an agent started with --api-tls-cert: its API is https
        self.tls = tls
        #: give the shared test key (`--keyring`) unless the test chose gossip's security
        self.shared_key = shared_key
        #: keep CAP_SYS_ADMIN: only for an agent inside a test's own node namespace
        self.may_make_sandboxes = sandboxes
        #: RLIMIT_NOFILE (soft and hard) to start the agent under, as `prlimit` would
        self.nofile = nofile
        # Published ports on this address, not 0.0.0.0: agents share the host.
        self.publish_address = publish_address
        self.node_name = node_name
        # Distinct: the API, DNS, gossip and HTTP ports of one agent must never collide.
        self.port, self.dns_port, self.gossip_port, self.http_port = free_ports(4)
        self.api = f"127.0.0.1:{self.port}"
        self.gossip_addr = ("127.0.0.1", self.gossip_port)
        self.extra = extra or []
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-agent.log"

    def argv(self) -> list[str]:
        self.write_shared_keyring()  # before any start, `refused` in tests included
        return [
            *self._unprivileged(),
            sys.executable,
            "-m",
            "mesh",
            "agent",
            "--node-name",
            self.node_name,
            "--data-dir",
            str(self.data_dir),
            "--api",
            self.api,
            "--address-pool",
            "127.64.0.0/12",
            "--drain-grace",
            "0.5",
            "--dns",
            f"127.0.0.1:{self.dns_port}",
            "--advertise",
            f"127.0.0.1:{self.gossip_port}",
            # The userspace load balancer: tests run many agents on one host, and a
            # kernel backend would program the host's own tables.
            "--lb",
            "userspace",
            "--publish-address",
            self.publish_address,
            "--http",
            f"127.0.0.1:{self.http_port}",
            # Nothing listens on port 9 of loopback: names the mesh does not own get
            # SERVFAIL at once, and no test query ever leaves the machine.
            "--dns-upstream",
            "127.0.0.1:9",
            *self.gossip_security(),
            *self.extra,
        ]

    def gossip_security(self) -> list[str]:
        """`--keyring` with the shared test key, unless the test chose otherwise."""
        chosen = any(flag in self.extra for flag in GOSSIP_SECURITY_FLAGS)
        if not self.shared_key or chosen or "MESH_JOIN_TOKEN" in (self.env or {}):
            return []
        return ["--keyring", str(self.keyring_path)]

    @property
    def keyring_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-keyring.json"

    def write_shared_keyring(self) -> None:
        if self.gossip_security() and not self.keyring_path.exists():
            self.keyring_path.parent.mkdir(parents=True, exist_ok=True)
            self.keyring_path.write_text(json.dumps({"keys": [TEST_GOSSIP_KEY]}))
            self.keyring_path.chmod(0o600)

    def _unprivileged(self) -> list[str]:
        """Without CAP_SYS_ADMIN, a root agent cannot make sandboxes or bridges: an agent
        of these tests runs in the host's own namespace, where no test may make a link
        (CAP_NET_ADMIN stays, for the kernel LB backends)."""
        if self.may_make_sandboxes or os.geteuid() != 0 or shutil.which("setpriv") is None:
            return []
        return ["setpriv", "--bounding-set", "-sys_admin", "--"]

    def start(self, timeout: float = 20.0) -> AgentProcess:
        env = dict(os.environ, **(self.env or {}))
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                preexec_fn=self._limits,
            )
        self.wait_healthy(timeout)
        return self

    def _limits(self) -> None:
        """In the child, before exec: the descriptor limit the test asked for."""
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        other: NotTheAgentsAnswer | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                seen = f" (before, on its port: {other})" if other else ""
                raise RuntimeError(f"agent exited with {self.proc.returncode}{seen}:\n{self.log()}")
            try:
                status, _ = self.request("GET", "/v1/health")
                if status == 200:
                    return
            except OSError:
                pass  # not listening yet
            except NotTheAgentsAnswer as answer:
                other = answer  # another server on the port: the agent's bind fails
            time.sleep(0.05)
        raise TimeoutError(f"agent did not answer within {timeout}s ({other}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            f"{'https' if self.tls else 'http'}://{self.api}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.tls) as resp:
                payload = resp.read()
                status = resp.status
                server = resp.headers.get("Server")
        except urllib.error.HTTPError as err:
            payload = err.read()
            status = err.code
            server = err.headers.get("Server")
        try:
            return status, (json.loads(payload) if payload else None)
        except ValueError:
            # The API answers JSON, always: anything else is another server on the port,
            # or a bug; say which, with what the agent logged (a bare JSONDecodeError
            # in CI said neither).
            alive = self.proc is not None and self.proc.poll() is None
            raise NotTheAgentsAnswer(
                f"{method} {path} on {self.api}: HTTP {status} from server {server!r} is "
                f"not JSON: {payload[:300]!r}; the agent is "
                f"{'running' if alive else 'not running'}; its log ends:\n{self.log()[-3000:]}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@contextlib.contextmanager
def gossip_cluster(
    root: Path,
    count: int,
    *,
    profile: str = "local",
    extra: Callable[[int], list[str]] | None = None,
) -> Iterator[list[AgentProcess]]:
    """`count` agents named n0, n1, ... on 127.0.0.2, .3, ... (one gossip port), all
    joined to n0, started in order and stopped (if still running) on the way out."""
    port = free_port()
    agents = [
        AgentProcess(
            root / f"n{i}",
            node_name=f"n{i}",
            publish_address=f"127.0.0.{i + 2}",
            extra=[
                "--advertise",
                f"127.0.0.{i + 2}:{port}",
                "--gossip-profile",
                profile,
                *(["--join", f"127.0.0.2:{port}"] if i else []),
                *(extra(i) if extra else []),
            ],
        )
        for i in range(count)
    ]
    for i, agent in enumerate(agents):
        agent.gossip_addr = (f"127.0.0.{i + 2}", port)
    try:
        for agent in agents:
            agent.start()
        yield agents
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()


def members(agent: AgentProcess) -> dict[str, str]:
    """Member name -> status, as `agent` sees the cluster."""
    return {m["name"]: m["status"] for m in agent.request("GET", "/v1/members")[1]}
