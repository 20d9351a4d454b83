"""`mesh service create | ls | inspect | update | rm`.

`service ls` shows, per service, its ports as `*:8080->80/tcp` (ingress: every
node answers) or `8080->80/tcp` (host mode: only nodes running a task), and its
tasks as healthy/total over the running ones, from one `GET /v1/tasks`.
`service create` and `update` warn on stderr of each HRM route problem the
service has once set (the answer's `problems`); the exit status stays 0.
"""

from __future__ import annotations

import argparse
from collections import Counter

from lb.view import (
    AFFINITY_LABEL,
    DEFAULT_AFFINITY_TIMEOUT,
    SCHEDULER_LABEL,
    parse_affinity,
)
from mesh.cli import spec
from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.errors import UsageError
from mesh.cli.output import Context
from mesh.cli.table import short_id
from mesh.cli.update import ServiceChanges, compute_patch, version_of

HEADERS = ("ID", "NAME", "MODE", "NETWORKS", "VIPS", "PORTS", "TASKS")
ENDPOINT_MODES = ("vip", "dnsrr")
LOCALITY_HELP = (
    "prefer-local: VIP traffic from a node goes to that node's own healthy tasks while it "
    "has any, else to the others; any: every task (the default)"
)
GRAMMARS = f"{spec.PUBLISH_GRAMMAR}\n\n{spec.HEALTH_CHECK_GRAMMAR}\n\n{spec.NETWORK_GRAMMAR}"


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    nouns = add_noun(subparsers, "service", parents=parents, help="manage services")
    _add_create(nouns, parents)
    add_command(nouns, "ls", _ls, parents=parents, help="list services", aliases=("list",))
    _add_update(nouns, parents)
    for name, handler, help in (
        ("inspect", _inspect, "show a service as JSON"),
        ("rm", _rm, "remove a service and its tasks"),
    ):
        command = add_command(nouns, name, handler, parents=parents, help=help)
        command.add_argument("name", metavar="NAME")


