"""Handlers of /v1: validate, run one store mutation through Control, answer.

Each handler is a few lines: the rules live in the store, the shapes in
`models`, the status codes in `mesh.errors`.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from mesh.api import convert, paging
from mesh.api.app import DEPS, answer, read_model
from mesh.api.models import (
    NODE_STATUSES,
    AgentOut,
    DnsRecordsOut,
    GossipOut,
    HealthOut,
    HealthReport,
    HttpOut,
    LbHealthOut,
    LbOut,
    MemberOut,
    NetworkCreate,
    NetworkOut,
    ResolveOut,
    ServiceCreate,
    ServiceOut,
    ServicePatchIn,
    TaskCreate,
    TaskOut,
)
from mesh.control import Control
from mesh.core.model import Health, Kind, Network, Service, Task
from mesh.errors import Conflict, Invalid, NotFound, SandboxFailed, needs_privileges
from mesh.sandbox import esp
from mesh.state.store import KERNEL_DRIVERS, task_key

R = TypeVar("R")


def _control(request: web.Request) -> Control:
    return request.app[DEPS].control


def _task_out(request: web.Request, task: Task) -> TaskOut:
    return convert.task_model(task, request.app[DEPS].node_status()(task.node))


async def _tasks_out(
    request: web.Request, service: str | None = None, node: str | None = None
) -> web.StreamResponse:
    """Tasks with their node's status, only those of `?node_status=` (comma-separated),
    a page of them with `?limit=` and `?after=` (docs/api.md)."""
    status_of = request.app[DEPS].node_status()
    wanted: set[str] | None = None
    text = request.query.get("node_status")
    if text is not None:
        wanted = set(text.split(","))
        unknown = sorted(wanted - set(NODE_STATUSES))
        if unknown:
            raise Invalid(
                f"node_status {unknown[0]!r} is not one of "
                f"{', '.join(NODE_STATUSES)} (several: comma-separated)"
            )
    limit = paging.limit_of(request)
    after = paging.after_of(request, (str, int, str))
    store = _control(request).store

    def rows() -> Iterator[tuple[Task, str]]:
        for task in store.iter_tasks(service=service, node=node, after=after):
            status = status_of(task.node)
            if wanted is None or status in wanted:
                yield task, status

    return await paging.answer_rows(
        request,
        TaskOut,
        rows(),
        lambda row: convert.task_fields(*row),
        lambda row: task_key(row[0]),
        limit,
    )


async def health(request: web.Request) -> web.Response:
    return answer(HealthOut(status="ok", node=request.app[DEPS].node))


async def agent_info(request: web.Request) -> web.Response:
    """This agent: its pid and configuration, for `mesh doctor` and operators."""
    info = request.app[DEPS].agent_info
    return answer(
        AgentOut.model_validate({"node": request.app[DEPS].node, **(info() if info else {})})
    )


async def members(request: web.Request) -> web.StreamResponse:
    return await _by_name(
        request, MemberOut, request.app[DEPS].members(), lambda m: m, operator.itemgetter("name")
    )


# -- networks ------------------------------------------------------------------


async def create_network(request: web.Request) -> web.Response:
    spec = convert.network_spec(await read_model(request, NetworkCreate))
    if spec.driver in KERNEL_DRIVERS and request.app[DEPS].sandboxes is None:
        raise needs_privileges(f"a {spec.driver} network")
    if spec.driver == "overlay" and _encrypted(spec.options) and request.app[DEPS].keyring is None:
        # The IPsec keys are derived from the gossip keyring: without one there is
        # nothing to encrypt with (and the network would carry nothing).
        raise Invalid(
            "an encrypted network takes its keys from the gossip keyring, and this agent "
            "has none (it runs with --insecure-gossip: start it with the cluster's key, "
            "--keyring FILE or --token)",
            code="encrypted_needs_keyring",
        )
    control = _control(request)
    changes = await control.apply(lambda now: control.store.create_network(spec, now))
    created = changes[0].after  # then this node's own overlay address, if it serves overlays
    assert isinstance(created, Network)
    return answer(convert.network_model(created), status=201)


async def list_networks(request: web.Request) -> web.StreamResponse:
    return await _by_name(
        request, NetworkOut, _control(request).store.networks(), convert.network_fields
    )


def _by_name(
    request: web.Request,
    model: type[BaseModel],
    records: list[R],
    fields: Callable[[R], dict[str, Any]],
    name: Callable[[R], str] = operator.attrgetter("name"),
) -> Awaitable[web.StreamResponse]:
    """A list sorted by name (networks, services, members), paged by name."""
    limit = paging.limit_of(request)
    after = paging.after_of(request, (str,))
    start = 0 if after is None else bisect.bisect_right(records, after[0], key=name)
    return paging.answer_rows(
        request, model, itertools.islice(records, start, None), fields, lambda r: (name(r),), limit
    )


async def get_network(request: web.Request) -> web.Response:
    network = _control(request).store.network(request.match_info["name"])
    return answer(convert.network_model(network))


async def delete_network(request: web.Request) -> web.Response:
    control = _control(request)
    name = request.match_info["name"]
    await control.apply(lambda now: control.store.remove_network(name, now))
    return web.Response(status=204)


# -- services ------------------------------------------------------------------


async def create_service(request: web.Request) -> web.Response:
    spec = convert.service_spec(await read_model(request, ServiceCreate))
    control = _control(request)
    changes = await control.apply(lambda now: control.store.create_service(spec, now))
    created = changes[-1].after
    assert isinstance(created, Service)
    problems = request.app[DEPS].problems_of(created.name)
    return answer(convert.service_model(created, problems), status=201)


async def list_services(request: web.Request) -> web.StreamResponse:
    services = _control(request).store.services()
    problems = request.app[DEPS].problems()
    return await _by_name(
        request,
        ServiceOut,
        services,
        lambda s: convert.service_fields(s, problems.get(s.name, ())),
    )


async def get_service(request: web.Request) -> web.Response:
    service = _control(request).store.service(request.match_info["name"])
    problems = request.app[DEPS].problems_of(service.name)
    return answer(convert.service_model(service, problems))


def _expected_version(request: web.Request) -> int | None:
    text = request.query.get("version")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:  # int() refuses "²"
        raise Invalid(f"version {text!r} is not a non-negative integer")
    return int(text)


async def update_service(request: web.Request) -> web.Response:
    control = _control(request)
    name = request.match_info["name"]
    control.store.service(name)  # 404 before looking at the body
    expected = _expected_version(request)
    patch = convert.service_patch(await read_model(request, ServicePatchIn))
    changes = await control.apply(
        lambda now: control.store.update_service(name, patch, now, expected)
    )
    updated = changes[-1].after
    assert isinstance(updated, Service)
    problems = request.app[DEPS].problems_of(updated.name)
    return answer(convert.service_model(updated, problems))


async def delete_service(request: web.Request) -> web.Response:
    control = _control(request)
    name = request.match_info["name"]
    await control.apply(lambda now: control.store.remove_service(name, now))
    return web.Response(status=204)


# -- tasks ---------------------------------------------------------------------


async def create_task(request: web.Request) -> web.Response:
    control = _control(request)
    service = request.match_info["name"]
    control.store.service(service)  # 404 before looking at the body
    spec = convert.task_spec(service, await read_model(request, TaskCreate))
    sandboxes = request.app[DEPS].sandboxes
    if spec.sandbox is not None and sandboxes is None:
        raise needs_privileges("a sandboxed task")
    changes = await control.apply(lambda now: control.store.add_task(spec, now))
    created = changes[-1].after
    assert isinstance(created, Task)
    task_id = created.id
    if sandboxes is not None and created.sandbox is not None:
        # 201 only once the sandbox is up; a sandbox that cannot be made takes its task along.
        try:
            await sandboxes.ready(task_id, request.app[DEPS].sandbox_timeout)
        except SandboxFailed:
            if control.store.get_task(task_id) is not None:
                await control.apply(lambda now: control.store.remove_task(task_id, now))
            raise
        created = control.store.get_task(task_id) or created
    return answer(_task_out(request, created), status=201)


async def list_service_tasks(request: web.Request) -> web.StreamResponse:
    service = _control(request).store.service(request.match_info["name"])
    return await _tasks_out(request, service=service.name)


async def list_tasks(request: web.Request) -> web.StreamResponse:
    return await _tasks_out(
        request, service=request.query.get("service"), node=request.query.get("node")
    )


async def get_task(request: web.Request) -> web.Response:
    task = _control(request).store.task(request.match_info["id"])
    return answer(_task_out(request, task))


async def delete_task(request: web.Request) -> web.Response:
    """Drain first (no new traffic), remove after the grace period: 202 Accepted."""
    deps = request.app[DEPS]
    task_id = request.match_info["id"]
    store = deps.control.store
    await deps.control.apply(lambda now: store.drain_task(task_id, now, deps.drain_grace))
    return answer(_task_out(request, store.task(task_id)), status=202)


async def report_health(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    store = deps.control.store
    task = store.task(request.match_info["id"])
    report = await read_model(request, HealthReport)
    if task.node != deps.node:
        raise Conflict(
            f"task {task.id} runs on node {task.node!r}: report its health there", code="not_local"
        )
    healthy = report.status == "healthy"
    # The health runner owns TTL deadlines; the store records the transition.
    deps.heartbeat(task.id, healthy, report.output)
    health = Health.HEALTHY if healthy else Health.UNHEALTHY
    await deps.control.apply(lambda now: store.set_health(task.id, health, report.output, now))
    return answer(_task_out(request, store.task(task.id)))


async def resolve(request: web.Request) -> web.Response:
    """What the embedded DNS answers an asker on `network` (default: the host)."""
    deps = request.app[DEPS]
    if deps.resolve is None:
        raise Conflict("this agent runs no DNS server (--dns none)", code="dns_disabled")
    name = request.query.get("name", "")
    qtype = request.query.get("type", "A")
    network_name = request.query.get("network")
    network = None
    if network_name is not None:
        found = deps.control.store.get(Kind.NETWORK, network_name)
        if not isinstance(found, Network):
            raise Invalid(f"network {network_name!r} does not exist", code="unknown_network")
        network = found
    try:
        reply = await deps.resolve(name, qtype, network)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return answer(ResolveOut.model_validate(reply))


async def dns_records(request: web.Request) -> web.Response:
    """Every record the embedded DNS answers an asker on `network` (default: the host)."""
    deps = request.app[DEPS]
    if deps.dns_records is None:
        raise Conflict("this agent runs no DNS server (--dns none)", code="dns_disabled")
    network = None
    network_name = request.query.get("network")
    if network_name is not None:
        found = deps.control.store.get(Kind.NETWORK, network_name)
        if not isinstance(found, Network):
            raise Invalid(f"network {network_name!r} does not exist", code="unknown_network")
        network = found
    stats = deps.dns_stats() if deps.dns_stats is not None else {}
    return answer(
        DnsRecordsOut.model_validate(
            {"network": network_name, "records": deps.dns_records(network), "stats": stats}
        )
    )


async def gossip_stats(request: web.Request) -> web.Response:
    stats = request.app[DEPS].gossip_stats
    if stats is None:
        raise Conflict("this agent runs no gossip", code="gossip_disabled")
    return answer(GossipOut.model_validate(stats()))


async def lb_table(request: web.Request) -> web.Response:
    """The L4 table as this node's backend has it programmed (read back from it)."""
    describe = request.app[DEPS].lb
    if describe is None:
        raise Conflict("this agent runs no load balancer", code="lb_disabled")
    return answer(LbOut.model_validate(await describe()))


async def lb_healthz(request: web.Request) -> web.Response:
    """200 while this node serves the service's published ports, 503 (same body) while not."""
    health = request.app[DEPS].lb_healthz
    if health is None:
        raise Conflict("this agent runs no load balancer", code="lb_disabled")
    found = health(request.match_info["service"])
    if found.status == 404:
        raise NotFound(f"no service {request.match_info['service']!r}")
    return answer(LbHealthOut.model_validate(found.body), status=found.status)


async def http_stats(request: web.Request) -> web.Response:
    """The HTTP routing mesh's counters (its workers' summed, when it has workers)."""
    stats = request.app[DEPS].http_stats
    if stats is None:
        raise Conflict("this agent runs no HTTP routing mesh (--http none)", code="http_disabled")
    snapshot = stats()
    snapshot["rejected"] = {str(k): v for k, v in snapshot.get("rejected", {}).items()}
    snapshot.setdefault("routes", [])
    snapshot.setdefault("ejected", [])
    return answer(HttpOut.model_validate(snapshot))


def _encrypted(options: dict[str, str]) -> bool:
    try:
        return esp.is_encrypted(options)
    except esp.EspError:
        return False  # the store refuses the value, saying why
