"""`--join NAME`: real agents join through a local dnsmasq serving A and SRV records.

dnsmasq runs on a free port of 127.0.0.1 (`--join-resolver` points the agent at it),
reading its names from a hosts directory it watches (a record written there later is
served from then on) and SRV records from its command line. The agents gossip on
127.0.0.x with the local profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess, free_port, members

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed")


class Dnsmasq:
    def __init__(self, root: Path, srv: list[str]) -> None:
        self.hosts = root / "dns-hosts"
        self.hosts.mkdir()
        self.log = root / "dnsmasq.log"
        self.srv = srv
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def add(self, name: str, *addresses: str) -> None:
        """Serve `name` with these addresses from now on (dnsmasq watches the directory);
        written whole, then renamed into place, so it never reads half a file."""
        tmp = self.hosts.parent / f".{name}.tmp"
        tmp.write_text("".join(f"{a} {name}\n" for a in addresses))
        tmp.rename(self.hosts / name)

    def start(self) -> Dnsmasq:
        for _ in range(5):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            proc = subprocess.Popen(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-hosts",
                    "--no-resolv",
                    "--no-negcache",
                    f"--hostsdir={self.hosts}",
                    *(f"--srv-host={s}" for s in self.srv),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    f"--port={port}",
                    "--pid-file=",
                    "--user=root",
                    "--log-queries",
                    f"--log-facility={self.log}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.2),
                ):
                    self.proc, self.port = proc, port
                    return self
                time.sleep(0.05)
            proc.terminate()
            proc.wait(10)
        pytest.fail("dnsmasq did not start on any of 5 free ports")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextlib.contextmanager
def dnsmasq(root: Path, srv: list[str] | None = None) -> Iterator[Dnsmasq]:
    server = Dnsmasq(root, srv or [])
    try:
        yield server.start()
    finally:
        server.stop()


def agent_at(
    root: Path,
    index: int,
    port: int,
    extra: list[str] | None = None,
    kind: type[AgentProcess] = AgentProcess,
) -> AgentProcess:
    address = f"127.0.0.{index + 2}"
    agent = kind(
        root / f"n{index}",
        node_name=f"n{index}",
        publish_address=address,
        extra=["--advertise", f"{address}:{port}", "--gossip-profile", "local", *(extra or [])],
    )
    agent.gossip_addr = (address, port)
    return agent


def wait_members(agent: AgentProcess, names: set[str], within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        seen = members(agent)
        if {n for n, s in seen.items() if s == "alive"} >= names:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{agent.node_name} sees {members(agent)}, not {names}:\n{agent.log()}")


def wait_log(agent: AgentProcess, text: str, within: float, count: int = 1) -> None:
    deadline = time.monotonic() + within
    while agent.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.log().count(text) >= count, agent.log()


@contextlib.contextmanager
def running(*agents: AgentProcess) -> Iterator[None]:
    try:
        for agent in agents:
            agent.start()
        yield
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()


def test_a_name_with_several_a_records_joins_through_the_one_that_answers(
    tmp_path: Path,
) -> None:
    port = free_port()
    with dnsmasq(tmp_path) as dns:
        # 127.0.0.9 has no agent: the round tries every address, one answer is enough.
        dns.add("seeds.test", "127.0.0.9", "127.0.0.2")
        seed = agent_at(tmp_path, 0, port)
        joiner = agent_at(
            tmp_path,
            1,
            port,
            ["--join", f"seeds.test:{port}", "--join-resolver", f"127.0.0.1:{dns.port}"],
        )
        with running(seed, joiner):
            took = wait_members(joiner, {"n0", "n1"}, within=20)
            wait_members(seed, {"n0", "n1"}, within=20)
            print(f"joined through an A name in {took:.2f} s after the API answered")
            wait_log(joiner, "event=cluster_joined", within=10)
        assert "seeds.test" in dns.log.read_text()


def test_an_srv_record_gives_the_seeds_and_their_port(tmp_path: Path) -> None:
    port = free_port()
    # The SRV record carries the gossip port: `--join srv.test` names none (default 7946,
    # where nothing listens), so a join proves the SRV answer was used.
    with dnsmasq(tmp_path, srv=[f"_mesh._tcp.srv.test,n0.test,{port},0,10"]) as dns:
        dns.add("n0.test", "127.0.0.2")
        seed = agent_at(tmp_path, 0, port)
        joiner = agent_at(
            tmp_path, 1, port, ["--join", "srv.test", "--join-resolver", f"127.0.0.1:{dns.port}"]
        )
        with running(seed, joiner):
            took = wait_members(joiner, {"n0", "n1"}, within=20)
            print(f"joined through an SRV record in {took:.2f} s")
        assert "_mesh._tcp.srv.test" in dns.log.read_text()


def test_a_name_that_resolves_later_still_joins_by_retrying(tmp_path: Path) -> None:
    port = free_port()
    with dnsmasq(tmp_path) as dns:
        seed = agent_at(tmp_path, 0, port)
        joiner = agent_at(
            tmp_path,
            1,
            port,
            ["--join", f"late.test:{port}", "--join-resolver", f"127.0.0.1:{dns.port}"],
        )
        with running(seed, joiner):
            wait_log(joiner, "event=join_retry", within=20, count=2)
            assert set(members(joiner)) == {"n1"}
            added = time.monotonic()
            dns.add("late.test", "127.0.0.2")
            wait_members(joiner, {"n0", "n1"}, within=40)
            took = time.monotonic() - added
            print(f"joined {took:.2f} s after the record was added")
            log = joiner.log()
            retries = log.count("event=join_retry")
            # One line per failed round, each naming the name and why it gave nothing.
            counts = joiner.request("GET", "/v1/gossip")[1]["counts"]
            assert counts["join_rounds_failed"] == retries
            assert 'unresolved="late.test(' in log, log
            print(f"failed rounds before the record: {retries}")
            assert took < 35  # the back-off is bounded (30 s at most, one round after)


def test_retry_join_max_gives_up_with_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    with dnsmasq(tmp_path) as dns:
        agent = agent_at(
            tmp_path,
            0,
            port,
            [
                "--join",
                f"nowhere.test:{port}",
                "--join-resolver",
                f"127.0.0.1:{dns.port}",
                "--retry-join-max",
                "2",
            ],
        )
        started = time.monotonic()
        proc = subprocess.run(
            agent.argv(),
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd=REPO,
            check=False,
        )
        print(f"gave up after {time.monotonic() - started:.2f} s")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("event=join_retry") == 2
    assert "giving up (--retry-join-max 2)" in proc.stderr


class NamespacedAgent(AgentProcess):
    """The agent in the test's network namespace, in a mount namespace of its own where
    /etc/resolv.conf is the test's file: the host's resolver, as the agent sees it."""

    ns = ""
    resolv_conf = Path()

    def argv(self) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(self.resolv_conf),
            *super().argv(),
        ]

    def request(  # type: ignore[override]
        self, method: str, path: str, body: object = None, timeout: float = 10.0, **_: object
    ) -> tuple[int, object]:
        data = (
            [] if body is None else ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        )
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "curl",
                "-s",
                "-m",
                str(timeout),
                "-X",
                method,
                *data,
                "-w",
                "\\n%{http_code}",
                f"http://{self.api}{path}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        text, _, code = done.stdout.rpartition("\n")
        return int(code or 0), json.loads(text) if text.strip() else None


@pytest.mark.root
def test_without_join_resolver_the_hosts_resolv_conf_is_asked(tmp_path: Path) -> None:
    """The DaemonSet's case: no --join-resolver, the name's SRV record is asked of the
    resolvers in /etc/resolv.conf (here dnsmasq on port 53 of a fresh namespace's
    loopback); `--join seeds.test` names no port, the SRV record gives it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    ns = f"mesh-join-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    dns: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        hosts = tmp_path / "dns-hosts"
        hosts.mkdir()
        (hosts / "n0").write_text("127.0.0.2 n0.test\n")
        port = free_port()
        dns = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                f"--hostsdir={hosts}",
                f"--srv-host=_mesh._tcp.seeds.test,n0.test,{port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
                "--pid-file=",
                "--user=root",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        conf = tmp_path / "resolv.conf"
        conf.write_text("nameserver 127.0.0.1\n")
        NamespacedAgent.ns, NamespacedAgent.resolv_conf = ns, conf
        seed = agent_at(tmp_path, 0, port, kind=NamespacedAgent)
        joiner = agent_at(tmp_path, 1, port, ["--join", "seeds.test"], kind=NamespacedAgent)
        with running(seed, joiner):
            took = wait_members(joiner, {"n0", "n1"}, within=20)
            print(f"joined through the host's resolv.conf in {took:.2f} s")
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