def _add_create(nouns: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    create = add_command(
        nouns, "create", _create, parents=parents, help="create a service", epilog=GRAMMARS
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--network",
        metavar="NET",
        action="append",
        default=[],
        help="attach to a network (NET, or name=NET,alias=A); repeatable",
    )
    create.add_argument(
        "--publish", "-p", metavar="SPEC", action="append", default=[], help=spec.PUBLISH_HELP
    )
    create.add_argument(
        "--endpoint-mode",
        choices=ENDPOINT_MODES,
        help="vip (a virtual IP, the default) or dnsrr (DNS round robin)",
    )
    create.add_argument(
        "--label", metavar="K=V", action="append", default=[], help="a label; repeatable"
    )
    create.add_argument("--health-check", metavar="SPEC", help=spec.HEALTH_CHECK_HELP)
    _add_policy_flags(create)


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """L4 policy flags: shorthands for the `mesh.lb.*` labels (docs/lb.md)."""
    parser.add_argument(
        "--affinity",
        metavar="client-ip[:TIMEOUT]",
        help="session affinity: a client address keeps its task while it comes back within "
        f"TIMEOUT seconds (default {DEFAULT_AFFINITY_TIMEOUT}); `none` turns it off "
        f"(label {AFFINITY_LABEL})",
    )
    parser.add_argument(
        "--lb-algorithm",
        metavar="ALG",
        choices=LB_ALGORITHMS,
        help="L4 balancing: rr (round robin, the default), wrr, lc (least connections), "
        f"maglev (consistent hashing of the client's address and port) (label {SCHEDULER_LABEL})",
    )
    parser.add_argument("--locality", choices=spec.LOCALITIES, help=LOCALITY_HELP)


#: `--lb-algorithm` values, as the `mesh.lb.scheduler` label takes them
LB_ALGORITHMS = ("rr", "wrr", "lc", "maglev")


def policy_labels(args: argparse.Namespace) -> dict[str, str]:
    """The labels `--affinity` and `--lb-algorithm` stand for (checked before sending)."""
    labels: dict[str, str] = {}
    affinity = getattr(args, "affinity", None)
    if affinity is not None:
        try:
            parse_affinity(affinity)
        except ValueError as exc:
            raise UsageError(f"--affinity: {exc}") from None
        labels[AFFINITY_LABEL] = affinity.strip().lower()
    algorithm = getattr(args, "lb_algorithm", None)
    if algorithm is not None:
        labels[SCHEDULER_LABEL] = algorithm
    if getattr(args, "locality", None) == "prefer-local":
        labels[spec.LOCALITY_LABEL] = args.locality
    return labels


def _add_update(nouns: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    update = add_command(
        nouns,
        "update",
        _update,
        parents=parents,
        help="change a service (refused if it changed meanwhile)",
        epilog=GRAMMARS,
    )
    update.add_argument("name", metavar="NAME")
    update.add_argument(
        "--network",
        "--network-add",
        dest="network_add",
        metavar="NET",
        action="append",
        default=[],
        help="attach to a network (NET, or name=NET,alias=A); repeatable",
    )
    for flag, metavar, help in (
        ("--network-rm", "NET", "detach from a network"),
        ("--publish-add", "SPEC", "publish a port, as --publish (below)"),
        ("--publish-rm", "PUB[/PROTO]", "stop publishing a published port (tcp by default)"),
        ("--label-add", "K=V", "add or change a label"),
        ("--label-rm", "K", "remove a label"),
    ):
        update.add_argument(
            flag, metavar=metavar, action="append", default=[], help=f"{help}; repeatable"
        )
    update.add_argument("--endpoint-mode", choices=ENDPOINT_MODES, help="vip or dnsrr")
    check = update.add_mutually_exclusive_group()
    check.add_argument(
        "--health-check", metavar="SPEC", help="set the health check, as --health-check (below)"
    )
    check.add_argument("--no-health-check", action="store_true", help="remove the health check")
    _add_policy_flags(update)
    update.add_argument(
        "--weight",
        metavar="TASK=N",
        action="append",
        default=[],
        help="set a task's weight (0..1000; 0 drains it) for this service; repeatable",
    )


def create_body(args: argparse.Namespace) -> JsonObject:
    """The POST body; parses every flag before anything is sent."""
    body: JsonObject = {"name": args.name}
    if args.network:
        body["networks"], aliases = spec.parse_networks(args.network)
        if aliases:
            body["aliases"] = aliases
    if args.publish:
        body["ports"] = [spec.parse_publish(p) for p in args.publish]
    if args.endpoint_mode is not None:
        body["endpoint_mode"] = args.endpoint_mode
    labels = {**spec.parse_labels(args.label), **policy_labels(args)}
    if labels:
        body["labels"] = labels
    if args.health_check is not None:
        body["health_check"] = spec.parse_health_check(args.health_check)
    return body


def changes_of(args: argparse.Namespace) -> ServiceChanges:
    """What `service update`'s flags ask for; parses every flag before anything is sent."""
    check = args.health_check
    added, aliases = spec.parse_networks(args.network_add)
    label_add = spec.parse_labels(args.label_add, "--label-add")
    label_drop: tuple[str, ...] = ()
    if args.locality == "prefer-local":
        label_add[spec.LOCALITY_LABEL] = args.locality
    elif args.locality == "any":
        label_drop = (spec.LOCALITY_LABEL,)
    return ServiceChanges(
        network_add=tuple(added),
        alias_add={net: tuple(names) for net, names in aliases.items()},
        network_rm=tuple(args.network_rm),
        publish_add=tuple(spec.parse_publish(p) for p in args.publish_add),
        publish_rm=tuple(spec.parse_published_ref(p) for p in args.publish_rm),
        label_add={**label_add, **policy_labels(args)},
        label_rm=tuple(args.label_rm),
        label_drop=label_drop,
        weights=spec.parse_task_weights(args.weight),
        endpoint_mode=args.endpoint_mode,
        health_check=None if check is None else spec.parse_health_check(check),
        clear_health_check=bool(args.no_health_check),
    )


def format_port(port: JsonObject) -> str:
    mapping = (
        f"{text(port.get('published_port'))}->{text(port.get('target_port'))}"
        f"/{port.get('protocol', 'tcp')}"
    )
    if port.get("traffic_policy", "cluster") != "cluster":
        mapping += f" ({port['traffic_policy']})"
    return mapping if port.get("publish_mode") == "host" else f"*:{mapping}"


def task_counts(tasks: list[JsonObject]) -> dict[str, tuple[int, int]]:
    """Per service, (healthy, total) over its running tasks; draining ones are on their way out."""
    running = [t for t in tasks if t.get("state", "running") == "running"]
    total = Counter(text(t.get("service")) for t in running)
    healthy = Counter(text(t.get("service")) for t in running if t.get("health") == "healthy")
    return {name: (healthy[name], count) for name, count in total.items()}


def row(service: JsonObject, counts: dict[str, tuple[int, int]]) -> list[str]:
    healthy, total = counts.get(text(service.get("name")), (0, 0))
    return [
        short_id(text(service.get("id"))),
        text(service.get("name")),
        text(service.get("endpoint_mode")),
        ",".join(service.get("networks") or []),
        ",".join(text(v.get("address")) for v in json_objects(service.get("vips"))),
        ",".join(format_port(p) for p in json_objects(service.get("ports"))),
        f"{healthy}/{total}",
    ]


def problem_warnings(service: JsonObject) -> list[str]:
    """The service's HRM route problems (as the API lists them), one line each."""
    name = text(service.get("name"))
    return [
        f"service {name}: {text(p.get('kind'))} problem in label {text(p.get('label'))}: "
        f"{text(p.get('reason'))}"
        for p in json_objects(service.get("problems"))
    ]


def _warn_problems(ctx: Context, service: JsonObject) -> None:
    # A label the router cannot use is a silent 404 otherwise: say so where it was set.
    for line in problem_warnings(service):
        ctx.warn(line)


def _create(ctx: Context, args: argparse.Namespace) -> int:
    service = ctx.client.post("/v1/services", create_body(args))
    ctx.emit_object(service, text(service.get("id")))
    _warn_problems(ctx, service)
    return 0


def _ls(ctx: Context, args: argparse.Namespace) -> int:
    services = json_objects(ctx.client.get_all("/v1/services"))
    if ctx.json:
        ctx.emit_json(services)
        return 0
    counts = task_counts(json_objects(ctx.client.get_all("/v1/tasks")))
    ctx.emit_table(HEADERS, [row(s, counts) for s in services])
    return 0


def _inspect(ctx: Context, args: argparse.Namespace) -> int:
    ctx.emit_json(ctx.client.get(api_path("/v1/services", args.name)))
    return 0


def _update(ctx: Context, args: argparse.Namespace) -> int:
    changes = changes_of(args)
    if changes.is_empty():
        raise UsageError("nothing to update: give at least one change (see --help)")
    path = api_path("/v1/services", args.name)
    current = ctx.client.get(path)
    version = version_of(current)
    query = None if version is None else {"version": version}
    service = ctx.client.patch(path, compute_patch(current, changes), query)
    ctx.emit_object(service, args.name)
    _warn_problems(ctx, service)
    return 0


def _rm(ctx: Context, args: argparse.Namespace) -> int:
    ctx.client.delete(api_path("/v1/services", args.name))
    if not ctx.json:
        ctx.emit_line(args.name)
    return 0
