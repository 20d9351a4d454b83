"""Between the wire (API models) and the store (specs, records).

Answers are the `*Out` models: `*_fields` give a record's fields in the
model's shape, `*_model` the model itself, validated. Handlers serialize the
models (`app.answer`, `app.answer_list`, which validates a whole list in one
call) and the change feed sends their JSON objects (`*_out`), so every answer
says what `/v1/openapi.json` describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lb.http.routes import Problem
from lb.table import Scheduler
from lb.view import prefers_local, service_options
from mesh.api.models import (
    HealthCheckIn,
    NetworkCreate,
    NetworkOut,
    PortIn,
    ServiceCreate,
    ServiceOut,
    ServicePatchIn,
    TaskCreate,
    TaskOut,
)
from mesh.core import net
from mesh.core.codec import check_to_dict, port_to_dict, sandbox_to_dict
from mesh.core.model import HealthCheck, Network, Service, Task, vni_of
from mesh.errors import Invalid
from mesh.state.specs import (
    NetworkSpec,
    PortSpec,
    SandboxSpec,
    ServicePatch,
    ServiceSpec,
    TaskSpec,
)

Json = dict[str, Any]


def network_fields(network: Network) -> Json:
    """A network in the shape of `NetworkOut`."""
    return {
        "name": network.name,
        "id": network.id,
        "driver": network.driver,
        "subnet": network.subnet,
        "gateway": network.gateway,
        "labels": dict(network.labels),
        "created_at": network.created_at,
        "version": network.version.clock,
        "scope": network.scope,
        "node": network.node,
        "internal": network.internal,
        "attachable": network.attachable,
        "ip_range": network.ip_range,
        "aux_addresses": dict(network.aux_addresses),
        "options": dict(network.options),
        "vni": vni_of(network),
    }


def service_fields(service: Service, problems: Sequence[Problem] = ()) -> Json:
    """A service in the shape of `ServiceOut`, with its HRM route problems."""
    return {
        "name": service.name,
        "id": service.id,
        "networks": list(service.networks),
        "endpoint_mode": service.endpoint_mode,
        "ports": [port_to_dict(p) | {"traffic_policy": p.traffic_policy} for p in service.ports],
        "labels": dict(service.labels),
        "vips": [{"network": v.network, "address": v.address} for v in service.vips],
        "health_check": None
        if service.health_check is None
        else check_to_dict(service.health_check),
        "created_at": service.created_at,
        "updated_at": service.updated_at,
        "version": service.version.clock,
        "aliases": {net: list(names) for net, names in service.aliases.items()},
        "weights": dict(service.weights),
        "lb": lb_policy(service),
        "problems": [{"kind": p.kind, "label": p.label, "reason": p.reason} for p in problems],
    }


def lb_policy(service: Service) -> Json:
    """The L4 policies the service's labels ask for, as the view reads them (a value it
    does not know reads as the default: docs/lb.md); traffic policies are per port."""
    options = service_options(service)
    scheduler = options.scheduler
    return {
        "algorithm": "maglev" if scheduler is Scheduler.MAGLEV else scheduler.value,
        "affinity": f"client-ip:{options.affinity}" if options.affinity else "none",
        "locality": "prefer-local" if prefers_local(service) else "any",
        "proxy_protocol": options.proxy_protocol,
    }


def task_fields(task: Task, node_status: str) -> Json:
    """A task in the shape of `TaskOut`; `node_status`: the liveness of the task's node
    as this node's gossip sees it."""
    return {
        "id": task.id,
        "name": task.name,
        "service": task.service,
        "slot": task.slot,
        "node": task.node,
        "node_status": node_status,
        "address": task.address,
        "ports": {str(k): v for k, v in sorted(task.ports.items())},
        "state": task.state.value,
        "health": task.health.value,
        "health_output": task.health_output,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "version": task.version.clock,
        "sandbox": None if task.sandbox is None else sandbox_to_dict(task.sandbox),
        "addresses": task.addresses,
        "weight": task.weight,
    }


def network_model(network: Network) -> NetworkOut:
    return NetworkOut.model_validate(network_fields(network))


def service_model(service: Service, problems: Sequence[Problem] = ()) -> ServiceOut:
    return ServiceOut.model_validate(service_fields(service, problems))


def task_model(task: Task, node_status: str) -> TaskOut:
    return TaskOut.model_validate(task_fields(task, node_status))


# The change feed's objects: the JSON of the same models.


def network_out(network: Network) -> Json:
    return network_model(network).model_dump(mode="json")


def service_out(service: Service) -> Json:
    """A service as the event stream carries it: without problems, which depend on more
    than the one record (`GET /v1/services/{name}` has them)."""
    return service_model(service).model_dump(mode="json", exclude={"problems"})


def task_out(task: Task, node_status: str) -> Json:
    return task_model(task, node_status).model_dump(mode="json")


def network_spec(body: NetworkCreate) -> NetworkSpec:
    return NetworkSpec(
        name=body.name,
        subnet=body.subnet,
        driver=body.driver,
        labels=dict(body.labels),
        gateway=body.gateway,
        ip_range=body.ip_range,
        aux_addresses=dict(body.aux_addresses),
        internal=body.internal,
        attachable=body.attachable,
        options=dict(body.options),
    )


def _ports(ports: list[PortIn]) -> tuple[PortSpec, ...]:
    return tuple(
        PortSpec(
            target_port=p.target_port,
            published_port=p.published_port,
            protocol=p.protocol,
            publish_mode=p.publish_mode,
            traffic_policy=p.traffic_policy,
        )
        for p in ports
    )


def _check(check: HealthCheckIn | None) -> HealthCheck | None:
    if check is None:
        return None
    return HealthCheck(
        type=check.type,
        port=check.port,
        path=check.path,
        status_min=check.status_min,
        status_max=check.status_max,
        interval=float(check.interval),
        timeout=float(check.timeout),
        retries=check.retries,
        start_period=float(check.start_period),
        ttl=float(check.ttl),
    )


def service_spec(body: ServiceCreate) -> ServiceSpec:
    return ServiceSpec(
        name=body.name,
        networks=tuple(body.networks),
        endpoint_mode=body.endpoint_mode,
        ports=_ports(body.ports),
        labels=dict(body.labels),
        health_check=_check(body.health_check),
        aliases=_aliases(body.aliases),
    )


def _aliases(aliases: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    return {net: tuple(names) for net, names in aliases.items()}


def service_patch(body: ServicePatchIn) -> ServicePatch:
    given = body.model_fields_set
    return ServicePatch(
        networks=None if body.networks is None else tuple(body.networks),
        endpoint_mode=body.endpoint_mode,
        ports=None if body.ports is None else _ports(body.ports),
        labels=None if body.labels is None else dict(body.labels),
        health_check=_check(body.health_check),
        clear_health_check="health_check" in given and body.health_check is None,
        aliases=None if body.aliases is None else _aliases(body.aliases),
        weights=None if body.weights is None else dict(body.weights),
    )


def task_spec(service: str, body: TaskCreate) -> TaskSpec:
    """The body's `ports` keys are target ports as text ("80"), checked by the model."""
    if body.address is None and body.sandbox is None:
        raise Invalid(
            "field 'address' is required (or 'sandbox', for a sandboxed task)",
            code="missing_field",
        )
    return TaskSpec(
        service=service,
        address=body.address,
        ports={net.parse_port(k, "target port"): v for k, v in body.ports.items()},
        name=body.name,
        sandbox=None if body.sandbox is None else SandboxSpec(netns=body.sandbox.netns),
        weight=body.weight,
    )
