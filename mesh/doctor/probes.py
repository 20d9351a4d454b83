"""What `mesh doctor` looks at, from this node: the agent's API, sockets, DNS, tasks.

Everything is read the way an operator would check by hand (`ss -lnp`, `dig`,
`nc`, `ipvsadm -Ln`), from the node the command runs on: sockets and their
owners from /proc (so a port held by another process is named), DNS by real
queries to the embedded server, tasks by a TCP connect, and the L4 table, the
members and the state digests from the agent's API.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mesh.cli.client import Client
from mesh.cli.errors import ApiError
from mesh.cli.lb import table_of
from mesh.core import net, netns
from mesh.core.model import INGRESS
from mesh.core.net import HostPort
from mesh.core.sockets import SocketOwners, family_of, in_the_way, process_name
from mesh.doctor.checks import (
    SANDBOX_DNS,
    Facts,
    InterfaceSeen,
    Listener,
    SandboxEndpoint,
    SandboxFacts,
    lb_drift,
)
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
    _sandboxes(facts, client, services, tasks)
    facts.route_problems = [
        (str(s.get("name")), str(p.get("kind")), str(p.get("label")), str(p.get("reason")))
        for s in services
        for p in s.get("problems") or []
        if isinstance(p, dict)
    ]
    facts.lb_problems = [
        (service, label, reason)
        for service, kind, label, reason in facts.route_problems
        if kind == "lb"
    ]
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


# -- sandboxes -----------------------------------------------------------------------

T = TypeVar("T")
NETNS_ETC = Path("/etc/netns")
IP_TIMEOUT = 5.0


def _sandboxes(
    facts: Facts, client: Client, services: list[dict[str, Any]], tasks: list[dict[str, Any]]
) -> None:
    """Each local sandbox looked into: its interfaces, route, resolver, DNS and VIPs."""
    local = [t for t in tasks if t.get("node") == facts.node and isinstance(t.get("sandbox"), dict)]
    if not local and not any("sandbox" in t for t in tasks):
        return  # an agent without sandboxes: nothing to report
    networks = {str(n["name"]): n for n in client.get("/v1/networks") or [] if isinstance(n, dict)}
    # On an overlay, a sandbox's way out is this node's own address there, not the gateway.
    overlays = ((client.get("/v1/agent") or {}).get("sandboxes") or {}).get("overlays") or {}
    own = {str(k): str(v["host_address"]) for k, v in overlays.items() if v.get("host_address")}
    facts.sandboxes = [_sandbox(task, services, tasks, networks, own) for task in local]


def _sandbox(
    task: dict[str, Any],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    networks: dict[str, dict[str, Any]],
    own: dict[str, str] | None = None,
) -> SandboxFacts:
    sandbox: dict[str, Any] = task["sandbox"]
    endpoints = tuple(
        SandboxEndpoint(str(e["network"]), str(e["interface"]), str(e["address"]))
        for e in sandbox.get("endpoints") or []
    )
    # ingress: the routing mesh's way in, no way out and no service names on it
    ours = [ep.network for ep in endpoints if ep.network != INGRESS]
    want_gateway = next(
        (
            gateway_of(networks[n], own)
            for n in ours
            if n in networks and not networks[n].get("internal")
        ),
        None,
    )
    path = str(sandbox.get("netns") or "")
    found = SandboxFacts(str(task.get("name")), path, endpoints, want_gateway)
    if not Path(path).exists():
        found.exists = False
        return found
    found.nameservers = _nameservers(path)
    try:
        found.interfaces, found.default_gateway = _links_and_route(path)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        found.probe_error = str(exc)
        return found
    targets = _sandbox_targets(ours, services, tasks, networks, found.vips_skipped)
    try:
        _in_netns(path, lambda: _probe_inside(found, targets))
    except OSError as exc:
        found.probe_error = f"cannot enter {path}: {exc.strerror or exc}"
    return found


def gateway_of(network: dict[str, Any], own: dict[str, str] | None = None) -> str:
    """A network's gateway: as recorded, else the subnet's first host (as IPAM reserves it);
    on an overlay, this node's own address there (`own`: network -> address)."""
    if network.get("driver") == "overlay" and (own or {}).get(str(network.get("name"))):
        return (own or {})[str(network["name"])]
    if network.get("gateway"):
        return str(network["gateway"])
    subnet = ipaddress.ip_network(str(network["subnet"]), strict=False)
    return str(next(subnet.hosts()))


