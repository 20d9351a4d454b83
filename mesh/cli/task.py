"""`mesh task add | ls | inspect | rm`.

A task is named by its id, but people copy the 12-character id that `task ls`
shows, or the task's name: when the agent does not know the reference as an id,
it is looked up among all tasks as a name or a unique id prefix, as docker does.
"""

from __future__ import annotations

import argparse

from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.errors import ApiError, CliError
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
    add.add_argument("--address", metavar="IP", required=True, help="the task's IPv4 address")
    add.add_argument(
        "--port",
        metavar="TARGET=ACTUAL",
        action="append",
        default=[],
        help="the task serves the service's TARGET port on ACTUAL; repeatable",
    )
    add.add_argument("--name", metavar="NAME", help="its name (default: SERVICE.SLOT.ID)")
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


def add_body(args: argparse.Namespace) -> JsonObject:
    body: JsonObject = {"address": args.address}
    if args.port:
        body["ports"] = parse_port_map(args.port)
    if args.name is not None:
        body["name"] = args.name
    return body


def format_ports(ports: object) -> str:
    if not isinstance(ports, dict):
        return ""
    return ",".join(f"{target}->{actual}" for target, actual in ports.items())


def row(task: JsonObject) -> list[str]:
    return [
        short_id(text(task.get("id"))),
        text(task.get("name")),
        text(task.get("service")),
        text(task.get("node")),
        text(task.get("node_status")),
        text(task.get("address")),
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
        found = match_task(json_objects(ctx.client.get("/v1/tasks")), ref)
        if found is None:
            raise
        return found
    if not isinstance(task, dict):
        raise CliError(f"the agent answered task {ref!r} with something that is not an object")
    return task


def _add(ctx: Context, args: argparse.Namespace) -> int:
    task = ctx.client.post(api_path("/v1/services", args.service, "tasks"), add_body(args))
    ctx.emit_object(task, text(task.get("id")))
    return 0


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
    tasks = json_objects(ctx.client.get("/v1/tasks", query))
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
