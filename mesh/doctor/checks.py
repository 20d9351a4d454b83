"""What `mesh doctor` concludes from what it found: pure functions, no I/O.

Each check takes the facts the probes gathered (`Facts`) and returns findings:
what is right (`ok`), what is wrong (`fail`, with a hint for the fix), or what
could not be checked (`skip`, with why). The checks follow the troubleshooting
Docker's documentation teaches for Swarm (ports listening, `dig` of each
service, `ipvsadm -Ln` against the tasks, `nc` to each task, the gossip peers),
done from one node, all at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lb.table import (
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Scheduler,
    ServiceOptions,
    Table,
    diff,
)
from mesh.ipam import capacity_of
from mesh.state.store import AUTO_PORTS

Status = Literal["ok", "fail", "skip"]
#: A network or the auto-published port range this full is reported before it fills up.
NEARLY_FULL = 0.9


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # api, listen, dns, lb, tasks, gossip, network, routes
    status: Status
    message: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass(frozen=True, slots=True)
class Listener:
    """One socket the agent should have open, and what the probe found there."""

    what: str  # "gossip (udp)", "published port 8080/tcp", ...
    protocol: str
    address: str
    port: int
    agent_listens: bool  # a socket of the agent's is bound there
    foreign_pid: int | None = None  # another process holding the port, in the agent's way
    foreign_name: str = ""
    required_listener: bool = True  # False: a kernel backend serves it without a socket


@dataclass(frozen=True, slots=True)
class SandboxEndpoint:
    """One endpoint of a sandbox as the state has it."""

    network: str
    interface: str  # eth0, eth1, ...
    address: str


@dataclass(frozen=True, slots=True)
class InterfaceSeen:
    """One interface inside a sandbox as the kernel has it."""

    up: bool
    addresses: tuple[str, ...]  # IPv4, without prefix length


@dataclass(slots=True)
class SandboxFacts:
    """One sandbox of a local task: what the state says, what was found inside."""

    task: str
    netns: str
    endpoints: tuple[SandboxEndpoint, ...]
    #: the gateway the default route should go via; None: every network is internal
    want_gateway: str | None
    exists: bool = True
    probe_error: str | None = None  # why it could not be looked into (it exists)
    interfaces: dict[str, InterfaceSeen] = field(default_factory=dict)
    default_gateway: str | None = None  # the default route's gateway found inside
    #: nameservers of /etc/netns/<name>/resolv.conf; None: no such file (or not a named netns)
    nameservers: list[str] | None = None
    #: name -> (expected addresses, answered addresses or None) asked at 127.0.0.11 inside
    dns: dict[str, tuple[list[str], list[str] | None]] = field(default_factory=dict)
    #: (service, vip, port) -> None when a TCP connect from inside succeeded, else why not
    vips: dict[tuple[str, str, int], str | None] = field(default_factory=dict)
    #: (service, vip) -> why its VIP is not expected to answer from here (icc=false)
    vips_skipped: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(slots=True)
class Facts:
    node: str
    agent_pid: int
    agent_pids: set[int]  # the agent and its worker processes
    listeners: list[Listener] = field(default_factory=list)
    #: service name -> (expected addresses, answered addresses or None when no answer)
    dns: dict[str, tuple[list[str], list[str] | None]] = field(default_factory=dict)
    dns_error: str | None = None
    lb_backend: str | None = None
    lb_programmed: Table | None = None
    lb_desired: Table | None = None
    lb_errors: int = 0
    lb_unbound: dict[str, str] = field(default_factory=dict)  # virtual service -> why
    #: L4 options this node's backend refuses: (service, label, reason)
    lb_problems: list[tuple[str, str, str]] = field(default_factory=list)
    #: (task name, address, port) -> None when it answered a TCP connect, else the error
    local_tasks: dict[tuple[str, str, int], str | None] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)
    #: peer -> (its digest, ours) for peers whose digest still differed after waiting
    digest_mismatch: dict[str, tuple[str, str]] = field(default_factory=dict)
    peers_without_digest: list[str] = field(default_factory=list)
    published: list[tuple[str, int, bool]] = field(default_factory=list)  # proto, port, answered
    #: (network name, subnet, VIP addresses in use on it)
    networks: list[tuple[str, str, int]] = field(default_factory=list)
    #: protocol -> published ports in use inside the range omitted ones are picked from
    auto_ports: dict[str, int] = field(default_factory=dict)
    #: the sandboxes of this node's tasks (None: this agent reports no sandboxes at all)
    sandboxes: list[SandboxFacts] | None = None
    #: HRM route problems, as the API lists them: (service, kind, label, reason)
    route_problems: list[tuple[str, str, str, str]] = field(default_factory=list)


def check_all(facts: Facts) -> list[Finding]:
    return [
        *check_listeners(facts),
        *check_published(facts),
        *check_dns(facts),
        *check_lb(facts),
        *check_tasks(facts),
        *check_gossip(facts),
        *check_capacity(facts),
        *check_sandboxes(facts),
        *check_routes(facts),
    ]


def check_listeners(facts: Facts) -> Iterable[Finding]:
    for sock in facts.listeners:
        where = f"{sock.what} on {sock.address}:{sock.port}/{sock.protocol}"
        if sock.foreign_pid is not None:
            owner = (
                f"{sock.foreign_name} (pid {sock.foreign_pid})"
                if sock.foreign_name
                else f"pid {sock.foreign_pid}"
            )
            yield Finding(
                "listen",
                "fail",
                f"{where} is held by {owner}, not the agent (pid {facts.agent_pid})",
                f"stop {owner} or move it to another port; then restart the agent "
                "or re-publish the port",
            )
        elif sock.agent_listens:
            yield Finding("listen", "ok", f"{where}: the agent listens")
        elif sock.required_listener:
            yield Finding(
                "listen",
                "fail",
                f"nothing listens for {where}",
                "look for agent_start_failed or lb_backend_error in the agent's log",
            )


def check_published(facts: Facts) -> Iterable[Finding]:
    for protocol, port, answered in facts.published:
        if answered:
            yield Finding("listen", "ok", f"published port {port}/{protocol} answers")
        else:
            yield Finding(
                "listen",
                "fail",
                f"published port {port}/{protocol} does not answer on this node",
                "check `mesh lb` for the port and that its tasks are healthy (`mesh task ls`)",
            )


def check_dns(facts: Facts) -> Iterable[Finding]:
    if facts.dns_error is not None:
        yield Finding(
            "dns",
            "skip" if facts.dns_error == "disabled" else "fail",
            f"embedded DNS: {facts.dns_error}",
            ""
            if facts.dns_error == "disabled"
            else "is the agent's --dns address reachable from here?",
        )
        return
    for name, (expected, answered) in sorted(facts.dns.items()):
        if answered is None:
            yield Finding(
                "dns",
                "fail",
                f"the embedded DNS gave no answer for {name}",
                "query it by hand: dig @<dns address> " + name,
            )
        elif sorted(answered) != sorted(expected):
            yield Finding(
                "dns",
                "fail",
                f"{name} resolves to {', '.join(answered) or 'nothing'}"
                f", the state says {', '.join(expected) or 'nothing'}",
                "the DNS view lags the state: look for errors in the agent's log",
            )
        else:
            yield Finding("dns", "ok", f"{name} resolves to {', '.join(answered) or 'nothing'}")


def check_lb(facts: Facts) -> Iterable[Finding]:
    if facts.lb_programmed is None or facts.lb_desired is None:
        yield Finding("lb", "skip", "no L4 table to compare (the agent runs no load balancer)")
        return
    drift = lb_drift(facts.lb_programmed, facts.lb_desired)
    if not drift:
        reals = sum(len(s.reals) for s in facts.lb_programmed.values())
        yield Finding(
            "lb",
            "ok",
            f"{facts.lb_backend} table matches the state: "
            f"{len(facts.lb_programmed)} virtual services, {reals} real servers",
        )
    for line in drift:
        yield Finding(
            "lb",
            "fail",
            line,
            "an entry the agent did not make, or one it failed to change: restart "
            "the agent (it reconciles its table at start) or remove it by hand",
        )
    for key, why in sorted(facts.lb_unbound.items()):
        yield Finding(
            "lb",
            "fail",
            f"virtual service {key} is not programmed: {why}",
            "free what is in its way; the backend retries at the service's next "
            "change (or restart the agent)",
        )
    if facts.lb_errors:
        yield Finding(
            "lb",
            "fail",
            f"the {facts.lb_backend} backend refused {facts.lb_errors} "
            "changes since the agent started",
            "see lb_backend_error in the agent's log",
        )
    yield from check_lb_policies(facts)


def check_lb_policies(facts: Facts) -> Iterable[Finding]:
    """Each published port with `traffic-policy=local` (docs/load-balancing.md), and the
    L4 options this node's backend refuses (the PROXY label on a kernel backend)."""
    for key, service in sorted((facts.lb_programmed or {}).items()):
        if not service.options.local:
            continue
        taking = sum(1 for weight in service.reals.values() if weight > 0)
        if taking:
            yield Finding(
                "lb",
                "ok",
                f"published port {key.protocol}/{key.port} (traffic-policy=local): "
                f"{taking} task(s) of this node take its connections",
            )
        else:
            yield Finding(
                "lb",
                "fail",
                f"published port {key.protocol}/{key.port} (traffic-policy=local): no "
                "healthy task on this node, so it refuses the port's connections (its "
                "GET /v1/lb/healthz/<service> answers 503)",
                "an external load balancer should skip this node (point its health check "
                "at --lb-healthz); or run a task of the service here (`mesh task ls`)",
            )
    for key, service in sorted((facts.lb_programmed or {}).items()):
        policies = policy_words(service.options)
        if policies:
            yield Finding("lb", "ok", f"virtual service {key}: {', '.join(policies)}")
    for service_name, label, reason in sorted(facts.lb_problems):
        yield Finding(
            "lb",
            "fail",
            f"service {service_name}: label {label} refused: {reason}",
            "remove the label, or serve the service from nodes whose backend does it "
            "(docs/load-balancing.md, the policy x backend table)",
        )


