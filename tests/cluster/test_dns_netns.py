"""The embedded DNS as real clients in other network namespaces see it.

Topology (fresh namespaces per module, removed afterwards):

    client-a 10.10.1.200 ──veth── 10.10.1.1 ┐
                                            node: agent, DNS on 10.10.0.53:53 (lo),
    client-b 10.10.2.200 ──veth── 10.10.2.1 ┘       API on 127.0.0.1:2377,
             10.10.2.21, .22 (hc tasks' HTTP)       upstreams 127.0.0.2:53, 127.0.0.3:53

The mesh networks are `front` (10.10.1.0/24) and `back` (10.10.2.0/24), so
client A asks from `front` and client B from `back`, and both reach the one
DNS address through their default route. Each client's /etc/resolv.conf
(via /etc/netns/<ns>/resolv.conf) names only that address, so `getent` goes
through the agent as any program would. Every assertion is made by a real
client: `dig` in a client namespace, or glibc's resolver through `getent`.

The upstream resolvers are `FakeUpstream`s bound inside the node namespace;
the first one can be made a black hole or stopped to see the failover.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from dns.service import DnsSettings
from tests.cluster.conftest import NetnsAgent, require_tools
from tests.helpers.dns_upstream import FakeUpstream
from tests.helpers.netns import Lab, Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

DNS = "10.10.0.53"
A_ADDR, B_ADDR = "10.10.1.200", "10.10.2.200"
UPSTREAMS = ("127.0.0.2", "127.0.0.3")
WEB_TASKS = (("10.10.1.101", 31001), ("10.10.1.102", 31002))
DB_TASKS = ("10.10.2.101", "10.10.2.102")
HC_TASKS = ("10.10.2.21", "10.10.2.22")
HC_PORT = 8081
HC_INTERVAL = 0.2
EXT = "192.0.2.10"
BIG = [f"192.0.2.{100 + i}" for i in range(30)]  # under 512 bytes of answers
HUGE = [f"192.0.2.{150 + i}" for i in range(40)]  # over 512 bytes of answers
DIG_TIMEOUT = 6  # seconds; glibc's resolver gives up after 5
UPSTREAM_TIMEOUT = DnsSettings("", 0).upstream_timeout  # per upstream attempt (no flag yet)
SLACK = 5.0

TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


# -- clients -------------------------------------------------------------------------------


@dataclass
class Reply:
    """What `dig` printed, parsed: the status, the flags and the records per section."""

    status: str
    flags: set[str]
    answer: list[tuple[str, str, str]]  # (owner, type, data)
    additional: list[tuple[str, str, str]]
    seconds: float
    text: str

    def data(self, rtype: str = "A") -> list[str]:
        return [d for _, t, d in self.answer if t == rtype]


def dig(
    ns: Netns, name: str, qtype: str = "A", *, tcp: bool = False, reverse: bool = False
) -> Reply:
    argv = ["dig", f"@{DNS}", "+nocookie", "+tries=1", f"+timeout={DIG_TIMEOUT}", "+nostats"]
    if tcp:
        argv.append("+tcp")
    argv += ["-x", name] if reverse else [name, qtype]
    start = time.monotonic()
    done = ns.run(argv, check=False, timeout=DIG_TIMEOUT + 5)
    seconds = time.monotonic() - start
    assert done.returncode == 0, f"{' '.join(argv)}: no reply\n{done.stdout}{done.stderr}"
    return parse_dig(done.stdout, seconds)


def parse_dig(text: str, seconds: float) -> Reply:
    status = re.search(r"status: (\w+)", text)
    flags = re.search(r";; flags: ([a-z ]*);", text)
    sections: dict[str, list[tuple[str, str, str]]] = {}
    current: list[tuple[str, str, str]] | None = None
    for line in text.splitlines():
        heading = re.match(r";; (\w+) SECTION:", line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif not line.strip():
            current = None
        elif current is not None and not line.startswith(";"):
            owner, _ttl, _cls, rtype, *rest = line.split()
            current.append((owner, rtype, " ".join(rest)))
    assert status is not None, text
    return Reply(
        status.group(1),
        set(flags.group(1).split()) if flags else set(),
        sections.get("ANSWER", []),
        sections.get("ADDITIONAL", []),
        seconds,
        text,
    )


def getent(ns: Netns, database: str, name: str) -> tuple[int, list[str]]:
    """glibc's answer through the client's resolv.conf: exit code and the addresses."""
    done = ns.run(["getent", database, name], check=False, timeout=15)
    return done.returncode, sorted({line.split()[0] for line in done.stdout.splitlines()})


# -- the task side of health checks ------------------------------------------------------


class HealthServer:
    """One HTTP server on every address of a namespace; /health fails for `failing` addresses."""

    def __init__(self, ns: Netns, port: int) -> None:
        self.failing: set[str] = set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                local = self.connection.getsockname()[0]
                code = 500 if local in owner.failing else 200
                self.send_response(code if self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ns.call(http.server.ThreadingHTTPServer, ("0.0.0.0", port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, daemon=True, name="health-server"
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab
    node: Netns
    a: Netns
    b: Netns
    agent: NetnsAgent
    upstreams: list[FakeUpstream]
    health: HealthServer
    vips: dict[str, dict[str, str]] = field(default_factory=dict)  # service -> network -> VIP
    tasks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # service -> tasks


def build_topology(lab: Lab) -> tuple[Netns, Netns, Netns]:
    node, a, b = lab.namespace("node"), lab.namespace("client-a"), lab.namespace("client-b")
    node.add_address("lo", f"{DNS}/32")
    for client, side, gateway, address in (
        (a, "a", "10.10.1.1", A_ADDR),
        (b, "b", "10.10.2.1", B_ADDR),
    ):
        lab.veth(node, f"to-{side}", client, "eth0")
        node.add_address(f"to-{side}", f"{gateway}/24")
        client.add_address("eth0", f"{address}/24")
        client.add_route("default", gateway)
        client.write_resolv_conf(DNS, options="timeout:5 attempts:1")
    for address in HC_TASKS:
        b.add_address("eth0", f"{address}/24")
    return node, a, b


def upstream_records(index: int) -> dict[str, list[str]]:
    common = {f"ext-{kind}.example": [EXT] for kind in ("udp", "tcp", "getent")}
    own = {f"failover-{kind}.example": [f"192.0.2.{index}"] for kind in ("blackhole", "stopped")}
    return {**common, **own, "big.example": BIG, "huge.example": HUGE}


def start_upstream(node: Netns, index: int) -> FakeUpstream:
    """A fake upstream bound in the node namespace (its thread is started from inside)."""
    upstream = FakeUpstream(upstream_records(index + 1), host=UPSTREAMS[index], port=53)
    return node.call(upstream.start)


def register(cluster: Cluster) -> None:
    agent = cluster.agent
    for name, subnet in (("front", "10.10.1.0/24"), ("back", "10.10.2.0/24")):
        agent.api_ok("POST", "/v1/networks", {"name": name, "subnet": subnet}, 201)
    services: list[dict[str, Any]] = [
        {
            "name": "web",
            "networks": ["front"],
            "ports": [{"target_port": 80, "published_port": 8080}],
        },
        {"name": "db", "networks": ["back"], "endpoint_mode": "dnsrr"},
        {"name": "shared", "networks": ["front", "back"]},
        {
            "name": "hc",
            "networks": ["back"],
            "endpoint_mode": "dnsrr",
            "health_check": {
                "type": "http",
                "port": HC_PORT,
                "path": "/health",
                "interval": HC_INTERVAL,
                "timeout": 1,
                "retries": 1,
            },
        },
    ]
    for spec in services:
        made = agent.api_ok("POST", "/v1/services", spec, 201)
        cluster.vips[spec["name"]] = {v["network"]: v["address"] for v in made["vips"]}
    tasks: list[tuple[str, dict[str, Any]]] = [
        *(("web", {"address": ip, "ports": {"80": port}}) for ip, port in WEB_TASKS),
        *(("db", {"address": ip}) for ip in DB_TASKS),
        ("shared", {"address": "10.10.1.103"}),
        *(("hc", {"address": ip}) for ip in HC_TASKS),
    ]
    for service, body in tasks:
        made = agent.api_ok("POST", f"/v1/services/{service}/tasks", body, 201)
        cluster.tasks.setdefault(service, []).append(made)
    for task in cluster.tasks["hc"]:
        wait_for_health(agent, task["id"], "healthy")


def wait_for_health(agent: NetnsAgent, task_id: str, wanted: str) -> float:
    start = time.monotonic()
    while True:
        task = agent.api_ok("GET", f"/v1/tasks/{task_id}")
        if task["health"] == wanted:
            return time.monotonic() - start
        assert time.monotonic() - start < SLACK, f"task never turned {wanted}: {task}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cluster(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools("dig", "getent")
    node, a, b = build_topology(lab)
    upstreams: list[FakeUpstream] = []
    health: HealthServer | None = None
    agent: NetnsAgent | None = None
    try:
        upstreams = [start_upstream(node, i) for i in range(len(UPSTREAMS))]
        health = HealthServer(b, HC_PORT)
        data_dir: Path = tmp_path_factory.mktemp("dns-netns") / "data"
        agent = NetnsAgent(
            node,
            data_dir,
            dns=(DNS, 53),
            extra=[
                "--dns",
                f"{DNS}:53",
                "--address-pool",
                "10.10.64.0/18",
                "--dns-ttl",
                "5",
                *(arg for up in UPSTREAMS for arg in ("--dns-upstream", up)),
            ],
        )
        agent.start()
        made = Cluster(lab, node, a, b, agent, upstreams, health)
        register(made)
        yield made
    finally:
        if agent is not None:
            agent.shutdown()
        if health is not None:
            health.close()
        for upstream in upstreams:
            upstream.stop()


def task_addresses(cluster: Cluster, service: str) -> list[str]:
    return sorted(t["address"] for t in cluster.tasks[service])


# -- names -----------------------------------------------------------------------------------


@TRANSPORTS
def test_service_name_is_the_vip_on_the_askers_network(cluster: Cluster, tcp: bool) -> None:
    web = dig(cluster.a, "web", tcp=tcp)
    assert (web.status, web.data()) == ("NOERROR", [cluster.vips["web"]["front"]])
    assert "aa" in web.flags
    assert dig(cluster.a, "shared", tcp=tcp).data() == [cluster.vips["shared"]["front"]]
    assert dig(cluster.b, "shared", tcp=tcp).data() == [cluster.vips["shared"]["back"]]
    assert cluster.vips["shared"]["front"] != cluster.vips["shared"]["back"]


@TRANSPORTS
def test_tasks_name_and_dnsrr_service_give_task_addresses(cluster: Cluster, tcp: bool) -> None:
    assert sorted(dig(cluster.a, "tasks.web", tcp=tcp).data()) == task_addresses(cluster, "web")
    assert sorted(dig(cluster.b, "tasks.db", tcp=tcp).data()) == task_addresses(cluster, "db")
    assert sorted(dig(cluster.b, "db", tcp=tcp).data()) == task_addresses(cluster, "db")


@TRANSPORTS
def test_task_name_is_its_address(cluster: Cluster, tcp: bool) -> None:
    for task in cluster.tasks["web"]:
        assert task["name"].startswith("web.")
        assert dig(cluster.a, task["name"], tcp=tcp).data() == [task["address"]]


@TRANSPORTS
@pytest.mark.parametrize("port", [80, 8080], ids=["target", "published"])
def test_srv_gives_the_tasks_real_ports(cluster: Cluster, tcp: bool, port: int) -> None:
    reply = dig(cluster.a, f"_{port}._tcp.web", "SRV", tcp=tcp)
    assert reply.status == "NOERROR"
    got = sorted((int(d.split()[2]), d.split()[3]) for d in reply.data("SRV"))
    tasks = {t["name"]: t for t in cluster.tasks["web"]}
    assert got == sorted((t["ports"]["80"], f"{n}.") for n, t in tasks.items())
    glue = {owner.rstrip("."): data for owner, rtype, data in reply.additional if rtype == "A"}
    assert glue == {n: t["address"] for n, t in tasks.items()}


@TRANSPORTS
def test_ptr_of_a_task_and_of_a_vip(cluster: Cluster, tcp: bool) -> None:
    task = cluster.tasks["web"][0]
    assert dig(cluster.a, task["address"], tcp=tcp, reverse=True).data("PTR") == [
        f"{task['name']}.front."
    ]
    vip = cluster.vips["web"]["front"]
    assert dig(cluster.a, vip, tcp=tcp, reverse=True).data("PTR") == ["web.front."]


@TRANSPORTS
def test_other_names_are_forwarded_upstream(cluster: Cluster, tcp: bool) -> None:
    name = f"ext-{'tcp' if tcp else 'udp'}.example"
    reply = dig(cluster.a, name, tcp=tcp)
    assert (reply.status, reply.data()) == ("NOERROR", [EXT])
    transport: Literal["udp", "tcp"] = "tcp" if tcp else "udp"
    assert any(up.count(transport, name) for up in cluster.upstreams)
    missing = dig(cluster.a, "missing.example", tcp=tcp)
    assert (missing.status, missing.answer) == ("NXDOMAIN", [])


def test_truncated_upstream_answer_is_fetched_over_tcp(cluster: Cluster) -> None:
    first = cluster.upstreams[0]
    first.truncate_udp = True
    try:
        reply = dig(cluster.a, "big.example")
    finally:
        first.truncate_udp = False
    assert sorted(reply.data()) == sorted(BIG)
    assert first.count("udp", "big.example") >= 1 and first.count("tcp", "big.example") >= 1


@pytest.mark.parametrize("failure", ["blackhole", "stopped"])
def test_dead_first_upstream_fails_over_to_the_second(cluster: Cluster, failure: str) -> None:
    first = cluster.upstreams[0]
    name = f"failover-{failure}.example"
    if failure == "blackhole":
        first.dead = True  # reads every query, answers none: only the timeout tells
    else:
        first.stop()  # the port is closed: ICMP port unreachable
    try:
        reply = dig(cluster.a, name)
    finally:
        if failure == "blackhole":
            first.dead = False
        else:
            cluster.upstreams[0] = start_upstream(cluster.node, 0)
    print(
        f"\nfailover ({failure} first upstream): answered in {reply.seconds:.3f}s "
        f"(per-upstream timeout {UPSTREAM_TIMEOUT}s)"
    )
    assert (reply.status, reply.data()) == ("NOERROR", ["192.0.2.2"])  # the second's answer
    assert reply.seconds < UPSTREAM_TIMEOUT + 2.0, "slower than one upstream timeout"
    if failure == "blackhole":
        assert first.count("udp", name) >= 1  # it was tried first, and timed out
    else:
        assert reply.seconds < UPSTREAM_TIMEOUT, "a closed port should fail over at once"


@TRANSPORTS
def test_misses_in_mesh_space_are_nxdomain_never_forwarded(cluster: Cluster, tcp: bool) -> None:
    for name in ("tasks.nope", "nope.front"):
        reply = dig(cluster.a, name, tcp=tcp)
        assert (reply.status, reply.answer) == ("NXDOMAIN", []), name
        assert all(up.count(name=name) == 0 for up in cluster.upstreams), name


def test_system_resolver_through_resolv_conf(cluster: Cluster) -> None:
    vip = cluster.vips["web"]["front"]
    assert getent(cluster.a, "ahostsv4", "web") == (0, [vip])
    assert getent(cluster.a, "hosts", "web") == (0, [vip])
    for database in ("ahostsv4", "hosts"):  # getaddrinfo, and gethostbyname2 (AAAA, then A)
        assert getent(cluster.a, database, "tasks.web") == (0, task_addresses(cluster, "web"))
        assert getent(cluster.a, database, "ext-getent.example") == (0, [EXT])
    assert getent(cluster.b, "ahostsv4", "shared") == (0, [cluster.vips["shared"]["back"]])


@pytest.mark.parametrize("name", ["tasks.many", "huge.example"], ids=["mesh", "forwarded"])
def test_long_answer_is_truncated_with_its_question_so_glibc_retries_over_tcp(
    cluster: Cluster, name: str
) -> None:
    agent, b = cluster.agent, cluster.b
    many = [f"10.10.2.{110 + i}" for i in range(40)]  # 40 A records: over 512 bytes
    if name == "tasks.many":
        agent.api_ok(
            "POST",
            "/v1/services",
            {"name": "many", "networks": ["back"], "endpoint_mode": "dnsrr"},
            201,
        )
        for address in many:
            agent.api_ok("POST", "/v1/services/many/tasks", {"address": address}, 201)
    done = b.run(
        ["dig", f"@{DNS}", "+noedns", "+ignore", "+tries=1", "+timeout=3", name], check=False
    )
    assert "QUERY: 1," in done.stdout and " tc " in done.stdout, done.stdout
    # glibc's resolver sends no EDNS unless told: it must get TC and retry over TCP
    assert getent(b, "ahostsv4", name) == (0, sorted(many if name == "tasks.many" else HUGE))


# -- network scoping ---------------------------------------------------------------------------


def test_names_are_scoped_to_the_askers_network(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    for name in ("db", "tasks.db", "db.back"):  # db is on back only
        reply = dig(a, name)
        assert reply.data() == [] and reply.status == "NXDOMAIN", name
    for name in ("web", "tasks.web"):  # web is on front only
        reply = dig(b, name)
        assert reply.data() == [] and reply.status == "NXDOMAIN", name
    assert dig(b, cluster.tasks["web"][0]["address"], reverse=True).data("PTR") == []
    assert getent(a, "ahostsv4", "db")[1] == []
    assert getent(b, "ahostsv4", "web")[1] == []


# -- health ------------------------------------------------------------------------------------


def test_unhealthy_task_leaves_the_answers_at_once(cluster: Cluster) -> None:
    b, agent = cluster.b, cluster.agent
    sick, well = cluster.tasks["hc"]
    both = sorted([sick["address"], well["address"]])
    for _ in range(2):  # the second pair is answered from the responder's cache
        assert sorted(dig(b, "tasks.hc").data()) == both
        assert sorted(dig(b, "hc").data()) == both
    cluster.health.failing.add(sick["address"])
    try:
        took = wait_for_health(agent, sick["id"], "unhealthy")
        tasks_hc, hc = dig(b, "tasks.hc"), dig(b, "hc")  # no pause after the API said so
        over_tcp = dig(b, "tasks.hc", tcp=True)
    finally:
        cluster.health.failing.discard(sick["address"])
    print(
        f"\nunhealthy recorded {took:.2f}s after /health began failing "
        f"(interval {HC_INTERVAL}s, retries 1)"
    )
    assert tasks_hc.data() == [well["address"]]
    assert hc.data() == [well["address"]]
    assert over_tcp.data() == [well["address"]]
    took = wait_for_health(agent, sick["id"], "healthy")
    assert sorted(dig(b, "tasks.hc").data()) == both
    print(f"healthy again {took:.2f}s after it recovered")
