"""The API's request and response models (pydantic).

These models are the single definition of the wire shapes: handlers validate
bodies with them, answers are serialised through them, and
`/v1/openapi.json` is generated from them, so the description cannot drift
from what the agent does. Requests forbid unknown fields; integers are strict
(`"80"` and `true` are not ports).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)

from mesh.core import net
from mesh.core.model import MAX_TASK_WEIGHT
from mesh.names import DOTTED_PATTERN, LABEL_PATTERN, check_dotted, check_label

Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Seconds = Annotated[StrictFloat | StrictInt, Field(ge=0, le=86_400)]
PositiveSeconds = Annotated[StrictFloat | StrictInt, Field(gt=0, le=86_400)]
LabelKey = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f=]+$")]
LabelValue = Annotated[str, Field(max_length=4096, pattern=r"^[^\x00-\x1f]*$")]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]


def _service_name(value: str) -> str:
    return check_label(value, "service name")


def _network_name(value: str) -> str:
    return check_label(value, "network name")


def _task_name(value: str) -> str:
    return check_dotted(value, "task name")


def _name(max_length: int, pattern: str) -> Any:
    return Field(min_length=1, max_length=max_length, json_schema_extra={"pattern": pattern})


ServiceName = Annotated[str, _name(63, LABEL_PATTERN), AfterValidator(_service_name)]
NetworkName = Annotated[str, _name(63, LABEL_PATTERN), AfterValidator(_network_name)]
TaskName = Annotated[str, _name(253, DOTTED_PATTERN), AfterValidator(_task_name)]


def _alias(value: str) -> str:
    return check_label(value, "alias")


Alias = Annotated[str, _name(63, LABEL_PATTERN), AfterValidator(_alias)]
#: network -> the service's extra DNS names on that network only
Aliases = Annotated[
    dict[NetworkName, Annotated[list[Alias], Field(max_length=16)]], Field(max_length=32)
]
Address = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra={"format": "ipv4"})]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


# -- requests ---------------------------------------------------------------


class NetworkCreate(_Request):
    name: NetworkName
    subnet: Annotated[str, Field(max_length=43)] | None = None
    #: bridge: one node's, made in its kernel; overlay: the cluster's (VIPs only, for now);
    #: macvlan: sandboxes on a physical LAN, every node's; needs options.parent
    driver: Literal["overlay", "bridge", "macvlan"] = "overlay"
    labels: Labels = Field(default_factory=dict)
    gateway: Address | None = None  # default: the subnet's first host address
    ip_range: Annotated[str, Field(max_length=43)] | None = None  # sandbox addresses' range
    aux_addresses: Annotated[dict[LabelKey, Address], Field(max_length=64)] = Field(
        default_factory=dict
    )
    internal: StrictBool = False
    attachable: StrictBool | None = None  # default: bridge networks are attachable
    options: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = Field(
        default_factory=dict
    )


class PortIn(_Request):
    target_port: Port
    published_port: Port | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    publish_mode: Literal["ingress", "host"] = "ingress"
    #: `local`: only this node's healthy tasks, without SNAT (they see the client's
    #: address); a node without one refuses the connection (docs/load-balancing.md)
    traffic_policy: Literal["cluster", "local"] = "cluster"


class HealthCheckIn(_Request):
    type: Literal["http", "tcp", "ttl"]
    port: Port | None = None
    path: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^/[\x21-\x7e]*$")] = "/"
    status_min: Annotated[StrictInt, Field(ge=100, le=599)] = 200
    status_max: Annotated[StrictInt, Field(ge=100, le=599)] = 399
    interval: PositiveSeconds = 5.0
    timeout: PositiveSeconds = 2.0
    retries: Annotated[StrictInt, Field(ge=1, le=100)] = 3
    start_period: Seconds = 0.0
    ttl: PositiveSeconds = 30.0

    @model_validator(mode="after")
    def _status_range(self) -> HealthCheckIn:
        if self.status_min > self.status_max:
            raise ValueError("status_min is above status_max")
        return self


#: A task's weight (docs/lb.md): 0 drains it, 1000 at most.
TaskWeight = Annotated[StrictInt, Field(ge=0, le=MAX_TASK_WEIGHT)]


class ServiceCreate(_Request):
    name: ServiceName
    networks: Annotated[list[NetworkName], Field(max_length=32)] = Field(default_factory=list)
    endpoint_mode: Literal["vip", "dnsrr"] = "vip"
    ports: Annotated[list[PortIn], Field(max_length=64)] = Field(default_factory=list)
    labels: Labels = Field(default_factory=dict)
    health_check: HealthCheckIn | None = None
    aliases: Aliases = Field(default_factory=dict)


class ServicePatchIn(_Request):
    networks: Annotated[list[NetworkName], Field(max_length=32)] | None = None
    endpoint_mode: Literal["vip", "dnsrr"] | None = None
    ports: Annotated[list[PortIn], Field(max_length=64)] | None = None
    labels: Labels | None = None
    health_check: HealthCheckIn | None = None
    aliases: Aliases | None = None
    #: task id or name -> weight (0..1000), merged into the service's overrides;
    #: null removes a task's override (it takes its own weight again)
    weights: (
        Annotated[
            dict[Annotated[str, Field(min_length=1, max_length=256)], TaskWeight | None],
            Field(max_length=1024),
        ]
        | None
    ) = None


class SandboxIn(_Request):
    #: null: a new namespace of the agent's own; a netns name or an absolute path: adopt it
    netns: Annotated[str, Field(min_length=1, max_length=4096)] | None = None


class TaskCreate(_Request):
    #: a host process's address; left out with `sandbox` (its first endpoint's address)
    address: Address | None = None
    ports: Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,5}$")], Port], Field(max_length=64)
    ] = Field(default_factory=dict)
    name: TaskName | None = None
    sandbox: SandboxIn | None = None
    #: share of new connections under weighted schedulers; 0 drains the task
    weight: TaskWeight = 1

    @model_validator(mode="after")
    def _target_ports(self) -> TaskCreate:
        for key in self.ports:
            if net.port_or_none(key) is None:
                raise ValueError(f"target port {key} is not between 1 and 65535")
        if self.address is not None and self.sandbox is not None:
            raise ValueError("give either address (a host process) or sandbox, not both")
        return self


class HealthReport(_Request):
    status: Literal["healthy", "unhealthy"]
    output: Annotated[str, Field(max_length=4096)] = ""


class KeyIn(_Request):
    #: base64 of a 16, 24 or 32-byte key (checked by the handler: 422 invalid_key)
    key: Annotated[str, Field(min_length=1, max_length=128)]


# -- responses --------------------------------------------------------------


class NetworkOut(_Response):
    name: str
    id: str
    driver: str
    subnet: str
    gateway: str
    labels: dict[str, str]
    created_at: float
    version: int
    scope: Literal["swarm", "local"]
    node: str  # a local (bridge) network's node; "" for a swarm network
    internal: bool
    attachable: bool
    ip_range: str | None
    aux_addresses: dict[str, str]
    options: dict[str, str]
    vni: int = 0  # overlay: the network's VXLAN id


class PortOut(_Response):
    protocol: Literal["tcp", "udp"]
    target_port: int
    published_port: int
    publish_mode: Literal["ingress", "host"]
    traffic_policy: Literal["cluster", "local"] = "cluster"


class VipOut(_Response):
    network: str
    address: str


class HealthCheckOut(_Response):
    type: Literal["http", "tcp", "ttl"]
    port: int | None
    path: str
    status_min: int
    status_max: int
    interval: float
    timeout: float
    retries: int
    start_period: float
    ttl: float


class RouteProblemOut(_Response):
    """Why an HRM route of the service is not used, or not used well (docs/hrm.md)."""

    kind: Literal["label", "conflict", "target_port", "certificate", "lb"]
    label: str
    reason: str


class LbPolicyOut(_Response):
    """A service's L4 policies as its labels ask for them (docs/load-balancing.md);
    the traffic policy is per published port (`ports[].traffic_policy`)."""

    algorithm: Literal["rr", "wrr", "lc", "maglev"]
    affinity: str  # `none` or `client-ip:SECONDS`
    locality: Literal["any", "prefer-local"]
    proxy_protocol: bool  # PROXY protocol v2 towards the tasks (userspace backend only)


class ServiceOut(_Response):
    name: str
    id: str
    networks: list[str]
    endpoint_mode: Literal["vip", "dnsrr"]
    ports: list[PortOut]
    labels: dict[str, str]
    vips: list[VipOut]
    health_check: HealthCheckOut | None
    created_at: float
    updated_at: float
    version: int
    aliases: dict[str, list[str]]
    #: task id -> weight set through the service (overrides the task's own)
    weights: dict[str, int] = Field(default_factory=dict)
    #: the L4 policies its labels ask for (what a backend refuses shows in `problems`)
    lb: LbPolicyOut | None = None
    #: its HRM route problems as this node sees them; left out of the event stream
    problems: list[RouteProblemOut] = Field(default_factory=list)


class EndpointOut(_Response):
    network: str
    address: str
    mac: str
    interface: str  # inside the sandbox: eth0, eth1, ...


class SandboxOut(_Response):
    netns: str  # the namespace's path: what `nsenter --net=` takes
    adopted: bool
    endpoints: list[EndpointOut]


#: A node's liveness as this node's gossip sees it; `unknown`: gossip has not
#: heard of the node (yet), e.g. just after this agent restarted.
NodeStatus = Literal["alive", "suspect", "dead", "left", "unknown"]
NODE_STATUSES: tuple[str, ...] = ("alive", "suspect", "dead", "left", "unknown")


class TaskOut(_Response):
    id: str
    name: str
    service: str
    slot: int
    node: str
    #: the task's node as this node sees it: its tasks are out of DNS and the load
    #: balancers while it is dead or left, and back when it is alive again
    node_status: NodeStatus
    address: str
    ports: dict[str, int]
    state: Literal["running", "draining"]
    health: Literal["starting", "healthy", "unhealthy"]
    health_output: str
    created_at: float
    updated_at: float
    version: int
    sandbox: SandboxOut | None
    addresses: dict[str, str]  # network -> address: a sandboxed task's endpoints
    weight: int = 1  # the task's own weight (the service's `weights` may override it)


class SuspicionOut(_Response):
    dead_in: float  # seconds until it is declared dead unless it refutes
    confirmations: int  # independent suspicions received (each shortens the timer)


class MemberOut(_Response):
    name: str
    address: str
    port: int
    status: Literal["alive", "suspect", "dead", "left"]
    incarnation: int
    suspicion: SuspicionOut | None = None  # while suspect: its Lifeguard timer
    late_by: float | None = None  # it announced it answers this many seconds late


class HealthOut(_Response):
    status: Literal["ok"]
    node: str


class OverlayOut(_Response):
    vni: int
    host_address: str | None
    peers: int


class EncryptionOut(_Response):
    """Encrypted overlays on this node (docs/networking.md, "Encrypted overlay networks")."""

    networks: list[str] = []  # the encrypted overlays this node serves
    peers: int = 0  # remote VTEPs in the last successful sync
    synced: bool = False  # the kernel holds what is wanted
    error: str | None = None  # why the last sync failed
    collisions: int = 0  # SAs left out in the last sync (SPI collision)
    rejected_remotes: int = 0  # remotes that cannot be a VTEP, left out
    plain_out_dropped: int = 0  # an encrypted network's VXLAN held back (no IPsec route)
    plain_in_dropped: int = 0  # plain VXLAN with an encrypted network's VNI, dropped


class SandboxesOut(_Response):
    """The sandbox manager: off (and why), or what it keeps and its counters."""

    enabled: bool
    reason: str | None = None  # why sandboxes are off
    prefix: str | None = None  # of the namespaces this node owns: mp-<node_id>-
    networks: list[str] = []  # this node's driver-backed networks
    sandboxes: int = 0  # this node's sandboxed tasks
    #: ensured, removed, failed (kernel steps), orphans_removed, repaired (at start),
    #: peer_syncs (overlay peer tables programmed), esp_syncs and esp_failures
    #: (encrypted overlays' IPsec and filter programmed, or not)
    stats: dict[str, int] = {}
    #: each overlay network this node serves: its VNI, this node's own address on it,
    #: and how many remote endpoints its peer table holds
    overlays: dict[str, OverlayOut] = {}
    encryption: EncryptionOut | None = None


class CapabilitiesOut(_Response):
    #: the capabilities the agent's features use that it holds (CAP_NET_ADMIN, ...)
    effective: list[str]
    #: one line per capability it lacks: "no CAP_X: what is off without it"
    missing: list[str]


class AgentOut(_Response):
    node: str
    pid: int
    started_at: float  # wall clock
    config: dict[str, str]  # every setting, as the start-up log shows it (token hidden)
    sandboxes: SandboxesOut | None = None
    capabilities: CapabilitiesOut | None = None


class DnsRecordOut(_Response):
    name: str
    type: str
    ttl: int
    data: str


class ResolveOut(_Response):
    name: str
    type: str
    network: str | None
    source: str
    rcode: str
    forwarded: bool
    truncated: bool
    answers: list[DnsRecordOut]
    additional: list[DnsRecordOut]


class PeerDigestOut(_Response):
    node: str
    digest: str
    records: int
    age: float  # seconds since it was announced


class StateDigestOut(_Response):
    digest: str  # 32 hex digits; equal on two nodes holding the same records
    records: int
    peers: list[PeerDigestOut]  # the latest digest each alive peer announced


class ProbeRttOut(_Response):
    #: probes per bucket of `gossip.rtt.RTT_BOUNDS`, then one above them (not cumulative)
    buckets: list[int]
    sum: float  # seconds


class GossipOut(_Response):
    node: str
    incarnation: int
    health_score: int
    lateness: float  # seconds this node answers late, by its own probes (0: not late)
    members: int
    encrypted: bool  # this node has a gossip keyring
    #: with a keyring: plaintext dropped (False while moving a cluster to encryption)
    verify_incoming: bool = True
    #: with a keyring: sends encrypted (False while moving a cluster to encryption)
    verify_outgoing: bool = True
    drops: dict[str, int]
    counts: dict[str, int]
    #: UDP messages by direction ("in", "out") and type ("ping", "alive", ...)
    messages: dict[str, dict[str, int]] = Field(default_factory=dict)
    #: UDP bytes by direction, as the wire carries them
    bytes: dict[str, int] = Field(default_factory=dict)
    #: TCP stream bytes (push-pulls, fallback pings) by direction
    stream_bytes: dict[str, int] = Field(default_factory=dict)
    #: answered probes' round trips by the Ack's path (direct, indirect, tcp)
    probe_rtt: dict[str, ProbeRttOut] = Field(default_factory=dict)
    state: StateDigestOut


class DnsEntryOut(_Response):
    name: str
    type: str  # A, SRV or PTR
    value: str


class DnsRecordsOut(_Response):
    network: str | None
    records: list[DnsEntryOut]
    #: this process's DNS counters (DNS workers keep their own): queries answered,
    #: refused as malformed (formerr, badvers, ...), cache gauges, TCP connections
    stats: dict[str, int]


class KeyOut(_Response):
    fingerprint: str  # 8 hex digits of the key's SHA-256: a key itself is never echoed
    primary: bool


class KeyringOut(_Response):
    keys: list[KeyOut]


class ErrorDetail(_Response):
    code: str
    message: str


class ErrorOut(_Response):
    error: ErrorDetail


class LbRealOut(_Response):
    address: str
    port: int
    weight: int  # 0: draining


class LbServiceOut(_Response):
    protocol: Literal["tcp", "udp"]
    address: str  # a VIP, or 0.0.0.0 for a published port
    port: int
    scheduler: Literal["rr", "wrr", "lc", "mh"]  # mh: Maglev consistent hashing
    proxy_protocol: bool
    #: a published port's traffic policy: `local` sends only to this node's own tasks
    #: without SNAT (docs/load-balancing.md); always `cluster` for a VIP
    traffic_policy: Literal["cluster", "local"] = "cluster"
    #: session affinity by client address: seconds a client keeps its real (0: none)
    affinity: int = 0
    reals: list[LbRealOut]


class HttpRouteOut(_Response):
    service: str
    host: str
    path_prefix: str
    requests: dict[str, int]  # by status class: "2xx", ...
    latency_sum: float
    latency_count: int
    #: requests per upstream-latency bucket (`lb.http.stats.LATENCY_BOUNDS`, then above)
    latency_buckets: list[int] = Field(default_factory=list)
    retries: int


class HttpOut(_Response):
    """The HTTP routing mesh's counters (summed over its worker processes)."""

    workers: int | None = None  # present when worker processes serve the port
    connections_open: int = 0
    connections_total: int = 0
    requests: int = 0
    rejected: dict[str, int]  # by the status the router answered itself
    no_route: int = 0
    no_endpoint: int = 0
    connect_failures: int = 0
    fd_shortage: int = 0  # connects this node could not make for want of descriptors
    over_budget: int = 0  # clients refused: the router's descriptor budget was full
    slow_bodies: int = 0  # request bodies cut (408) for arriving too slowly
    upstream_timeouts: int = 0
    retries: int = 0
    upgrades: int = 0
    tls_handshakes: int = 0
    passthrough: int = 0
    #: HTTPS connections by outcome (`lb.http.stats.TLS_OUTCOMES`, docs/metrics.md)
    tls_outcomes: dict[str, int] = Field(default_factory=dict)
    ejected: list[str]  # tasks passive health keeps out of rotation now
    ejections: int = 0
    fd_budget: int = 0  # descriptors the router may hold
    fds_held: int = 0  # descriptors it holds now
    access_log_written: int = 0  # access-log lines written
    access_log_dropped: int = 0  # entries dropped: the writer's queue was full
    access_log_write_errors: int = 0  # writes that failed (a full disk): their lines lost
    routes: list[HttpRouteOut]


