"""`mesh members`: the cluster as the local agent sees it."""

from __future__ import annotations

import argparse

from mesh.cli.commands import JsonObject, Subparsers, add_command, json_objects, text
from mesh.cli.output import Context

HEADERS = ("NAME", "ADDRESS", "STATUS", "INCARNATION")


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    add_command(
        subparsers,
        "members",
        _members,
        parents=parents,
        help="list the cluster's nodes: status, address, incarnation",
    )


def row(member: JsonObject) -> list[str]:
    address, port = text(member.get("address")), member.get("port")
    if port is not None:
        address = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return [
        text(member.get("name")),
        address,
        text(member.get("status")),
        text(member.get("incarnation")),
    ]


def _members(ctx: Context, args: argparse.Namespace) -> int:
    members = sorted(
        json_objects(ctx.client.get_all("/v1/members")), key=lambda m: text(m.get("name"))
    )
    if ctx.json:
        ctx.emit_json(members)
    else:
        ctx.emit_table(HEADERS, [row(m) for m in members])
    return 0
