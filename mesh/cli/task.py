"""`mesh task add | run | exec | ls | inspect | rm`.

A task is a host process at an `--address`, or a sandboxed one: its own
network namespace with one endpoint per network of its service, made by the
agent (`task add --sandbox`, `task run`). `task run` runs a command inside a
new sandbox in the foreground and removes the task when the command exits
(its exit status is `mesh`'s); `task exec` runs one inside an existing task's.

A task is named by its id, but people copy the 12-character id that `task ls`
shows, or the task's name: when the agent does not know the reference as an id,
it is looked up among all tasks as a name or a unique id prefix, as docker does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mesh.cli import inside, spec
from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.errors import ApiError, CliError, UsageError
from mesh.cli.output import Context
from mesh.cli.spec import parse_port_map
from mesh.cli.table import short_id

HEADERS = ("ID", "NAME", "SERVICE", "NODE", "NODE STATUS", "ADDRESS", "PORTS", "STATE", "HEALTH")


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    nouns = add_noun(subparsers, "task", parents=parents, help="manage tasks (service instances)")
    add = add_command(
        nouns, "add", _add, parents=parents, help="register a task of a service on this node"
    )
    add.add_argument("service", metavar="SERVICE")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", metavar="IP", help="the task's IPv4 address (a host process)")
    where.add_argument(
        "--sandbox",
        action="store_true",
        help="give the task a sandbox (a network namespace with an endpoint on each network "
        "of the service) and print its path",
    )
    add.add_argument(
        "--netns",
        metavar="PATH|NAME",
        help="with --sandbox: adopt this namespace (/proc/PID/ns/net, or a name under "
        "/run/netns) instead of making one; only what the agent adds is removed later",
    )
    _add_task_options(add)
    run = add_command(
        nouns,
        "run",
        _run,
        parents=parents,
        help="run a command in a new sandboxed task of a service (removed when it exits)",
        epilog="usage: mesh task run SERVICE [--name N] [--port T=P]... [--detach] -- CMD [ARG...]",
    )
    run.add_argument("service", metavar="SERVICE")
    run.set_defaults(takes_command=True)
    _add_task_options(run)
    run.add_argument(
        "--detach",
        "-d",
        action="store_true",
        help="start CMD in the background, print the task and leave it up (`mesh task rm`)",
    )
    exec_ = add_command(
        nouns,
        "exec",
        _exec,
        parents=parents,
        help="run a command inside a sandboxed task's namespace",
        epilog="usage: mesh task exec TASK -- CMD [ARG...]",
    )
    exec_.add_argument("task", metavar="TASK", help="its id, id prefix or name")
    exec_.set_defaults(takes_command=True)
    ls = add_command(nouns, "ls", _ls, parents=parents, help="list tasks", aliases=("list",))
    ls.add_argument("service", metavar="SERVICE", nargs="?", help="only this service's")
    ls.add_argument("--node", metavar="NODE", help="only this node's")
    ls.add_argument(
        "--node-status",
        metavar="STATUS",
        help="only tasks whose node is alive, suspect, dead, left or unknown "
        "(comma-separated for several)",
    )
    for name, handler, help in (
        ("inspect", _inspect, "show a task as JSON"),
        ("rm", _rm, "deregister a task (it drains, then goes)"),
    ):
        command = add_command(nouns, name, handler, parents=parents, help=help)
        command.add_argument("task", metavar="TASK", help="its id, id prefix or name")


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        metavar="TARGET=ACTUAL",
        action="append",
        default=[],
        help="the task serves the service's TARGET port on ACTUAL; repeatable",
    )
    parser.add_argument("--name", metavar="NAME", help="its name (default: SERVICE.SLOT.ID)")
    parser.add_argument(
        "--weight",
        metavar="N",
        type=spec.parse_weight,
        help="its share of new connections under wrr/lc, 0..1000 (default 1; 0 drains it)",
    )


def add_body(args: argparse.Namespace) -> JsonObject:
    body: JsonObject
    if getattr(args, "address", None) is not None:
        if getattr(args, "netns", None) is not None:
            raise UsageError("--netns goes with --sandbox, not --address")
        body = {"address": args.address}
    else:
        body = {"sandbox": {"netns": getattr(args, "netns", None)}}
    if args.port:
        body["ports"] = parse_port_map(args.port)
    if args.name is not None:
        body["name"] = args.name
    if getattr(args, "weight", None) is not None:
        body["weight"] = args.weight
    return body


def format_ports(ports: object) -> str:
    if not isinstance(ports, dict):
        return ""
    return ",".join(f"{target}->{actual}" for target, actual in ports.items())


def format_addresses(task: JsonObject) -> str:
    """A host task's address; a sandboxed task's address on each network: `A:10.0.1.5,B:...`."""
    addresses = task.get("addresses")
    if isinstance(task.get("sandbox"), dict) and isinstance(addresses, dict) and addresses:
        return ",".join(f"{net}:{ip}" for net, ip in addresses.items())
    return text(task.get("address"))


def sandbox_path(task: JsonObject) -> str:
    """The namespace of a sandboxed task; a clear error for a host task."""
    sandbox = task.get("sandbox")
    netns = sandbox.get("netns") if isinstance(sandbox, dict) else None
    if not isinstance(netns, str) or not netns:
        raise CliError(
            f"task {text(task.get('name')) or text(task.get('id'))} has no sandbox "
            "(a host task registered with --address)"
        )
    return netns


def row(task: JsonObject) -> list[str]:
    return [
        short_id(text(task.get("id"))),
        text(task.get("name")),
        text(task.get("service")),
        text(task.get("node")),
        text(task.get("node_status")),
        format_addresses(task),
        format_ports(task.get("ports")),
        text(task.get("state")),
        text(task.get("health")),
    ]


def match_task(tasks: list[JsonObject], ref: str) -> JsonObject | None:
    """The one task whose name is `ref` or whose id starts with it; None when none does."""
    named = [t for t in tasks if t.get("name") == ref]
    if named:
        return named[0]
    prefixed = [t for t in tasks if text(t.get("id")).startswith(ref)]
    if len(prefixed) > 1:
        raise CliError(f"task {ref!r} is ambiguous: {len(prefixed)} task ids start with it")
    return prefixed[0] if prefixed else None


def find_task(ctx: Context, ref: str) -> JsonObject:
    """The task that `ref` names: an id, else a name or a unique id prefix."""
    try:
        task = ctx.client.get(api_path("/v1/tasks", ref))
    except ApiError as exc:
        if exc.status != 404 or not ref:
            raise
        found = match_task(json_objects(ctx.client.get_all("/v1/tasks")), ref)
        if found is None:
            raise
        return found
    if not isinstance(task, dict):
        raise CliError(f"the agent answered task {ref!r} with something that is not an object")
    return task


def _add(ctx: Context, args: argparse.Namespace) -> int:
    if args.netns is not None and not args.sandbox:
        raise UsageError("--netns goes with --sandbox")
    task = ctx.client.post(api_path("/v1/services", args.service, "tasks"), add_body(args))
    ctx.emit_object(task, sandbox_path(task) if args.sandbox else text(task.get("id")))
    return 0


def _run(ctx: Context, args: argparse.Namespace) -> int:
    argv: list[str] = list(getattr(args, "argv", None) or [])
    if not argv and not args.detach:
        raise UsageError("no command given: mesh task run SERVICE [OPTIONS] -- CMD [ARG...]")
    args.netns = None
    return run_in_new_task(ctx, args.service, add_body(args), argv, detach=args.detach)


def run_in_new_task(
    ctx: Context,
    service: str,
    body: JsonObject,
    argv: list[str],
    *,
    detach: bool,
    cleanup: Callable[[], None] | None = None,
) -> int:
    """Create a sandboxed task of `service`, run `argv` inside; remove it after unless detached.

    `cleanup` runs after the task is removed (`mesh run` removes its service there).
    """
    with inside.signals_recorded() as signalled:
        task = ctx.client.post(api_path("/v1/services", service, "tasks"), body)
    task_id = text(task.get("id"))
    if signalled:  # Ctrl-C or SIGTERM while the sandbox was being made: undo, and stop
        _remove_quietly(ctx, task_id, cleanup)
        return 128 + signalled[0]
    netns = sandbox_path(task)
    if detach:
        try:
            if argv:
                inside.start_detached(netns, argv)
        except CliError:
            _remove_quietly(ctx, task_id, cleanup)
            raise
        ctx.emit_object(task, task_id)
        return 0
    try:
        return inside.run_foreground(netns, argv)
    finally:
        _remove_quietly(ctx, task_id, cleanup)


def _remove_quietly(ctx: Context, task_id: str, cleanup: Callable[[], None] | None) -> None:
    """Remove the task (and whatever `cleanup` removes): the command's status is what counts.

    A second Ctrl-C or SIGTERM meanwhile would leave the task behind: they wait.
    """
    with inside.shielded():
        _remove(ctx, task_id, cleanup)


def _remove(ctx: Context, task_id: str, cleanup: Callable[[], None] | None) -> None:
    try:
        ctx.client.delete(api_path("/v1/tasks", task_id))
    except ApiError as exc:
        if exc.status != 404:
            raise
    finally:
        if cleanup is not None:
            cleanup()


def _exec(ctx: Context, args: argparse.Namespace) -> int:
    argv: list[str] = list(getattr(args, "argv", None) or [])
    if not argv:
        raise UsageError("no command given: mesh task exec TASK -- CMD [ARG...]")
    return inside.run_foreground(sandbox_path(find_task(ctx, args.task)), argv)


def _ls(ctx: Context, args: argparse.Namespace) -> int:
    query = {
        k: v
        for k, v in (
            ("service", args.service),
            ("node", args.node),
            ("node_status", args.node_status),
        )
        if v
    }
    tasks = json_objects(ctx.client.get_all("/v1/tasks", query))
    if ctx.json:
        ctx.emit_json(tasks)
    else:
        ctx.emit_table(HEADERS, [row(t) for t in tasks])
    return 0


def _inspect(ctx: Context, args: argparse.Namespace) -> int:
    ctx.emit_json(find_task(ctx, args.task))
    return 0


def _rm(ctx: Context, args: argparse.Namespace) -> int:
    task_id = text(find_task(ctx, args.task).get("id")) or args.task
    task = ctx.client.delete(api_path("/v1/tasks", task_id))
    ctx.emit_object(task, task_id)
    return 0
