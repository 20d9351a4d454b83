"""`mesh run --network NET [--alias A] -- CMD`: an ad-hoc sandbox on an attachable network.

Like `docker run --network NET`: CMD runs in a fresh network namespace with an
endpoint on NET, the network's DNS at 127.0.0.11 and its VIPs, and everything
goes when CMD exits. The sandbox belongs to a task, and a task to a service:
`mesh run` makes a temporary service `run-<8 hex>` on NET (with the alias, so
the sandbox is reachable by that name on NET), one sandboxed task of it, and
removes both when CMD exits, whatever ended it. Only attachable networks take
it (bridge networks are attachable unless created with `--attachable=false`).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets

from mesh.cli.client import api_path
from mesh.cli.commands import JsonObject, Subparsers, add_command, text
from mesh.cli.errors import ApiError, CliError, UsageError
from mesh.cli.inside import shielded
from mesh.cli.output import Context
from mesh.cli.task import run_in_new_task

PREFIX = "run"


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    run = add_command(
        subparsers,
        "run",
        _run,
        parents=parents,
        help="run a command in an ad-hoc sandbox on an attachable network (removed after)",
        epilog="usage: mesh run --network NET [--alias A] -- CMD [ARG...]",
    )
    run.add_argument("--network", metavar="NET", required=True, help="an attachable network")
    run.add_argument(
        "--alias", metavar="A", action="append", default=[], help="a DNS name on NET; repeatable"
    )
    run.set_defaults(takes_command=True)


def service_name() -> str:
    """`run-<8 hex>`: the temporary service's name."""
    return f"{PREFIX}-{secrets.token_hex(4)}"


def service_body(name: str, network: str, aliases: list[str]) -> JsonObject:
    body: JsonObject = {"name": name, "networks": [network]}
    if aliases:
        body["aliases"] = {network: list(aliases)}
    return body


def check_attachable(network: JsonObject) -> None:
    """Refuse, on one line, a network that does not take ad-hoc sandboxes."""
    name = text(network.get("name"))
    if not network.get("attachable"):
        raise CliError(
            f"network {name} is not attachable: `mesh run` needs a network created with "
            "--attachable (bridge networks are, unless --attachable=false)"
        )


def _run(ctx: Context, args: argparse.Namespace) -> int:
    argv: list[str] = list(args.argv or [])
    if not argv:
        raise UsageError("no command given: mesh run --network NET [--alias A] -- CMD [ARG...]")
    network = ctx.client.get(api_path("/v1/networks", args.network))
    if not isinstance(network, dict):
        raise CliError(f"the agent answered network {args.network!r} with something odd")
    check_attachable(network)
    name = service_name()
    with shielded():  # a Ctrl-C between the two creates would leave the service behind
        ctx.client.post("/v1/services", service_body(name, args.network, args.alias))

    def remove_service() -> None:
        try:
            ctx.client.delete(api_path("/v1/services", name))
        except ApiError as exc:
            if exc.status != 404:
                raise

    try:
        return run_in_new_task(
            ctx, name, {"sandbox": {"netns": None}}, argv, detach=False, cleanup=remove_service
        )
    except BaseException:
        # The task was never made (refused, or the agent went away): the service goes alone.
        with shielded(), contextlib.suppress(CliError):
            remove_service()
        raise
