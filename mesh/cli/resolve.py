"""`mesh resolve NAME [--network NET] [--type T]`: what the embedded DNS answers."""

from __future__ import annotations

import argparse

from mesh.cli.commands import JsonObject, Subparsers, add_command, text
from mesh.cli.output import Context

HEADERS = ("NAME", "TYPE", "TTL", "DATA")


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        "resolve",
        _resolve,
        parents=parents,
        help="what the embedded DNS answers an asker on a network",
    )
    parser.add_argument("name", metavar="NAME", help="e.g. web, tasks.web, _80._tcp.web")
    parser.add_argument(
        "--network",
        metavar="NET",
        help="ask as a task on this network would (default: the host, which sees every network)",
    )
    parser.add_argument(
        "--type",
        metavar="TYPE",
        default="A",
        help="record type: A, SRV, PTR, AAAA, ... (default A)",
    )


def rows(answer: JsonObject) -> list[list[str]]:
    return [
        [text(r.get("name")), text(r.get("type")), text(r.get("ttl")), text(r.get("data"))]
        for r in [*answer.get("answers", []), *answer.get("additional", [])]
    ]


def _resolve(ctx: Context, args: argparse.Namespace) -> int:
    query = {"name": args.name, "type": args.type}
    if args.network:
        query["network"] = args.network
    answer = ctx.client.get("/v1/resolve", query)
    if ctx.json:
        ctx.emit_json(answer)
        return 0
    via = "forwarded upstream" if answer.get("forwarded") else "mesh"
    ctx.emit_line(
        f"{text(answer.get('rcode'))} ({via}, asked from "
        f"{text(answer.get('network') or 'the host')})"
    )
    found = rows(answer)
    if found:
        ctx.emit_table(HEADERS, found)
    return 0 if answer.get("rcode") == "NOERROR" else 1
