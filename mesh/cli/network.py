"""`mesh network create | ls | inspect | rm`."""

from __future__ import annotations

import argparse

from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.output import Context
from mesh.cli.spec import parse_labels
from mesh.cli.table import short_id

HEADERS = ("ID", "NAME", "DRIVER", "SUBNET", "GATEWAY")


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    nouns = add_noun(subparsers, "network", parents=parents, help="manage networks")
    create = add_command(nouns, "create", _create, parents=parents, help="create a network")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--subnet",
        metavar="CIDR",
        help="its subnet (default: the next free /24 of the address pool)",
    )
    create.add_argument("--driver", metavar="D", help="its driver (default: overlay)")
    create.add_argument(
        "--label", metavar="K=V", action="append", default=[], help="a label; repeatable"
    )
    add_command(nouns, "ls", _ls, parents=parents, help="list networks", aliases=("list",))
    for name, handler, help in (
        ("inspect", _inspect, "show a network as JSON"),
        ("rm", _rm, "remove a network"),
    ):
        command = add_command(nouns, name, handler, parents=parents, help=help)
        command.add_argument("name", metavar="NAME")


def row(network: JsonObject) -> list[str]:
    return [
        short_id(text(network.get("id"))),
        text(network.get("name")),
        text(network.get("driver")),
        text(network.get("subnet")),
        text(network.get("gateway")),
    ]


def _create(ctx: Context, args: argparse.Namespace) -> int:
    body: JsonObject = {"name": args.name}
    if args.subnet is not None:
        body["subnet"] = args.subnet
    if args.driver is not None:
        body["driver"] = args.driver
    if args.label:
        body["labels"] = parse_labels(args.label)
    network = ctx.client.post("/v1/networks", body)
    ctx.emit_object(network, text(network.get("id")))
    return 0


def _ls(ctx: Context, args: argparse.Namespace) -> int:
    networks = json_objects(ctx.client.get("/v1/networks"))
    if ctx.json:
        ctx.emit_json(networks)
    else:
        ctx.emit_table(HEADERS, [row(n) for n in networks])
    return 0


def _inspect(ctx: Context, args: argparse.Namespace) -> int:
    ctx.emit_json(ctx.client.get(api_path("/v1/networks", args.name)))
    return 0


def _rm(ctx: Context, args: argparse.Namespace) -> int:
    ctx.client.delete(api_path("/v1/networks", args.name))
    if not ctx.json:
        ctx.emit_line(args.name)
    return 0
