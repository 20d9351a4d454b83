"""DNS inside sandboxes: 127.0.0.11:53 in a real namespace, asked by dig and glibc (root).

A `DnsService` runs in this process, on an event loop in a thread, answering
on loopback of the host namespace as the agent does; `open_sandbox` is called
from the test's own thread (as the sandbox manager calls it from its worker
thread). Each test makes its own namespaces (`t15dns-<pid>-<n>`, lo down as
`ip netns add` leaves it), with `/etc/netns/<name>/resolv.conf` naming only
127.0.0.11, and removes them (and that directory) whatever happens. No link,
address or route is made anywhere: the sandboxes need only their loopback.

Every assertion is made by a real client inside the namespace: `dig` (UDP and
TCP) through `nsenter --net`, and glibc's resolver through `getent hosts`
under `ip netns exec` (which bind-mounts the namespace's resolv.conf).
Names the mesh does not own are forwarded to a `FakeUpstream` on the host's
loopback, as any host lookup would be.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dns.querystats import queries_of
from dns.service import DnsService, DnsSettings
from dns.upstreams import Upstream
from mesh.core.model import (
    Change,
    Endpoint,
    Health,
    Kind,
    Network,
    Record,
    Sandbox,
    Service,
    Task,
    Vip,
)
from tests.helpers.dns_upstream import FakeUpstream

pytestmark = [pytest.mark.root]

T = TypeVar("T")
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
OUTSIDE = ("outside.example", "192.0.2.10")
SLACK = 5.0  # seconds: a generous bound for what should take a fraction of one
_names = itertools.count()


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in ("ip", "dig", "getent", "nsenter") if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


if (_reason := _skip_reason()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def run(argv: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class Namespace:
    """A named namespace with a resolv.conf naming 127.0.0.11; removed on `delete`."""

    def __init__(self) -> None:
        self.name = f"t15dns-{os.getpid()}-{next(_names)}"
        self.path = str(NETNS_RUN / self.name)
        done = run(["ip", "netns", "add", self.name])
        assert done.returncode == 0, done.stderr
        etc = NETNS_ETC / self.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions timeout:2 attempts:1\n")

    def dig(self, name: str, *, tcp: bool = False, qtype: str = "A") -> tuple[str, list[str]]:
        """(status, answers) of `dig @127.0.0.11` from inside."""
        argv = ["nsenter", f"--net={self.path}", "--", "dig", "@127.0.0.11", name, qtype]
        argv += ["+tries=1", "+time=2", "+noall", "+comments", "+answer"]
        argv += ["+tcp"] if tcp else ["+notcp"]
        done = run(argv)
        status = next(
            (
                line.split("status: ")[1].split(",")[0]
                for line in done.stdout.splitlines()
                if "status: " in line
            ),
            f"no reply ({done.stdout.strip()[-120:]})",
        )
        answers = sorted(
            line.split()[-1]
            for line in done.stdout.splitlines()
            if line and not line.startswith(";") and line.split()[3:4] == [qtype]
        )
        return status, answers

    def getent(self, name: str) -> list[str]:
        """What glibc's resolver gives a program inside (its /etc/resolv.conf: ours).

        `getent hosts` (gethostbyname2), not `ahostsv4`: getaddrinfo's
        AI_ADDRCONFIG finds no IPv4 address but loopback here and asks nothing.
        """
        done = run(["ip", "netns", "exec", self.name, "getent", "hosts", name])
        return sorted({line.split()[0] for line in done.stdout.splitlines() if line.strip()})

    def delete(self) -> None:
        run(["ip", "netns", "delete", self.name])
        shutil.rmtree(NETNS_ETC / self.name, ignore_errors=True)


class LoopThread:
    """An asyncio loop in a thread, for a service the test talks to from its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def soon(self, work: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return work()

        return self.call(wrapped())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def vip(network: str, address: str) -> Vip:
    return Vip(network=network, address=address)


def sandboxed(task_id: str, service: str, **addresses: str) -> Task:
    endpoints = tuple(
        Endpoint(network=n, address=a, mac="02:42:00:00:00:00", interface=f"eth{i}")
        for i, (n, a) in enumerate(addresses.items())
    )
    return Task(
        id=task_id,
        name=f"{service}.1.{task_id}",
        service=service,
        slot=1,
        node="n1",
        address=endpoints[0].address,
        health=Health.HEALTHY,
        sandbox=Sandbox(netns=f"/run/netns/x-{task_id}", endpoints=endpoints),
    )


API = Service(name="api", id="s2", networks=("a",), vips=(vip("a", "10.41.1.3"),))


def records() -> list[Record]:
    return [
        Network(name="a", id="na", driver="bridge", subnet="10.41.1.0/24", gateway="10.41.1.1"),
        Network(name="b", id="nb", driver="bridge", subnet="10.41.2.0/24", gateway="10.41.2.1"),
        Network(name="c", id="nc", driver="bridge", subnet="10.41.3.0/24", gateway="10.41.3.1"),
        Service(
            name="web",
            id="s1",
            networks=("a", "b"),
            vips=(vip("a", "10.41.1.2"), vip("b", "10.41.2.2")),
            aliases={"a": ("front-door",), "b": ("back-door",)},
        ),
        API,
        Service(name="secret", id="s3", networks=("c",), vips=(vip("c", "10.41.3.3"),)),
        Service(name="db", id="s4", networks=("a", "b"), endpoint_mode="dnsrr"),
        sandboxed("t1", "db", a="10.41.1.21", b="10.41.2.21"),
        sandboxed("t2", "db", a="10.41.1.22", b="10.41.2.22"),
    ]


@pytest.fixture
def dns() -> Iterator[tuple[DnsService, LoopThread]]:
    upstream = FakeUpstream({OUTSIDE[0]: [OUTSIDE[1]]}, host="127.0.0.1").start()
    loop = LoopThread()
    service = DnsService(
        DnsSettings(
            host="127.0.0.1",
            port=0,
            upstreams=(Upstream(*upstream.address),),
            sandbox_check_interval=0.2,
        )
    )
    service.load(records())
    try:
        loop.call(service.start())
        yield service, loop
    finally:
        loop.call(service.stop())
        loop.stop()
        upstream.stop()


@pytest.fixture
def namespaces() -> Iterator[Callable[[], Namespace]]:
    made: list[Namespace] = []

    def make() -> Namespace:
        ns = Namespace()
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()


DnsFixture = tuple[DnsService, LoopThread]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_sandbox_sees_exactly_its_networks(
    dns: DnsFixture, namespaces: Callable[[], Namespace], tcp: bool
) -> None:
    service, _ = dns
    on_a, on_ba = namespaces(), namespaces()
    started = time.monotonic()
    service.open_sandbox("ta", on_a.path, ("a",))
    service.open_sandbox("tba", on_ba.path, ("b", "a"))
    status, first = on_a.dig("web", tcp=tcp)
    print(f"first answer inside a fresh sandbox {time.monotonic() - started:.3f} s after opening")
    assert (status, first) == ("NOERROR", ["10.41.1.2"])

    # a service on both networks: each sandbox its own VIP (the first of ITS networks)
    assert on_ba.dig("web", tcp=tcp) == ("NOERROR", ["10.41.2.2"])
    assert on_a.dig("api", tcp=tcp) == ("NOERROR", ["10.41.1.3"])
    assert on_ba.dig("api", tcp=tcp) == ("NOERROR", ["10.41.1.3"])
    # a service on no network of the sandbox: not a name there
    assert on_a.dig("secret", tcp=tcp)[0] == "NXDOMAIN"
    assert on_a.dig("tasks.secret", tcp=tcp)[0] == "NXDOMAIN"
    assert on_a.dig("secret.c", tcp=tcp)[0] == "NXDOMAIN"
    # tasks with an address per network: the one on the asker's network
    assert on_a.dig("tasks.db", tcp=tcp) == ("NOERROR", ["10.41.1.21", "10.41.1.22"])
    assert on_ba.dig("tasks.db", tcp=tcp) == ("NOERROR", ["10.41.2.21", "10.41.2.22"])
    # aliases: on their network only
    assert on_a.dig("front-door", tcp=tcp) == ("NOERROR", ["10.41.1.2"])
    assert on_a.dig("back-door", tcp=tcp)[0] == "NXDOMAIN"
    assert on_ba.dig("back-door", tcp=tcp) == ("NOERROR", ["10.41.2.2"])
    # reverse names inside the sandbox's subnets only
    assert on_ba.dig("2.2.41.10.in-addr.arpa", qtype="PTR", tcp=tcp) == ("NOERROR", ["web.b."])
    assert on_a.dig("2.2.41.10.in-addr.arpa", qtype="PTR", tcp=tcp)[0] == "NXDOMAIN"
    # everything else is forwarded, as from the host
    assert on_a.dig(OUTSIDE[0], tcp=tcp) == ("NOERROR", [OUTSIDE[1]])
    stats = service.stats()
    print({k: v for k, v in stats.items() if k.startswith("sandbox")})
    assert stats["sandboxes_open"] == 2
    assert stats.get("sandbox_tcp_accepted", 0) >= (15 if tcp else 0)
    # every answer above counted by type and rcode, in the sandbox scope (GET /metrics)
    assert dict(queries_of(service.metric_counts())) == {
        ("A", "NOERROR", "sandbox"): 9,
        ("A", "NXDOMAIN", "sandbox"): 4,
        ("PTR", "NOERROR", "sandbox"): 1,
        ("PTR", "NXDOMAIN", "sandbox"): 1,
    }


def test_glibc_inside_a_sandbox(dns: DnsFixture, namespaces: Callable[[], Namespace]) -> None:
    service, _ = dns
    on_a, on_b = namespaces(), namespaces()
    service.open_sandbox("ta", on_a.path, ("a",))
    service.open_sandbox("tb", on_b.path, ("b",))
    assert on_a.getent("web") == ["10.41.1.2"]
    assert on_b.getent("web") == ["10.41.2.2"]
    assert on_a.getent("api") == ["10.41.1.3"]
    assert on_b.getent("api") == []  # api is on a only
    assert on_b.getent("secret") == []
    assert on_a.getent("front-door") == ["10.41.1.2"]
    assert on_b.getent("front-door") == []
    assert on_b.getent("back-door") == ["10.41.2.2"]
    assert on_b.getent("db") == ["10.41.2.21", "10.41.2.22"]
    assert on_a.getent(OUTSIDE[0]) == [OUTSIDE[1]]


def test_changes_idempotence_close_and_a_vanished_namespace(
    dns: DnsFixture, namespaces: Callable[[], Namespace]
) -> None:
    service, loop = dns
    kept, doomed = namespaces(), namespaces()
    service.open_sandbox("kept", kept.path, ("b",))
    service.open_sandbox("kept", kept.path, ("b",))  # again: nothing new
    service.open_sandbox("doomed", doomed.path, ("a",))
    assert service.stats()["sandbox_opened"] == 2
    assert kept.dig("api") == ("NXDOMAIN", [])

    # a live change: api joins b, with an alias there
    after = Service(
        name="api",
        id="s2",
        networks=("a", "b"),
        vips=(vip("a", "10.41.1.3"), vip("b", "10.41.2.3")),
        aliases={"b": ("gateway-api",)},
    )
    loop.soon(lambda: service.on_change(Change(Kind.SERVICE, "api", API, after)))
    assert kept.dig("api") == ("NOERROR", ["10.41.2.3"])
    assert kept.dig("gateway-api", tcp=True) == ("NOERROR", ["10.41.2.3"])
    assert doomed.dig("gateway-api")[0] == "NXDOMAIN"

    # the sandbox's networks change: the same namespace again updates the view
    service.open_sandbox("kept", kept.path, ("a",))
    assert kept.dig("web") == ("NOERROR", ["10.41.1.2"])
    assert kept.dig("gateway-api")[0] == "NXDOMAIN"
    assert service.stats()["sandbox_opened"] == 2

    # the namespace goes away under us: its listeners are closed and counted
    started = time.monotonic()
    doomed.delete()
    while service.stats()["sandbox_vanished"] < 1 and time.monotonic() - started < SLACK:
        time.sleep(0.05)
    print(f"vanished namespace noticed in {time.monotonic() - started:.3f} s")
    stats = service.stats()
    assert stats["sandbox_vanished"] == 1
    assert stats["sandboxes_open"] == 1

    # closed: nothing answers inside any more, twice is fine
    service.close_sandbox("kept")
    service.close_sandbox("kept")
    deadline = time.monotonic() + SLACK
    while kept.dig("web")[0] == "NOERROR" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept.dig("web")[0].startswith("no reply")
    assert kept.dig("web", tcp=True)[0].startswith("no reply")
    assert service.stats()["sandbox_closed"] == 1
    assert service.stats()["sandboxes_open"] == 0


def test_a_namespace_that_cannot_be_entered_is_an_error_and_counted(dns: DnsFixture) -> None:
    service, _ = dns
    with pytest.raises(FileNotFoundError):
        service.open_sandbox("nowhere", "/run/netns/t15dns-does-not-exist", ("a",))
    assert service.stats()["sandbox_open_failed"] == 1
    assert service.stats()["sandboxes_open"] == 0
