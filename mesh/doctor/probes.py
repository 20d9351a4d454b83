"""What `mesh doctor` looks at, from this node: the agent's API, sockets, DNS, tasks.

Everything is read the way an operator would check by hand (`ss -lnp`, `dig`,
`nc`, `ipvsadm -Ln`), from the node the command runs on: sockets and their
owners from /proc (so a port held by another process is named), DNS by real
queries to the embedded server, tasks by a TCP connect, and the L4 table, the
members and the state digests from the agent's API.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from mesh.cli.client import Client
from mesh.cli.errors import ApiError
from mesh.cli.lb import table_of
from mesh.core import net
from mesh.core.net import HostPort
from mesh.core.sockets import SocketOwners, family_of, in_the_way, process_name
from mesh.doctor.checks import Facts, Listener, lb_drift
from mesh.state.store import AUTO_PORTS

CONNECT_TIMEOUT = 2.0
DNS_TIMEOUT = 2.0
#: Seconds a differing peer digest is given to converge before it is reported.
DIGEST_SETTLE = 8.0
#: Seconds a difference between the programmed and the wanted L4 table may be in flight.
LB_SETTLE = 3.0


def gather(
    client: Client, *, settle: float = DIGEST_SETTLE, sleep: Callable[[float], None] = time.sleep
) -> Facts:
    info = client.get("/v1/agent")
    config: dict[str, str] = info.get("config", {})
    facts = Facts(
        node=str(info["node"]), agent_pid=int(info["pid"]), agent_pids=family_of(int(info["pid"]))
    )
    services = [s for s in client.get("/v1/services") if isinstance(s, dict)]
    members = [m for m in client.get("/v1/members") if isinstance(m, dict)]
    facts.members = members
    down = {str(m["name"]) for m in members if m.get("status") in ("dead", "left")}
    tasks = [
        t for t in client.get("/v1/tasks") if isinstance(t, dict) and t.get("node") not in down
    ]
    _lb(facts, client, settle, sleep)
    _listeners(facts, config, services, tasks)
    _dns(facts, config, services, tasks)
    _local_tasks(facts, services, tasks)
    _digests(facts, client, settle, sleep)
    _capacity(facts, client, services)
    return facts


def _capacity(facts: Facts, client: Client, services: list[dict[str, Any]]) -> None:
    """How full each network is (its VIPs) and the range omitted published ports come from."""
    vips: dict[str, set[str]] = {}
    for service in services:
        for vip in service.get("vips", []):
            vips.setdefault(str(vip.get("network")), set()).add(str(vip.get("address")))
        for port in service.get("ports", []):
            if int(port.get("published_port", 0)) in AUTO_PORTS:
                protocol = str(port.get("protocol"))
                facts.auto_ports[protocol] = facts.auto_ports.get(protocol, 0) + 1
    for network in client.get("/v1/networks"):
        if isinstance(network, dict):
            name = str(network["name"])
            facts.networks.append((name, str(network["subnet"]), len(vips.get(name, ()))))


# -- sockets ------------------------------------------------------------------------


def _address(text: str) -> HostPort | None:
    """An address of the agent's configuration (`HOST:PORT`, `[V6]:PORT`), None if it is not."""
    try:
        return net.parse_host_port(text, None, "address")
    except net.AddressError:
        return None


def _listeners(
    facts: Facts,
    config: dict[str, str],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
) -> None:
    owners = SocketOwners()
    wanted: list[tuple[str, str, str]] = []  # what, protocol, HOST:PORT
    advertise = config.get("advertise", "")
    if advertise:
        wanted += [("gossip", "udp", advertise), ("gossip", "tcp", advertise)]
    dns = config.get("dns", "None")
    if dns not in ("None", ""):
        wanted += [("embedded DNS", "udp", dns), ("embedded DNS", "tcp", dns)]
    http = config.get("http", "None")
    if http not in ("None", ""):
        wanted.append(("HTTP routing mesh", "tcp", http))
    for what, protocol, hostport in wanted:
        address = _address(hostport)
        if address is not None:
            facts.listeners.append(
                listener(owners, facts.agent_pids, what, protocol, address.host, address.port)
            )
    userspace = config.get("lb") == "userspace" or facts.lb_backend == "userspace"
    publish = config.get("publish_address", "None")
    publish = "0.0.0.0" if publish in ("None", "") else publish
    mine = {t["service"] for t in tasks if t.get("node") == facts.node}
    for service in services:
        for port in service.get("ports", []):
            if port.get("publish_mode") == "host" and service["name"] not in mine:
                continue
            number, protocol = int(port["published_port"]), str(port["protocol"])
            facts.listeners.append(
                listener(
                    owners,
                    facts.agent_pids,
                    f"published port of {service['name']}",
                    protocol,
                    publish,
                    number,
                    required=userspace,
                )
            )
            if protocol == "tcp" and _has_healthy(service["name"], tasks):
                gossip = _address(advertise)
                host = gossip.host if gossip is not None else "127.0.0.1"
                facts.published.append((protocol, number, connect(host, number) is None))