def policy_words(options: ServiceOptions) -> list[str]:
    """The policies of a programmed virtual service beside the defaults, in words."""
    words = []
    if options.scheduler is not Scheduler.ROUND_ROBIN:
        names = {Scheduler.MAGLEV: "maglev (consistent hashing)"}
        words.append(names.get(options.scheduler, str(options.scheduler.value)))
    if options.affinity:
        words.append(f"affinity client-ip:{options.affinity}")
    if options.proxy_protocol:
        words.append("PROXY protocol v2")
    return words


def lb_drift(programmed: Table, desired: Table) -> list[str]:
    """Plain words for every difference between the programmed and the wanted table."""
    lines = []
    for op in diff(programmed, desired):
        if isinstance(op, DeleteService):
            lines.append(
                f"stale virtual service {op.key}: programmed, but nothing in the state wants it"
            )
        elif isinstance(op, DeleteReal):
            lines.append(
                f"stale real server {op.real} under {op.key}: programmed, but it is "
                "no healthy task of the service"
            )
        elif isinstance(op, PutService):
            what = "missing" if op.key not in programmed else "mis-configured"
            lines.append(f"{what} virtual service {op.key}")
        elif isinstance(op, PutReal):
            have = programmed.get(op.key)
            weight = None if have is None else have.reals.get(op.real)
            if weight is None:
                lines.append(f"missing real server {op.real} under {op.key}")
            else:
                lines.append(
                    f"real server {op.real} under {op.key} has weight {weight}, "
                    f"the state says {op.weight}"
                )
    return lines


