"""Traffic policy as the API, the health listener and `mesh doctor` see it (sans-IO).

- `healthz(view, service)`: the answer to `GET /v1/lb/healthz/<service>` (and the
  same path on the `--lb-healthz` listener): 200 while this node can serve the
  service's published ports, 503 while it cannot, so an external load balancer
  skips the node. A port with `traffic-policy=local` is served only by this
  node's own healthy tasks, so the service needs one here; otherwise any healthy
  task of the service, on any node, will do (the routing mesh forwards).
- `lb_problems(view, backend)`: options a backend refuses, as problems on the
  service (shown by `mesh service inspect`, `GET /v1/services`, `mesh doctor`):
  the PROXY protocol label on a kernel backend, which cannot write a header into
  a stream it does not terminate, and least connections (`lc`) on nftables, which
  keeps no connection count a rule can read. Refused, never silently ignored
  (docs/load-balancing.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lb.http.labels import Problem
from lb.table import Scheduler
from lb.view import (
    PROXY_PROTOCOL_LABEL,
    SCHEDULER_LABEL,
    LbView,
    service_options,
    wants_proxy_protocol,
)
from mesh.core.model import Service

#: The backends that terminate the client's connection, and so can send a PROXY header.
PROXY_BACKENDS = frozenset({"userspace"})
#: The backends that keep the client's address towards a `traffic-policy=local` task
#: (the userspace proxy too for TCP when it may connect transparently: `transparent`).
KEEPS_CLIENT_ADDRESS = frozenset({"nftables", "ipvs"})
TRAFFIC_POLICY_LABEL = "traffic_policy"


def traffic_policy(service: Service) -> str:
    """`local` when any published port of the service has it, else `cluster`."""
    return "local" if any(p.traffic_policy == "local" for p in service.ports) else "cluster"


@dataclass(frozen=True, slots=True)
class Health:
    status: int  # 200, 503, or 404 (no such service)
    body: dict[str, Any]


def healthz(view: LbView, name: str) -> Health:
    service = view.service(name)
    if service is None:
        return Health(404, {"service": name, "error": "no such service"})
    here, everywhere = view.healthy_tasks(name)
    policy = traffic_policy(service)
    serving = here > 0 if policy == "local" else everywhere > 0
    body = {
        "service": service.name,
        "node": view.node,
        "traffic_policy": policy,
        "local_healthy_tasks": here,
        "healthy_tasks": everywhere,
        "serving": serving,
    }
    return Health(200 if serving else 503, body)


def _loses_client_address(service: Service, backend: str, transparent: bool) -> bool:
    """Whether a `local` port of the service reaches its tasks from this node's address."""
    if backend in KEEPS_CLIENT_ADDRESS:
        return False
    local = [p for p in service.ports if p.traffic_policy == "local"]
    if backend == "userspace" and transparent:
        return any(p.protocol != "tcp" for p in local)  # transparent connects are TCP's
    return bool(local)


def lb_problems(
    view: LbView, backend: str, *, transparent: bool = False
) -> dict[str, list[Problem]]:
    """service -> the L4 options this node's backend refuses or honours only in part.

    `transparent`: the userspace proxy connects to `local` TCP ports' tasks from the
    client's address (lb/userspace/transparent.py)."""
    problems: dict[str, list[Problem]] = {}
    for service in view.services():
        if _loses_client_address(service, backend, transparent):
            header = "; mesh.lb.proxy_protocol=v2 sends it in a header" * (
                backend in PROXY_BACKENDS
            )
            reason = (
                f"traffic-policy=local on the {backend} backend: only this node's tasks "
                "take the port's connections, but they see this node's address, not the "
                "client's (the kernel backends keep it; the userspace one for TCP when "
                f"the agent holds CAP_NET_ADMIN{header})"
            )
            problems.setdefault(service.name, []).append(
                Problem(service.name, TRAFFIC_POLICY_LABEL, reason, kind="lb")
            )
        if backend not in PROXY_BACKENDS and wants_proxy_protocol(service):
            problems.setdefault(service.name, []).append(
                Problem(
                    service.name,
                    PROXY_PROTOCOL_LABEL,
                    f"the {backend} backend cannot send PROXY protocol headers (the kernel "
                    "does not terminate the connection): refused, the tasks get no header; "
                    "run this node with --lb userspace for it",
                    kind="lb",
                )
            )
        if (
            backend == "nftables"
            and service_options(service).scheduler is Scheduler.LEAST_CONNECTIONS
        ):
            problems.setdefault(service.name, []).append(
                Problem(
                    service.name,
                    SCHEDULER_LABEL,
                    "the nftables backend cannot balance by least connections (lc): nftables "
                    "keeps no per-task connection count a rule can read; refused, the "
                    "service's virtual services are not programmed on this node; use rr, "
                    "wrr or maglev, or run this node with --lb ipvs or userspace",
                    kind="lb",
                )
            )
    return problems
