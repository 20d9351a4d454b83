"""`mesh doctor`: check this node's gossip, API, DNS, L4 table and tasks; say what is wrong.

Exit status 0 when every check passed (skipped ones included), 1 when any
failed, 1 as well when the agent's API does not answer (the first thing
checked: nothing else can be).
"""

from __future__ import annotations

import argparse

from mesh.cli.commands import Subparsers, add_command
from mesh.cli.errors import CliError, Unreachable
from mesh.cli.output import Context
from mesh.doctor.checks import Finding, check_all, summary
from mesh.doctor.probes import DIGEST_SETTLE, gather

MARK = {"ok": "ok  ", "fail": "FAIL", "skip": "skip"}


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        "doctor",
        _doctor,
        parents=parents,
        help="check ports, DNS, the LB table, tasks and gossip peers of this node",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DIGEST_SETTLE,
        metavar="SECONDS",
        help="how long a peer whose tables differ is given to converge "
        f"(default {DIGEST_SETTLE:g})",
    )
    parser.add_argument("--quiet", action="store_true", help="print failures only")


def _doctor(ctx: Context, args: argparse.Namespace) -> int:
    if not 0 <= args.settle <= 120:
        raise CliError("--settle: 0 to 120 seconds")
    try:
        findings = check_all(gather(ctx.client, settle=args.settle))
    except Unreachable as exc:
        findings = [
            Finding(
                "api",
                "fail",
                f"the agent's API does not answer: {exc}",
                "is `mesh agent` running on this node? Is MESH_API (or --api) its --api address?",
            )
        ]
    else:
        findings.insert(0, Finding("api", "ok", "the agent's API answers"))
    ok, failed, skipped = summary(findings)
    if ctx.json:
        ctx.emit_json({"ok": failed == 0, "findings": [f.to_json() for f in findings]})
        return 1 if failed else 0
    for finding in findings:
        if args.quiet and finding.status != "fail":
            continue
        ctx.emit_line(f"{MARK[finding.status]}  {finding.check:<7} {finding.message}")
        if finding.hint and finding.status == "fail":
            ctx.emit_line(f"{'':13} hint: {finding.hint}")
    ctx.emit_line(f"{ok} ok, {failed} failed, {skipped} skipped")
    return 1 if failed else 0