def check_tasks(facts: Facts) -> Iterable[Finding]:
    if not facts.local_tasks:
        yield Finding("tasks", "skip", f"no running task on {facts.node} to connect to")
    for (name, address, port), error in sorted(facts.local_tasks.items()):
        if error is None:
            yield Finding("tasks", "ok", f"task {name} answers on {address}:{port}")
        else:
            yield Finding(
                "tasks",
                "fail",
                f"task {name} does not answer on {address}:{port}: {error}",
                "is its process running and listening there? "
                f"`mesh task rm {name}` if it is gone for good",
            )


#: what to do about each kind of HRM route problem
_ROUTE_HINTS = {
    "label": 'fix the label (docs/design.md "HRM labels"): until then the service gets no '
    "route, and a request for its host a 404 saying why",
    "conflict": "give one of the services another host or path; the older one serves it",
    "target_port": "map the port on the tasks (`ports`) or point the label at one they serve",
    "certificate": "add `--tls-cert HOST=CERT,KEY` for the host on this node",
}


def check_routes(facts: Facts) -> Iterable[Finding]:
    if not [p for p in facts.route_problems if p[1] != "lb"]:
        yield Finding("routes", "ok", "every HRM routing label is in use")
    for service, kind, label, reason in sorted(facts.route_problems):
        if kind == "lb":  # an L4 option: `check_lb_policies` shows it
            continue
        yield Finding(
            "routes",
            "fail",
            f"service {service}: {kind} problem in label {label}: {reason}",
            _ROUTE_HINTS.get(kind, ""),
        )