def listener(
    owners: SocketOwners,
    agent: set[int],
    what: str,
    protocol: str,
    address: str,
    port: int,
    *,
    required: bool = True,
) -> Listener:
    """Whether the agent holds `address:port` (0.0.0.0: every address) and who is in its way.

    A socket on the wildcard holds every address; for a wildcard listener, a
    socket on any one address is in the way too.
    """
    held = owners.holders(protocol, port)
    relevant = [(pid, a) for pid, a in held if in_the_way(address, a)]
    mine = any(pid in agent and a == address for pid, a in relevant)
    foreign = next((pid for pid, _ in relevant if pid not in agent), None)
    return Listener(
        what,
        protocol,
        address,
        port,
        mine,
        foreign,
        process_name(foreign),
        required_listener=required,
    )


def connect(host: str, port: int) -> str | None:
    """None when a TCP connect succeeds, else why it failed."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


# -- state views ---------------------------------------------------------------------


def _healthy(task: dict[str, Any]) -> bool:
    return task.get("health") == "healthy" and task.get("state") == "running"


def _has_healthy(service: str, tasks: list[dict[str, Any]]) -> bool:
    return any(t["service"] == service and _healthy(t) for t in tasks)


def _lb(facts: Facts, client: Client, settle: float, sleep: Callable[[float], None]) -> None:
    """The programmed and the wanted table; a difference is given time to be applied."""
    deadline = time.monotonic() + min(settle, LB_SETTLE)
    while True:
        try:
            answer = client.get("/v1/lb")
        except ApiError:
            return  # no load balancer on this agent
        facts.lb_backend = str(answer.get("backend"))
        facts.lb_errors = int(answer.get("errors", 0))
        facts.lb_unbound = {str(k): str(v) for k, v in (answer.get("unbound") or {}).items()}
        facts.lb_programmed = table_of(answer)
        facts.lb_desired = table_of({"services": answer.get("desired", [])})
        if not lb_drift(facts.lb_programmed, facts.lb_desired) or time.monotonic() >= deadline:
            return
        sleep(0.5)


def _dns(
    facts: Facts,
    config: dict[str, str],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
) -> None:
    dns = config.get("dns", "None")
    if dns in ("None", ""):
        facts.dns_error = "disabled"
        return
    address = _address(dns)
    if address is None:
        facts.dns_error = f"the agent's DNS address {dns!r} is not HOST:PORT"
        return
    host, port = address.host, address.port
    if host == "0.0.0.0":
        host = "127.0.0.1"
    for service in services:
        if not service.get("networks"):
            continue  # on no network: the service has no name to resolve
        name = str(service["name"])
        healthy = sorted({t["address"] for t in tasks if t["service"] == name and _healthy(t)})
        if service.get("endpoint_mode") == "dnsrr":
            expected = healthy
        else:
            vips = {v["network"]: v["address"] for v in service.get("vips", [])}
            first = next((n for n in service["networks"] if n in vips), None)
            if first is None:
                continue
            expected = [vips[first]]
        for qname, want in ((name, expected), (f"tasks.{name}", healthy)):
            facts.dns[qname] = (want, query_a(host, port, qname))


def query_a(host: str, port: int, name: str) -> list[str] | None:
    # Imported here, not at the top: every `mesh` command imports this module (through
    # `mesh.cli.doctor`), and only `mesh doctor` sends DNS queries (mesh/cli/__init__.py).
    from dnslib import QTYPE, DNSError, DNSRecord

    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_TIMEOUT)
        try:
            sock.sendto(bytes(query.pack()), (host, port))
            reply = DNSRecord.parse(sock.recv(65535))
        except (OSError, DNSError, ValueError):
            return None
    return sorted(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)


def _local_tasks(facts: Facts, services: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
    by_name = {s["name"]: s for s in services}
    for task in tasks:
        if task.get("node") != facts.node or task.get("state") != "running":
            continue
        service = by_name.get(task["service"], {})
        targets = {
            int(p["target_port"]) for p in service.get("ports", []) if p.get("protocol") == "tcp"
        }
        check = service.get("health_check") or {}
        if not targets and check.get("type") in ("tcp", "http") and check.get("port"):
            targets = {int(check["port"])}
        # the API's `ports` keys are target ports as text ("80")
        mapped = {
            net.parse_port(k, "target port"): int(v) for k, v in (task.get("ports") or {}).items()
        }
        if not targets:
            targets = set(mapped)
        for target in sorted(targets):
            actual = mapped.get(target, target)
            facts.local_tasks[(task["name"], task["address"], actual)] = connect(
                task["address"], actual
            )


def _digests(facts: Facts, client: Client, settle: float, sleep: Callable[[float], None]) -> None:
    alive = {
        str(m["name"])
        for m in facts.members
        if m.get("status") == "alive" and m.get("name") != facts.node
    }
    deadline = time.monotonic() + settle
    while True:
        state = (client.get("/v1/gossip") or {}).get("state") or {}
        ours = str(state.get("digest", ""))
        theirs = {str(p["node"]): str(p["digest"]) for p in state.get("peers", [])}
        differing = {p: (d, ours) for p, d in theirs.items() if p in alive and d != ours}
        if not differing or time.monotonic() >= deadline:
            break
        sleep(1.0)
    facts.digest_mismatch = differing
    facts.peers_without_digest = sorted(alive - set(theirs))
