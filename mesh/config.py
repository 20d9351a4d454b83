"""Agent configuration: the only place that reads flags, the config file and the environment.

Precedence: a flag given on the command line, then the TOML file of
`--config`, then the environment (`MESH_API_TOKEN`, `MESH_JOIN_TOKEN`), then the embedded
defaults, which differ for root and for an unprivileged user (docs/design.md,
"Ports and addresses"; a service user holding CAP_NET_ADMIN and
CAP_NET_BIND_SERVICE, as deploy/meshplane.service runs it, gets root's): without
root the DNS and HRM ports move above 1024,
the address pool moves into 127/8 so that VIPs work on loopback, and the data
dir moves under the user's home.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gossip import join_token
from mesh.api_tokens import Scope, TokenFileError, Tokens, parse_token_file, tokens
from mesh.core import net
from mesh.core.capabilities import effective
from mesh.core.net import HostPort
from mesh.errors import MeshError
from mesh.ipam import DEFAULT_POOL, UNPRIVILEGED_POOL, parse_pool, parse_subnet

GOSSIP_PORT = 7946
LB_CHOICES = ("auto", "ipvs", "nftables", "userspace")
GOSSIP_PROFILES = ("lan", "wan", "local")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: the nftables backend's mark bit by default (lb/nft/marks.py DEFAULT_FWMARK: a unit
#: test keeps the two equal; lb.nft is not imported here, a build may lack it)
DEFAULT_FWMARK = 0x1000


class ConfigError(ValueError):
    """A flag, config key or value the agent cannot start with."""


def parse_host_port(text: str, default_port: int | None, what: str) -> HostPort:
    """`ADDR:PORT`, `[v6]:PORT`, or a bare `ADDR` when a default port exists (`mesh.core.net`)."""
    try:
        return net.parse_host_port(text, default_port, what)
    except net.AddressError as exc:
        raise ConfigError(str(exc)) from None


def runs_privileged() -> bool:
    """Whether root's defaults apply: root, or a service user holding the capabilities
    they need (CAP_NET_BIND_SERVICE for :53 and :80; CAP_NET_ADMIN for the kernel load
    balancer that serves VIPs from the 10/8 pool): the user of deploy/meshplane.service."""
    if os.geteuid() == 0:
        return True
    caps = effective()
    return caps.net_admin and caps.net_bind_service


def default_data_dir(root: bool) -> Path:
    if root:
        return Path("/var/lib/meshplane")
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "meshplane"


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything `mesh agent` runs with. Durations are in seconds."""

    node_name: str
    advertise: HostPort
    join: tuple[HostPort, ...] = ()
    #: resolvers asked for --join names; empty: the host's (/etc/resolv.conf)
    join_resolvers: tuple[HostPort, ...] = ()
    #: failed join rounds before the agent gives up and exits; 0: it never does
    retry_join_max: int = 0
    data_dir: Path
    api: HostPort = HostPort("127.0.0.1", 2377)
    dns: HostPort | None  # None: no DNS server (`--dns none`)
    http: HostPort | None  # None: no HTTP routing mesh (`--http none`)
    lb: str = "auto"
    #: where the userspace proxy binds published ports: every address by default;
    #: agents sharing one host (tests) each give their own address
    publish_address: str = "0.0.0.0"
    #: seconds an idle TCP connection is kept by the load balancer (IPVS's tcp timeout,
    #: the userspace proxy's idle timeout): past Linux's 2 h keepalive, unlike IPVS's 900
    lb_tcp_idle: float = 7800.0
    #: the health listener for external load balancers (`GET /v1/lb/healthz/<service>`
    #: without credentials; docs/load-balancing.md); None: not served
    lb_healthz: HostPort | None = None
    #: the packet-mark bit the nftables backend marks its flows with (to masquerade
    #: them): checked at start against the host's other rules (lb/nft/marks.py)
    fwmark: int = DEFAULT_FWMARK
    #: passive outlier detection on the nftables backend (lb/outlier.py): a real that
    #: leaves SYNs unanswered, and does not answer a direct check, leaves the table
    lb_outlier_detection: bool = True
    keyring: Path | None = None
    #: the cluster's join token (`--token`, `--token-file`, MESH_JOIN_TOKEN): its keyring
    #: is stored in the data dir at the first start (docs/gossip.md "Secure by default")
    join_token: join_token.JoinToken | None = field(default=None, repr=False)
    #: plaintext gossip, by explicit choice only (logged as a warning at start)
    insecure_gossip: bool = False
    #: with a keyring: drop plaintext gossip (memberlist's GossipVerifyIncoming); off
    #: only while a running plaintext cluster moves to encryption
    gossip_verify_incoming: bool = True
    #: with a keyring: send encrypted gossip (GossipVerifyOutgoing); off: plaintext
    gossip_verify_outgoing: bool = True
    address_pool: str
    #: the built-in ingress network's subnet when it is created; None: a /16 of the pool
    ingress_subnet: str | None = None
    api_token: str | None = field(default=None, repr=False)
    #: every token the API accepts with its scope: `--api-token` (write) and the lines of
    #: `--api-token-file`; held as digests only
    api_tokens: Tokens = field(default=Tokens(), repr=False)
    api_token_file: Path | None = None
    #: the API's certificate and key (HTTPS); with a CA, clients must present a certificate
    #: it signed (mTLS)
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    api_tls_ca: Path | None = None
    #: serve the API in plain HTTP on a non-loopback address (refused without it)
    api_insecure: bool = False
    #: how long a deregistered task keeps its connections before it is removed
    drain_grace: float = 2.0
    #: the UDP port of the overlay networks' VXLAN traffic between nodes (the VTEP is the
    #: advertise address); the same on every node of a cluster
    data_path_port: int = 4789
    dns_domain: str | None = None
    #: point the host's resolver at the DNS server for the dns domain while running
    configure_resolver: bool = False
    #: upstream resolvers for names the mesh does not own; empty: the host's resolv.conf
    dns_upstreams: tuple[HostPort, ...] = ()
    #: TTL of the answers for mesh names, seconds
    dns_ttl: int = 5
    #: extra processes answering DNS on the same port (SO_REUSEPORT), each a core
    dns_workers: int = 0
    #: seconds a tombstone (a delete) is kept before it is forgotten (Swarm: 30 min)
    tombstone_reap: float = 1800.0
    #: gossip timings: lan (memberlist's LAN defaults), wan, or local (fast, for tests)
    gossip_profile: str = "lan"
    #: optional cluster label bound into every gossip packet: two clusters never merge
    cluster_label: str = ""
    log_level: str = "info"
    #: largest accepted API request body, bytes
    max_body: int = 1 << 20
    #: processes serving the HRM port (SO_REUSEPORT); 0: the agent's own event loop
    http_workers: int = 0
    #: optional HTTPS address of the HRM (TLS terminated by SNI, or sni:// passthrough)
    https: HostPort | None = None
    #: certificates for the HTTPS address, each "HOST=CERTFILE,KEYFILE"; the first is the default
    tls_certs: tuple[str, ...] = ()
    #: one logfmt line per proxied request
    http_access_log: bool = False
    #: where the access logs of the HRM and the L4 proxy go: a file (O_APPEND) or "-" (stdout)
    access_log: str = "-"
    #: the share of HTTP requests and L4 connections logged, 0..1 (0: no access log)
    access_log_sample: float = 0.01
    #: json (one object a line) or clf (the Combined Log Format)
    access_log_format: str = "json"
    #: seconds a client has to send a whole request head (slowloris: 408 and close)
    http_header_timeout: float = 10.0
    #: seconds to connect to a task and to wait for its response (504)
    http_upstream_timeout: float = 60.0
    #: largest request body the HRM forwards, bytes (413); 0: no limit
    http_max_body: int = 1 << 30
    #: seconds a whole request body may take to arrive (408); 0: no limit
    http_body_deadline: float = 3600.0
    #: the slowest a request body may arrive, bytes/s on average after 10 s (408); 0: none
    http_body_min_rate: int = 1024

    def __post_init__(self) -> None:
        if self.lb not in LB_CHOICES:
            raise ConfigError(f"lb {self.lb!r}: choose one of {', '.join(LB_CHOICES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log-level {self.log_level!r}: one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.dns_ttl <= 86_400:
            raise ConfigError("dns-ttl must be between 0 and 86400 seconds")
        if not 0.0 <= self.access_log_sample <= 1.0:  # NaN fails too
            raise ConfigError(f"access-log-sample {self.access_log_sample:g}: between 0 and 1")
        if self.access_log_format not in ("json", "clf"):
            raise ConfigError(f"access-log-format {self.access_log_format!r}: json or clf")
        if self.gossip_profile not in GOSSIP_PROFILES:
            raise ConfigError(
                f"gossip-profile {self.gossip_profile!r}: one of {', '.join(GOSSIP_PROFILES)}"
            )
        if len(self.cluster_label.encode()) > 255:
            raise ConfigError("cluster-label may be at most 255 bytes")
        self._check_gossip_security()
        if not 0 <= self.dns_workers <= 64:
            raise ConfigError("dns-workers must be between 0 and 64")
        if not 0 <= self.http_workers <= 64:
            raise ConfigError("http-workers must be between 0 and 64")
        if not 0 < self.http_header_timeout <= 3600 or not 0 < self.http_upstream_timeout <= 86_400:
            raise ConfigError(
                "http-header-timeout and http-upstream-timeout must be positive "
                "(at most an hour and a day)"
            )
        if self.http_max_body < 0:
            raise ConfigError("http-max-body must be 0 (no limit) or a number of bytes")
        if not 0 <= self.http_body_deadline <= 30 * 86_400:
            raise ConfigError("http-body-deadline must be 0 (no limit) or up to 30 days")
        if self.http_body_min_rate < 0:
            raise ConfigError("http-body-min-rate must be 0 (none) or bytes per second")
        for spec in self.tls_certs:
            host, sep, files = spec.partition("=")
            if not sep or not host or files.count(",") != 1 or "" in files.split(","):
                raise ConfigError(f"tls-cert {spec!r}: expected HOST=CERTFILE,KEYFILE")
        if self.tls_certs and self.https is None:
            raise ConfigError("tls-cert needs --https ADDR:PORT")
        if not 1 <= self.tombstone_reap <= 30 * 86_400:
            raise ConfigError("tombstone-reap must be between 1 second and 30 days")
        if not 1 <= self.data_path_port <= 65535:
            raise ConfigError(f"data-path-port {self.data_path_port}: 1 to 65535")
        if self.retry_join_max < 0:
            raise ConfigError("retry-join-max must be 0 (never give up) or a number of rounds")
        if not 0 <= self.drain_grace <= 3600:
            raise ConfigError("drain-grace must be between 0 and 3600 seconds")
        try:
            parse_pool(self.address_pool)
        except MeshError as exc:
            raise ConfigError(exc.message) from None
        if self.ingress_subnet is not None:
            try:
                parse_subnet(self.ingress_subnet)
            except MeshError as exc:
                raise ConfigError(f"ingress-subnet: {exc.message}") from None
        if self.configure_resolver and (self.dns is None or not self.dns_domain):
            raise ConfigError(
                "configure-resolver needs the DNS server (--dns) and a --dns-domain "
                "whose names the host should resolve through it"
            )
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ConfigError("api-tls-cert and api-tls-key go together: give both")
        if self.api_tls_ca is not None and self.api_tls_cert is None:
            raise ConfigError("api-tls-ca (mTLS) needs api-tls-cert and api-tls-key")
        if not self.api.is_loopback and not self.api_token and not self.api_tokens:
            raise ConfigError(
                f"the API on {self.api} is reachable from other hosts: set --api-token "
                "(or MESH_API_TOKEN) or --api-token-file, or bind it to a loopback address"
            )
        if not self.api.is_loopback and self.api_tls_cert is None and not self.api_insecure:
            raise ConfigError(
                f"the API on {self.api} is reachable from other hosts in plain HTTP, "
                "tokens included: set --api-tls-cert and --api-tls-key, or --api-insecure "
                "to serve it in plain HTTP anyway, or bind it to a loopback address"
            )

    @property
    def api_tls(self) -> bool:
        return self.api_tls_cert is not None

    def _check_gossip_security(self) -> None:
        """One source of gossip keys at most; a token's label is the cluster's."""
        if self.insecure_gossip and (self.keyring is not None or self.join_token is not None):
            raise ConfigError(
                "--insecure-gossip runs gossip in plaintext: it cannot be given with "
                "--keyring or a join token (--token, --token-file, MESH_JOIN_TOKEN)"
            )
        if self.keyring is not None and self.join_token is not None:
            raise ConfigError(
                "give the gossip key once: --keyring FILE or a join token "
                "(--token, --token-file, MESH_JOIN_TOKEN), not both"
            )
        token = self.join_token
        if token is not None and self.cluster_label and self.cluster_label != token.label:
            raise ConfigError(
                f"cluster-label {self.cluster_label!r} differs from the join token's "
                f"({token.label!r}): leave --cluster-label out, the token carries it"
            )


# Flag name -> (help, parser of one string value). Every flag is also a key of
# the TOML file, spelled with hyphens or underscores.
_FLAGS: dict[str, str] = {
    "node-name": "this node's name in the cluster (default: the host name)",
    "advertise": "ADDR[:PORT] other nodes reach this one at for gossip (default port 7946)",
    "join": "HOST[:PORT] of a node to join, or a DNS name with several (its SRV record "
    "_mesh._tcp.NAME, else its A/AAAA records); repeat for several; tried in rounds with a "
    "back-off until one answers",
    "join-resolver": "ADDR[:PORT] of the DNS server asked for --join names; repeat for "
    "several (default: the host's /etc/resolv.conf)",
    "retry-join-max": "failed join rounds before the agent gives up and exits 1 "
    "(default 0: it never gives up)",
    "data-dir": "where the state is kept (default /var/lib/meshplane, or "
    "~/.local/state/meshplane without root)",
    "api": "ADDR:PORT of the HTTP API (default 127.0.0.1:2377); a non-loopback address "
    "needs a token (--api-token or --api-token-file) and TLS (or --api-insecure)",
    "dns": "ADDR:PORT of the embedded DNS server (default 127.0.0.11:53, or :5353 without "
    "root); 'none' runs no DNS server",
    "dns-upstream": "ADDR[:PORT] of a resolver for names the mesh does not own; repeat for "
    "several (default: the nameservers of /etc/resolv.conf)",
    "dns-ttl": "TTL of mesh answers in seconds (default 5)",
    "dns-workers": "extra processes serving DNS on the same port, one per spare core "
    "(default 0: the agent's own event loop only)",
    "http": "ADDR:PORT of the HTTP routing mesh (default 0.0.0.0:80, or :8080 without root); "
    "'none' runs no router",
    "http-workers": "processes serving the HTTP routing mesh on the same port, one per core "
    "(default 0: the agent's own event loop)",
    "https": "ADDR:PORT of the routing mesh's HTTPS side (default: none); sni:// routes pass "
    "through, other hosts are terminated with --tls-cert",
    "tls-cert": "HOST=CERTFILE,KEYFILE: a certificate for the HTTPS side, chosen by SNI; "
    "repeat for several; HOST may be *.domain; the first is the default",
    "http-access-log": "on: one logfmt line per proxied request (default off)",
    "access-log": "PATH or '-': where the access logs of the routing mesh and the L4 proxy "
    "go (default -: stdout); each process appends whole lines",
    "access-log-sample": "the share of requests and L4 connections logged, 0 to 1 "
    "(default 0.01; 0: none)",
    "access-log-format": "json (one object a line, the default) or clf (Combined Log Format)",
    "http-header-timeout": "seconds a client has to send a request head (default 10)",
    "http-upstream-timeout": "seconds to connect to a task and to await its response (default 60)",
    "http-max-body": "largest request body the router forwards, bytes (default 1 GiB; 0: no limit)",
    "http-body-deadline": "seconds a whole request body may take to arrive (default 3600; "
    "0: no limit): 408",
    "http-body-min-rate": "the slowest a request body may arrive, bytes per second on average "
    "once 10 s have passed (default 1024; 0: no minimum): 408",
    "lb": "load-balancer backend: auto, ipvs, nftables or userspace (default auto)",
    "publish-address": "address the userspace load balancer binds published ports to "
    "(default 0.0.0.0: every address; give each agent its own when "
    "several share one host)",
    "lb-tcp-idle": "seconds an idle TCP connection is kept by the ipvs and userspace load "
    "balancers (default 7800: past Linux's 2 h keepalive; IPVS's own default "
    "cuts at 900)",
    "lb-healthz": "serve GET /v1/lb/healthz/<service> (200/503: whether this node serves "
    "the service's published ports) without credentials here, for external load "
    "balancers (ADDR[:PORT], port 10256 by default, as kube-proxy's; default: off)",
    "lb-outlier-detection": "on (the default): on the nftables backend, a task that leaves "
    "the SYNs this node sends it unanswered for 0.3 s, and a direct connect too, leaves "
    "the table until it answers again (docs/load-balancing.md); off: only gossip's "
    "verdicts remove it",
    "fwmark": "the packet-mark bit the nftables load balancer marks the flows it "
    "masquerades with (default 0x1000; 0x2000 and kube-proxy's 0x4000 are other tools'); "
    "the agent refuses to start when another rule on the host uses it",
    "keyring": "file holding the gossip encryption keys (default: the keyring in the data "
    "dir, made at the first start of a node that joins no one, or from --token)",
    "token": "join token printed by `mesh join-token` on a member: the gossip keys and "
    "the cluster label (default: env MESH_JOIN_TOKEN)",
    "token-file": "file holding the join token",
    "insecure-gossip": "run gossip in plaintext, without a keyring (logged as a warning)",
    "gossip-verify-incoming": "on: with a keyring, drop plaintext gossip (default on); off "
    "only while moving a plaintext cluster to encryption (docs/gossip.md)",
    "gossip-verify-outgoing": "on: with a keyring, send encrypted gossip (default on); off: "
    "send plaintext, while moving a plaintext cluster to encryption",
    "address-pool": "CIDR that network subnets are carved from, one /24 each, and the "
    "ingress network a /16 (default 10.0.0.0/8, or 127.16.0.0/12 without "
    "root)",
    "ingress-subnet": "CIDR of the built-in ingress network, which holds a VIP per service "
    "that publishes a port (default: the first free /16 of the address "
    "pool); used when the ingress is created: an existing one keeps its "
    "subnet",
    "api-token": "a write-scope bearer token the API accepts (default: env MESH_API_TOKEN)",
    "api-token-file": "file of the API's bearer tokens, one '<scope> <token>' per line, "
    "scope read (GET and HEAD only) or write (everything); '#' comments; read again on "
    "SIGHUP",
    "api-tls-cert": "PEM certificate (chain) of the API: it serves HTTPS (with --api-tls-key)",
    "api-tls-key": "PEM private key of --api-tls-cert",
    "api-tls-ca": "PEM CA certificate(s): API clients must present a certificate one of them "
    "signed (mTLS)",
    "api-insecure": "allow a plain-HTTP API on a non-loopback address (refused without it)",
    "drain-grace": "seconds a deregistered task drains before removal (default 2)",
    "data-path-port": "UDP port of the overlay networks' VXLAN traffic between nodes, the "
    "same on every node (default 4789)",
    "dns-domain": "optional cluster domain answered by the DNS server, e.g. mesh",
    "configure-resolver": "while the agent runs, the host's resolver asks its DNS "
    "server for --dns-domain names (a systemd-resolved drop-in for ~DOMAIN, else a "
    "nameserver line in /etc/resolv.conf); undone when it stops (default off)",
    "tombstone-reap": "seconds a delete is remembered before it is forgotten (default 1800)",
    "gossip-profile": "gossip timings: lan (memberlist's LAN defaults), wan, or local "
    "(fast, for tests on one machine) (default lan)",
    "cluster-label": "a label bound into every gossip packet, so that two clusters on one "
    "network never merge",
    "log-level": "debug, info, warning or error (default info)",
}


_REPEATED = (
    "join",
    "join-resolver",
    "dns-upstream",
    "tls-cert",
)  # flags given once per value; lists in the file
#: flags that take no value (`--api-insecure`, `--insecure-gossip`); true or false in the file
_SWITCHES = ("api-insecure", "configure-resolver", "insecure-gossip")
_METAVARS = {
    "dns-upstream": "ADDR[:PORT]",
    "dns-ttl": "SECONDS",
    "dns-workers": "N",
    "node-name": "NAME",
    "advertise": "ADDR[:PORT]",
    "join": "HOST[:PORT]",
    "join-resolver": "ADDR[:PORT]",
    "retry-join-max": "ROUNDS",
    "data-dir": "DIR",
    "lb": "BACKEND",
    "keyring": "FILE",
    "token": "TOKEN",
    "token-file": "FILE",
    "gossip-verify-incoming": "on|off",
    "gossip-verify-outgoing": "on|off",
    "address-pool": "CIDR",
    "ingress-subnet": "CIDR",
    "api-token": "TOKEN",
    "api-token-file": "FILE",
    "api-tls-cert": "FILE",
    "api-tls-key": "FILE",
    "api-tls-ca": "FILE",
    "drain-grace": "SECONDS",
    "data-path-port": "PORT",
    "dns-domain": "DOMAIN",
    "log-level": "LEVEL",
    "gossip-profile": "PROFILE",
    "cluster-label": "LABEL",
    "tombstone-reap": "SECONDS",
    "publish-address": "ADDR",
    "lb-tcp-idle": "SECONDS",
    "lb-healthz": "ADDR[:PORT]",
    "fwmark": "MARK",
    "lb-outlier-detection": "on|off",
    "http-workers": "N",
    "tls-cert": "HOST=CERT,KEY",
    "http-access-log": "on|off",
    "access-log": "PATH|-",
    "access-log-sample": "RATE",
    "access-log-format": "json|clf",
    "http-header-timeout": "SECONDS",
    "http-upstream-timeout": "SECONDS",
    "http-max-body": "BYTES",
    "http-body-deadline": "SECONDS",
    "http-body-min-rate": "BYTES",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh agent",
        description="Run the meshplane agent of this node. Every flag is also a key of the "
        "--config TOML file (flags win).",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with the keys below")
    for name, help_text in _FLAGS.items():
        metavar = _METAVARS.get(name, "ADDR:PORT")
        if name in _REPEATED:
            parser.add_argument(f"--{name}", action="append", metavar=metavar, help=help_text)
        elif name in _SWITCHES:
            parser.add_argument(f"--{name}", action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(f"--{name}", metavar=metavar, help=help_text)
    return parser


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse `mesh agent` flags (argparse exits 2 on a malformed command line)."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(list(argv)))
    file_values = _read_toml(Path(args.pop("config"))) if args.get("config") else {}
    args.pop("config", None)
    values: dict[str, Any] = dict(file_values)
    values.update({k: v for k, v in args.items() if v is not None})
    if "api_token" not in values and env.get("MESH_API_TOKEN"):
        values["api_token"] = env["MESH_API_TOKEN"]
    values["join_token"] = _join_token(values, env)
    return _build(values, root=runs_privileged())


def _join_token(values: dict[str, Any], env: Mapping[str, str]) -> join_token.JoinToken | None:
    """The join token of `--token`, `--token-file` or MESH_JOIN_TOKEN, checked now: a
    malformed one is a start error, not a node whose packets the cluster drops."""
    text, where = values.pop("token", None), "--token"
    path = values.pop("token_file", None)
    if text and path:
        raise ConfigError("give --token or --token-file, not both")
    if path:
        where = f"token file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot read token file {path}: {why}") from None
    explicit = values.get("keyring") or _on(values, "insecure_gossip", False)
    if not text and env.get("MESH_JOIN_TOKEN") and not explicit:
        # The environment yields to --keyring and --insecure-gossip given on purpose.
        text, where = env["MESH_JOIN_TOKEN"], "MESH_JOIN_TOKEN"
    if not text:
        return None
    try:
        return join_token.decode(str(text))
    except join_token.JoinTokenError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _on(values: dict[str, Any], key: str, default: bool) -> bool:
    """An on/off flag (on, off, true, false, 1, 0)."""
    text = str(values.get(key, default)).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{key.replace('_', '-')} {values[key]!r}: on or off")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {name.replace("-", "_") for name in _FLAGS}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        repeated = key.replace("_", "-") in _REPEATED
        if key.replace("_", "-") in _SWITCHES:
            if not isinstance(value, bool):
                raise ConfigError(f"config file {path}: {key} must be true or false")
            values[name] = value
            continue
        if repeated:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config file {path}: {key} must be a list of strings")
        elif not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"config file {path}: {key} must be a string or a number")
        values[name] = value if repeated else str(value)
    return values


def _lb_tcp_idle(values: dict[str, Any]) -> float:
    idle = _number(values, "lb_tcp_idle", 7800.0, float)
    if not 1 <= idle <= 30 * 86400:  # IPVS takes whole seconds
        raise ConfigError(f"lb-tcp-idle {idle:g}: 1 to {30 * 86400} seconds")
    return idle


def _fwmark(values: dict[str, Any]) -> int:
    text = str(values.get("fwmark", DEFAULT_FWMARK))
    try:
        mark = int(text.strip(), 0)
    except ValueError:
        raise ConfigError(f"fwmark {text!r}: give a number such as 0x1000") from None
    if not 0 < mark < 2**32 or mark & (mark - 1):
        raise ConfigError(f"fwmark {text}: must be one bit of the 32-bit mark (e.g. 0x1000)")
    return mark


def _build(values: dict[str, Any], *, root: bool) -> AgentConfig:
    node_name = str(values.get("node_name") or socket.gethostname().split(".")[0] or "node")
    drain_grace = _number(values, "drain_grace", 2.0, float)
    tombstone_reap = _number(values, "tombstone_reap", 1800.0, float)
    dns_ttl = int(_number(values, "dns_ttl", 5, int))
    dns_workers = int(_number(values, "dns_workers", 0, int))
    dns_text = str(values.get("dns", f"127.0.0.11:{53 if root else 5353}"))
    http_text = str(values.get("http", f"0.0.0.0:{80 if root else 8080}"))
    access_log = str(values.get("http_access_log", "off")).lower()
    if access_log not in ("on", "off", "true", "false"):
        raise ConfigError(f"http-access-log {access_log!r}: on or off")
    return AgentConfig(
        node_name=node_name,
        advertise=parse_host_port(
            str(values.get("advertise", "127.0.0.1")), GOSSIP_PORT, "advertise"
        ),
        join=tuple(parse_host_port(j, GOSSIP_PORT, "join") for j in values.get("join", [])),
        join_resolvers=tuple(
            _ip_host_port(r, 53, "join-resolver") for r in values.get("join_resolver", [])
        ),
        retry_join_max=int(_number(values, "retry_join_max", 0, int)),
        data_dir=Path(values.get("data_dir") or default_data_dir(root)),
        api=parse_host_port(str(values.get("api", "127.0.0.1:2377")), None, "api"),
        dns=None if dns_text.lower() in ("none", "off") else parse_host_port(dns_text, None, "dns"),
        http=None
        if http_text.lower() in ("none", "off")
        else parse_host_port(http_text, None, "http"),
        http_workers=int(_number(values, "http_workers", 0, int)),
        https=parse_host_port(str(values["https"]), None, "https") if values.get("https") else None,
        tls_certs=tuple(values.get("tls_cert", [])),
        http_access_log=access_log in ("on", "true"),
        access_log=str(values.get("access_log", "-")) or "-",
        access_log_sample=_number(values, "access_log_sample", 0.01, float),
        access_log_format=str(values.get("access_log_format", "json")).lower(),
        http_header_timeout=_number(values, "http_header_timeout", 10.0, float),
        http_upstream_timeout=_number(values, "http_upstream_timeout", 60.0, float),
        http_max_body=int(_number(values, "http_max_body", 1 << 30, int)),
        http_body_deadline=_number(values, "http_body_deadline", 3600.0, float),
        http_body_min_rate=int(_number(values, "http_body_min_rate", 1024, int)),
        lb=str(values.get("lb", "auto")),
        publish_address=_ip_address(
            str(values.get("publish_address", "0.0.0.0")), "publish-address"
        ),
        lb_tcp_idle=_lb_tcp_idle(values),
        lb_healthz=parse_host_port(str(values["lb_healthz"]), 10256, "lb-healthz")
        if values.get("lb_healthz")
        else None,
        fwmark=_fwmark(values),
        lb_outlier_detection=_on(values, "lb_outlier_detection", True),
        keyring=Path(values["keyring"]) if values.get("keyring") else None,
        join_token=values.get("join_token"),
        insecure_gossip=_on(values, "insecure_gossip", False),
        gossip_verify_incoming=_on(values, "gossip_verify_incoming", True),
        gossip_verify_outgoing=_on(values, "gossip_verify_outgoing", True),
        address_pool=str(
            values.get("address_pool") or (DEFAULT_POOL if root else UNPRIVILEGED_POOL)
        ),
        ingress_subnet=str(values["ingress_subnet"]).strip()
        if values.get("ingress_subnet")
        else None,
        api_token=values.get("api_token") or None,
        api_token_file=_path(values, "api_token_file"),
        api_tokens=_api_tokens(values),
        api_tls_cert=_path(values, "api_tls_cert"),
        api_tls_key=_path(values, "api_tls_key"),
        api_tls_ca=_path(values, "api_tls_ca"),
        api_insecure=bool(values.get("api_insecure", False)),
        drain_grace=drain_grace,
        data_path_port=int(_number(values, "data_path_port", 4789, int)),
        tombstone_reap=tombstone_reap,
        dns_domain=values.get("dns_domain") or None,
        configure_resolver=bool(values.get("configure_resolver", False)),
        dns_upstreams=tuple(
            _ip_host_port(u, 53, "dns-upstream") for u in values.get("dns_upstream", [])
        ),
        dns_ttl=dns_ttl,
        dns_workers=dns_workers,
        gossip_profile=str(values.get("gossip_profile", "lan")),
        cluster_label=str(values.get("cluster_label", ""))
        or (values["join_token"].label if values.get("join_token") else ""),
        log_level=str(values.get("log_level", "info")),
    )


def _path(values: dict[str, Any], key: str) -> Path | None:
    return Path(str(values[key])) if values.get(key) else None


def read_api_tokens(token: str | None, token_file: Path | None) -> Tokens:
    """The API's tokens: `token` (write scope) and the lines of `token_file`. Read at
    start and again on SIGHUP; ConfigError names the file and line, never a token."""
    pairs = [(Scope.WRITE, token)] if token else []
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read api-token-file {token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"api-token-file {token_file} is not UTF-8 text") from None
        try:
            pairs += parse_token_file(text, f"api-token-file {token_file}")
        except TokenFileError as exc:
            raise ConfigError(str(exc)) from None
    return tokens(pairs)


def _api_tokens(values: dict[str, Any]) -> Tokens:
    return read_api_tokens(values.get("api_token") or None, _path(values, "api_token_file"))


def _ip_host_port(text: str, default_port: int, what: str) -> HostPort:
    """Like parse_host_port, but the address must be an IP literal (nothing to resolve)."""
    try:
        return net.parse_ip_host_port(text, default_port, what)
    except net.AddressError as exc:
        raise ConfigError(str(exc)) from None


def _ip_address(text: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected an IPv4 address") from None


def _number(
    values: dict[str, Any], key: str, default: float, kind: type[int] | type[float]
) -> float:
    try:
        return kind(values.get(key, default))
    except ValueError:
        flag = key.replace("_", "-")
        raise ConfigError(f"{flag} {values[key]!r} is not a number") from None


def describe(config: AgentConfig) -> dict[str, str]:
    """The config as flat strings for the start-up log line (the token is hidden)."""
    shown = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name in ("api_token", "join_token"):
            value = "set" if value else "unset"
        elif item.name == "api_tokens":
            # How many of each scope, never the tokens (nor their digests).
            value = f"read={value.count(Scope.READ)},write={value.count(Scope.WRITE)}"
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        shown[item.name] = str(value)
    return shown