def check_gossip(facts: Facts) -> Iterable[Finding]:
    for member in sorted(facts.members, key=lambda m: str(m.get("name"))):
        name, status = str(member.get("name")), str(member.get("status"))
        where = f"{member.get('address')}:{member.get('port')}"
        if name == facts.node or status == "left":
            continue
        if status == "alive":
            yield Finding("gossip", "ok", f"peer {name} ({where}) is alive")
        else:
            yield Finding(
                "gossip",
                "fail",
                f"peer {name} ({where}) is {status}",
                f"is the agent on {name} running? Gossip needs UDP and TCP {where} open both ways",
            )
    for peer, (theirs, ours) in sorted(facts.digest_mismatch.items()):
        yield Finding(
            "gossip",
            "fail",
            f"peer {peer}'s tables differ from this node's (digest {theirs[:8]} vs {ours[:8]})",
            "they converge within one push-pull interval; if this persists, compare "
            "`mesh task ls` on both nodes and check the gossip drop counters "
            "(`mesh inspect gossip`)",
        )
    for peer in facts.peers_without_digest:
        yield Finding("gossip", "skip", f"peer {peer} has not announced its state digest yet")


def check_capacity(facts: Facts) -> Iterable[Finding]:
    """Networks (and the auto-published port range) that are full or nearly: the next
    service to need an address (a port) there gets a 409."""
    for name, subnet, used in sorted(facts.networks):
        capacity = capacity_of(ipaddress.IPv4Network(subnet))
        where = f"network {name} ({subnet})"
        if used >= capacity:
            yield Finding(
                "network",
                "fail",
                f"{where} is full: all {capacity} addresses are VIPs of services",
                _network_hint(name),
            )
        elif used >= NEARLY_FULL * capacity:
            yield Finding(
                "network",
                "fail",
                f"{where} is nearly full: {used} of {capacity} "
                f"addresses are VIPs ({used / capacity:.0%})",
                _network_hint(name),
            )
        else:
            yield Finding("network", "ok", f"{where}: {used} of {capacity} addresses in use")
    size = len(AUTO_PORTS)
    span = f"{AUTO_PORTS.start}-{AUTO_PORTS.stop - 1}"
    for protocol, used in sorted(facts.auto_ports.items()):
        if used >= NEARLY_FULL * size:
            yield Finding(
                "network",
                "fail",
                f"{used} of the {size} {protocol} ports of {span} "
                "(where a published port left out is picked) are published",
                "give services their published_port outside that range, or remove "
                "services that no longer serve",
            )


SANDBOX_DNS = "127.0.0.11"


def check_sandboxes(facts: Facts) -> Iterable[Finding]:
    """Each local sandbox: interfaces up with the state's addresses, the default route,
    resolv.conf, the DNS answering inside, each VIP of its networks connectable."""
    if facts.sandboxes is None:
        return
    if not facts.sandboxes:
        yield Finding("sandbox", "skip", f"no sandboxed task on {facts.node}")
    for sandbox in facts.sandboxes:
        yield from _check_sandbox(sandbox)


def _check_sandbox(sb: SandboxFacts) -> Iterable[Finding]:
    who = f"sandbox of {sb.task}"
    if not sb.exists:
        yield Finding(
            "sandbox",
            "fail",
            f"{who}: its namespace {sb.netns} does not exist",
            f"restart the agent (it re-creates what the state has), or `mesh task rm {sb.task}`",
        )
        return
    if sb.probe_error is not None:
        yield Finding("sandbox", "fail", f"{who}: cannot look inside: {sb.probe_error}")
        return
    yield from _sandbox_interfaces(who, sb)
    yield from _sandbox_route(who, sb)
    yield from _sandbox_resolver(who, sb)
    yield from _sandbox_dns(who, sb)
    for (service, vip), why in sorted(sb.vips_skipped.items()):
        yield Finding("sandbox", "skip", f"{who}: VIP of {service} {vip} not tried: {why}")
    for (service, vip, port), error in sorted(sb.vips.items()):
        if error is None:
            yield Finding("sandbox", "ok", f"{who}: VIP of {service} {vip}:{port} answers")
        else:
            yield Finding(
                "sandbox",
                "fail",
                f"{who}: VIP of {service} {vip}:{port} does not answer: {error}",
                "check `nft list table ip meshplane_sbx` inside it "
                f"(mesh task exec {sb.task} -- nft list ruleset) and the service's tasks",
            )