def _sandbox_targets(
    ours: list[str],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    networks: dict[str, dict[str, Any]],
    skipped: dict[tuple[str, str], str],
) -> list[tuple[str, str, list[int]]]:
    """(service, VIP on the first network it shares with the sandbox, tcp target ports)
    for each VIP service with a healthy task on the sandbox's networks."""
    targets = []
    for service in services:
        name = str(service.get("name"))
        if service.get("endpoint_mode") == "dnsrr" or not _has_healthy(name, tasks):
            continue
        vips = {str(v["network"]): str(v["address"]) for v in service.get("vips", [])}
        shared = next((n for n in ours if n in vips), None)
        if shared is None:
            continue
        options = networks.get(shared, {}).get("options") or {}
        if str(options.get("icc", "true")).lower() == "false":
            # Its tasks' bridge ports are isolated from this sandbox's (docs/networking.md).
            skipped[(name, vips[shared])] = f"{shared} has icc=false"
            continue
        ports = sorted(
            {int(p["target_port"]) for p in service.get("ports", []) if p.get("protocol") == "tcp"}
        )
        check = service.get("health_check") or {}
        if not ports and check.get("type") in ("tcp", "http") and check.get("port"):
            ports = [int(check["port"])]
        targets.append((name, vips[shared], ports))
    return targets


def _probe_inside(found: SandboxFacts, targets: list[tuple[str, str, list[int]]]) -> None:
    for name, vip, ports in targets:
        found.dns[name] = ([vip], query_a(SANDBOX_DNS, 53, name))
        for port in ports:
            found.vips[(name, vip, port)] = connect(vip, port)


def _in_netns(path: str, work: Callable[[], T]) -> T:
    """`work()` on a thread that entered the namespace at `path` (this thread never moves)."""

    def inside() -> T:
        with netns.entered(path):
            return work()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="doctor-netns") as pool:
        return pool.submit(inside).result()


def _nameservers(path: str) -> list[str] | None:
    if not path.startswith("/run/netns/"):
        return None
    try:
        text = (NETNS_ETC / Path(path).name / "resolv.conf").read_text()
    except OSError:
        return None
    return [
        line.split()[1]
        for line in text.splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]


def _links_and_route(path: str) -> tuple[dict[str, InterfaceSeen], str | None]:
    """`ip -j address` and the default route inside (entered with nsenter)."""
    links = _ip_json(path, ["-4", "address", "show"])
    interfaces = {
        str(link["ifname"]): InterfaceSeen(
            # lo reports UNKNOWN when up; LOWER_UP/UP in flags is what counts
            up="UP" in (link.get("flags") or []),
            addresses=tuple(
                str(a["local"]) for a in link.get("addr_info") or [] if a.get("family") == "inet"
            ),
        )
        for link in links
    }
    # interfaces with no IPv4 address are left out by -4: ask for all links too
    for link in _ip_json(path, ["link", "show"]):
        interfaces.setdefault(
            str(link["ifname"]), InterfaceSeen(up="UP" in (link.get("flags") or []), addresses=())
        )
    routes = _ip_json(path, ["-4", "route", "show", "default"])
    gateway = next((str(r["gateway"]) for r in routes if r.get("gateway")), None)
    return interfaces, gateway


def _ip_json(path: str, args: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["nsenter", f"--net={path}", "--", "ip", "-j", *args],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise ValueError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    value = json.loads(done.stdout or "[]")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
