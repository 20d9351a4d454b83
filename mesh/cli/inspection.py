"""`mesh inspect dns|gossip|lb`: the data plane of this node as it is, for troubleshooting.

`dns` lists every record the embedded DNS answers an asker on a network (or on
the host), the way `dig` would find them one by one; `gossip` shows the
members with their incarnations and the state digests the peers announced
(equal digests: equal tables) and the suspicion timers of suspected ones;
`lb` (also `mesh lb`) shows the L4 table as programmed, like `ipvsadm -Ln`.
"""

from __future__ import annotations

import argparse

from mesh.cli.commands import JsonObject, Subparsers, add_command, add_noun, json_objects, text
from mesh.cli.errors import CliError
from mesh.cli.lb import show_lb
from mesh.cli.members import row as member_row
from mesh.cli.output import Context


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    views = add_noun(
        subparsers,
        "inspect",
        parents=parents,
        help="the data plane of this node: DNS records, gossip state",
    )
    dns = add_command(
        views,
        "dns",
        _dns,
        parents=parents,
        help="every record the embedded DNS answers an asker on a network",
    )
    dns.add_argument(
        "--network",
        metavar="NET",
        help="as a task on this network sees it (default: the host, every network)",
    )
    add_command(
        views,
        "gossip",
        _gossip,
        parents=parents,
        help="members, incarnations, suspicion timers, whether the tables agree",
    )
    add_command(
        views,
        "lb",
        show_lb,
        parents=parents,
        help="the L4 table as this node's backend has it programmed (= mesh lb)",
    )


def _dns(ctx: Context, args: argparse.Namespace) -> int:
    query = {} if args.network is None else {"network": args.network}
    answer = ctx.client.get("/v1/dns", query=query)
    if not isinstance(answer, dict):
        raise CliError("the agent answered something other than a record list")
    if ctx.json:
        ctx.emit_json(answer)
        return 0
    records = json_objects(answer.get("records"))
    ctx.emit_table(
        ("NAME", "TYPE", "VALUE"),
        [[text(r.get("name")), text(r.get("type")), text(r.get("value"))] for r in records],
    )
    return 0


def _gossip(ctx: Context, args: argparse.Namespace) -> int:
    stats = ctx.client.get("/v1/gossip")
    members = sorted(
        json_objects(ctx.client.get_all("/v1/members")), key=lambda m: text(m.get("name"))
    )
    if not isinstance(stats, dict):
        raise CliError("the agent answered something other than gossip counters")
    if ctx.json:
        ctx.emit_json({"gossip": stats, "members": members})
        return 0
    state: JsonObject = stats.get("state") or {}
    ctx.emit_line(
        f"node {text(stats.get('node'))}  incarnation {text(stats.get('incarnation'))}"
        f"  health score {text(stats.get('health_score'))}"
        f"  late by {text(stats.get('lateness'))} s  "
        f"encrypted {text(stats.get('encrypted'))}"
    )
    ctx.emit_line(
        f"state digest {text(state.get('digest'))} over {text(state.get('records'))} records"
    )
    digests = {text(p.get("node")): p for p in json_objects(state.get("peers"))}
    rows = []
    for member in members:
        peer = digests.get(text(member.get("name")))
        if text(member.get("name")) == text(stats.get("node")):
            agree = "(this node)"
        elif peer is None:
            agree = "no digest yet"
        else:
            same = peer.get("digest") == state.get("digest")
            agree = f"{'same' if same else 'DIFFERS'} ({text(peer.get('age'))} s ago)"
        suspicion = member.get("suspicion")
        timer = (
            f"dead in {text(suspicion.get('dead_in'))} s, "
            f"{text(suspicion.get('confirmations'))} confirmations"
            if isinstance(suspicion, dict)
            else ""
        )
        late = member.get("late_by")
        rows.append(
            [*member_row(member), agree, timer, f"{text(late)} s" if late is not None else ""]
        )
    ctx.emit_table(
        ("NAME", "ADDRESS", "STATUS", "INCARNATION", "TABLES", "SUSPICION", "ANSWERS LATE BY"), rows
    )
    drops = stats.get("drops") or {}
    if drops:
        ctx.emit_line("dropped packets: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    return 0
