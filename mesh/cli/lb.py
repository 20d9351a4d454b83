"""`mesh lb`: the L4 table this node's backend has programmed, as `ipvsadm -Ln` prints it."""

from __future__ import annotations

import argparse

from lb.table import Real, Scheduler, ServiceOptions, Table, VirtualKey, VirtualService, describe
from mesh.cli.commands import JsonObject, Subparsers, add_command
from mesh.cli.errors import CliError
from mesh.cli.output import Context


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    add_command(
        subparsers,
        "lb",
        show_lb,
        parents=parents,
        help="the L4 load-balancer table of this node (like ipvsadm -Ln)",
    )


def table_of(answer: JsonObject) -> Table:
    """The answer of GET /v1/lb as an `lb.table` Table."""
    table: Table = {}
    try:
        for entry in answer.get("services", []):
            key = VirtualKey(entry["protocol"], entry["address"], int(entry["port"]))
            options = ServiceOptions(
                Scheduler(entry["scheduler"]),
                bool(entry["proxy_protocol"]),
                int(entry.get("affinity", 0)),
                local=entry.get("traffic_policy", "cluster") == "local",
            )
            reals = {Real(r["address"], int(r["port"])): int(r["weight"]) for r in entry["reals"]}
            table[key] = VirtualService(key, options, reals)
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"the agent answered an L4 table this client cannot read: {exc}") from None
    return table


def show_lb(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.client.get("/v1/lb")
    if not isinstance(answer, dict):
        raise CliError("the agent answered something other than an L4 table")
    if ctx.json:
        ctx.emit_json(answer)
        return 0
    ctx.emit_line(
        f"backend {answer.get('backend')} ({answer.get('reason')}); errors {answer.get('errors')}"
    )
    ctx.emit_line("Prot LocalAddress:Port Scheduler Flags")
    ctx.emit_line("  -> RemoteAddress:Port  Weight")
    for line in describe(table_of(answer)):
        ctx.emit_line(line)
    unbound = answer.get("unbound")
    if isinstance(unbound, dict):
        for key, reason in sorted(unbound.items()):
            ctx.emit_line(f"not programmed: {key}: {reason}")
    return 0
