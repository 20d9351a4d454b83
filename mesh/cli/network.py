"""`mesh network create | ls | inspect | rm`.

A network's driver says what it is in the kernel: `bridge` a Linux bridge on the
node that created it (scope local), `overlay` the cluster's VIP network (scope
swarm), `macvlan` endpoints on a physical LAN through a parent interface (scope
swarm; --opt parent=IFACE). `ls` shows driver, scope and whether the
network is internal (no route out).
"""

from __future__ import annotations

import argparse

from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.output import Context
from mesh.cli.spec import parse_assignments, parse_bool, parse_labels
from mesh.cli.table import short_id

HEADERS = ("ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "GATEWAY", "INTERNAL")
DRIVERS = ("overlay", "bridge", "macvlan")


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    nouns = add_noun(subparsers, "network", parents=parents, help="manage networks")
    create = add_command(nouns, "create", _create, parents=parents, help="create a network")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--subnet",
        metavar="CIDR",
        help="its subnet (default: the next free /24 of the address pool)",
    )
    create.add_argument(
        "--driver",
        choices=DRIVERS,
        help="overlay (the default: the cluster's), bridge (a Linux bridge on this node; "
        "needs root) or macvlan",
    )
    create.add_argument(
        "--gateway", metavar="IP", help="the gateway (default: the subnet's first host address)"
    )
    create.add_argument(
        "--ip-range", metavar="CIDR", help="where sandbox addresses come from, inside the subnet"
    )
    create.add_argument(
        "--aux-address",
        metavar="NAME=IP",
        action="append",
        default=[],
        help="an address never handed out; repeatable",
    )
    create.add_argument(
        "--internal", action="store_true", help="no route out of the network (no masquerade)"
    )
    create.add_argument(
        "--attachable",
        metavar="BOOL",
        nargs="?",
        const="true",
        help="ad-hoc sandboxes (`mesh run`) may join (bridge networks: true unless "
        "--attachable=false)",
    )
    create.add_argument(
        "--opt",
        metavar="K=V",
        action="append",
        default=[],
        help="a driver option, e.g. icc=false (bridge), parent=eth0 (macvlan), encrypted "
        "(overlay: IPsec ESP between nodes, keys from the gossip keyring); repeatable",
    )
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
        text(network.get("scope") or "swarm"),
        text(network.get("subnet")),
        text(network.get("gateway")),
        "yes" if network.get("internal") else "no",
    ]


def create_body(args: argparse.Namespace) -> JsonObject:
    """The POST body; parses every flag before anything is sent."""
    body: JsonObject = {"name": args.name}
    if args.subnet is not None:
        body["subnet"] = args.subnet
    if args.driver is not None:
        body["driver"] = args.driver
    if args.gateway is not None:
        body["gateway"] = args.gateway
    if args.ip_range is not None:
        body["ip_range"] = args.ip_range
    if args.aux_address:
        body["aux_addresses"] = parse_assignments(args.aux_address, "--aux-address")
    if args.internal:
        body["internal"] = True
    if args.attachable is not None:
        body["attachable"] = parse_bool(args.attachable, "--attachable")
    if args.opt:
        # `--opt encrypted` alone is Docker's form of `encrypted=true`
        opts = ["encrypted=true" if o.strip() == "encrypted" else o for o in args.opt]
        body["options"] = parse_assignments(opts, "--opt")
    if args.label:
        body["labels"] = parse_labels(args.label)
    return body


def _create(ctx: Context, args: argparse.Namespace) -> int:
    network = ctx.client.post("/v1/networks", create_body(args))
    ctx.emit_object(network, text(network.get("id")))
    return 0


def _ls(ctx: Context, args: argparse.Namespace) -> int:
    networks = json_objects(ctx.client.get_all("/v1/networks"))
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