class LbSandboxOut(_Response):
    key: str
    netns: str
    networks: list[str]
    vips: int  # virtual services in its table
    errors: int


class LbHealthOut(_Response):
    """Whether this node serves a service's published ports (docs/load-balancing.md):
    with `traffic_policy` `local`, only while it has a healthy task of its own."""

    service: str
    node: str
    traffic_policy: Literal["cluster", "local"]
    local_healthy_tasks: int  # this node's tasks taking new connections
    healthy_tasks: int  # every node's
    serving: bool  # the answer is 200 when true, 503 when not


class LbFailoverOut(_Response):
    """Failover on a suspect node (docs/load-balancing.md): its reals leave the table
    before the verdict."""

    suspects: int  # nodes suspect now
    hidden: list[str]  # nodes whose reals are out of the table now
    reals_hidden: int  # (virtual service, real) pairs left out now
    nodes_hidden: int  # times a node's reals were taken out since start
    hidden_refuted: int  # of those, ended by a refutation (a false removal)
    kept_last: int  # virtual services keeping a hidden node's reals: no other real left
    refuted_longest: float  # seconds the longest refuted suspicion lasted (the hold's margin)


class LbOutliersOut(_Response):
    """Passive outlier detection (docs/lb.md, nftables only): reals that leave SYNs
    unanswered and fail a direct check leave the table until they answer again."""

    ejected: list[str]  # reals out of the table now, "address:port"
    ejections: int  # times a real was ejected since start
    restored: int  # times an ejected real answered again and came back
    checks: int  # direct checks (TCP connects from this node) of candidates and ejected reals
    false_candidates: int  # candidates that answered: an unanswered SYN, not a dead real
    kept_last: int  # dead checks not acted on: the real was a virtual service's last
    polls: int  # readings of the unanswered flows in conntrack
    flows_unanswered: int  # unanswered flows DNATed by this node in the last reading
    poll_errors: int  # readings that failed
    truncated: int  # readings cut short at the cap on entries read


class LbOut(_Response):
    backend: str  # ipvs, nftables or userspace
    reason: str  # why --lb chose it
    errors: int  # ops the backend refused since start
    pending: int  # batches of ops queued, not yet applied
    stats: dict[str, int]
    unbound: dict[str, str]  # virtual services the backend could not program, and why
    unbound_rebound: int = 0  # sockets made by a retry after their first attempt failed
    services: list[LbServiceOut]  # as programmed, read back from the backend
    desired: list[LbServiceOut]  # what the state wants, built from scratch
    sandboxes: list[LbSandboxOut] = []  # sandboxes balancing their VIPs in their own table
    sandbox_errors: int = 0  # ops a sandbox's table refused
    sandboxes_vanished: int = 0  # sandboxes dropped because their namespace was gone
    sample_errors: int = 0  # readings of its counters per service (GET /metrics) that failed
    #: the --lb-healthz listener's counters (requests, refused_busy, bad_requests,
    #: timeouts, open); left out when it does not run
    healthz: dict[str, int] | None = None
    failover: LbFailoverOut | None = None  # suspect nodes taken out of the table
    #: reals ejected for unanswered SYNs; left out when outlier detection does not run
    outliers: LbOutliersOut | None = None