def _sandbox_interfaces(who: str, sb: SandboxFacts) -> Iterable[Finding]:
    hint = "restart the agent: it re-creates the endpoints the state has"
    bad = False
    for ep in sb.endpoints:
        seen = sb.interfaces.get(ep.interface)
        if seen is None:
            bad = True
            yield Finding(
                "sandbox", "fail", f"{who}: {ep.interface} (network {ep.network}) is missing", hint
            )
        elif not seen.up:
            bad = True
            yield Finding("sandbox", "fail", f"{who}: {ep.interface} is down", hint)
        elif ep.address not in seen.addresses:
            bad = True
            found = ", ".join(seen.addresses) or "none"
            yield Finding(
                "sandbox",
                "fail",
                f"{who}: {ep.interface} has {found}, the state says {ep.address}",
                hint,
            )
    lo = sb.interfaces.get("lo")
    if lo is not None and not lo.up:
        bad = True
        yield Finding("sandbox", "fail", f"{who}: lo is down (127.0.0.11 needs it)", hint)
    if not bad:
        names = ", ".join(f"{ep.interface} {ep.address}" for ep in sb.endpoints)
        yield Finding("sandbox", "ok", f"{who}: interfaces up as in the state ({names})")


def _sandbox_route(who: str, sb: SandboxFacts) -> Iterable[Finding]:
    if sb.want_gateway is None:
        if sb.default_gateway is None:
            yield Finding("sandbox", "ok", f"{who}: no default route (internal networks only)")
        else:
            yield Finding(
                "sandbox",
                "fail",
                f"{who}: a default route via {sb.default_gateway} on internal networks only",
                "an internal network has no way out: remove the route",
            )
    elif sb.default_gateway == sb.want_gateway:
        yield Finding("sandbox", "ok", f"{who}: default route via {sb.want_gateway}")
    else:
        found = f"via {sb.default_gateway}" if sb.default_gateway else "none"
        yield Finding(
            "sandbox",
            "fail",
            f"{who}: default route {found}, want via {sb.want_gateway}",
            "restart the agent: it re-creates the endpoints and their route",
        )


def _sandbox_resolver(who: str, sb: SandboxFacts) -> Iterable[Finding]:
    if sb.nameservers is None:
        yield Finding(
            "sandbox",
            "skip" if _adopted_path(sb.netns) else "fail",
            f"{who}: no /etc/netns resolv.conf for {sb.netns}",
            "" if _adopted_path(sb.netns) else "restart the agent: it writes the file",
        )
    elif sb.nameservers[:1] == [SANDBOX_DNS]:
        yield Finding("sandbox", "ok", f"{who}: resolv.conf points at {SANDBOX_DNS}")
    else:
        yield Finding(
            "sandbox",
            "fail",
            f"{who}: resolv.conf names {', '.join(sb.nameservers) or 'no server'}, "
            f"not {SANDBOX_DNS}",
            "something rewrote it: restart the agent, which writes it again",
        )


def _adopted_path(netns: str) -> bool:
    return not netns.startswith("/run/netns/")


def _sandbox_dns(who: str, sb: SandboxFacts) -> Iterable[Finding]:
    for name, (want, got) in sorted(sb.dns.items()):
        if got is None:
            yield Finding(
                "sandbox",
                "fail",
                f"{who}: the DNS at {SANDBOX_DNS} does not answer for {name}",
                "the agent serves 127.0.0.11 inside each sandbox: is it running? "
                "see the DNS stats of GET /v1/dns",
            )
        elif sorted(got) == sorted(want):
            yield Finding(
                "sandbox", "ok", f"{who}: {name} resolves to {', '.join(want) or 'nothing'}"
            )
        else:
            yield Finding(
                "sandbox",
                "fail",
                f"{who}: {name} resolves to {', '.join(got) or 'nothing'}, "
                f"want {', '.join(want) or 'nothing'}",
                "the sandbox's DNS view differs from the state: restart the agent",
            )


def _network_hint(name: str) -> str:
    if name == "ingress":
        return (
            "every service publishing a port in ingress mode holds a VIP on it: remove "
            "services that no longer serve, publish in host mode, or create the cluster "
            "with a larger --ingress-subnet (an existing ingress is never renumbered)"
        )
    return (
        f"remove services from {name} that no longer need it, or move services to a new "
        "network with a larger --subnet"
    )


def summary(findings: Sequence[Finding]) -> tuple[int, int, int]:
    return (
        sum(f.status == "ok" for f in findings),
        sum(f.status == "fail" for f in findings),
        sum(f.status == "skip" for f in findings),
    )
