"""`mesh keygen`, `mesh join-token` and `mesh keyring list | install | use | remove KEY`.

`mesh join-token` reads the agent's data dir, not its API: the keys are a
secret the API never shows (only fingerprints), and whoever may read the data
dir (root, or the agent's user) may read them already.

Rotation, as with Serf and Consul: `install` the new key (every node can then
open it), `use` it (every node seals with it), `remove` the old one. A KEY of
`-` is read from standard input, which keeps it out of the shell's history
and the process list.
"""

from __future__ import annotations

import argparse
import sys

from mesh.cli.commands import (
    Handler,
    JsonObject,
    Subparsers,
    add_command,
    add_noun,
    json_objects,
    text,
)
from mesh.cli.errors import CliError, UsageError
from mesh.cli.output import Context

HEADERS = ("FINGERPRINT", "PRIMARY")

#: (sub-command, HTTP method, path, help) of the commands that change the keyring
_CHANGES = (
    ("install", "POST", "/v1/keyring", "install a key on every node (it opens, not yet seals)"),
    ("use", "PUT", "/v1/keyring/primary", "make an installed key the one every node seals with"),
    ("remove", "POST", "/v1/keyring/remove", "remove a key from every node (not the primary)"),
)


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    add_command(
        subparsers,
        "keygen",
        _keygen,
        parents=parents,
        help="print a new gossip encryption key (base64, 32 bytes); needs no agent",
    )
    token = add_command(
        subparsers,
        "join-token",
        _join_token,
        parents=parents,
        help="print the token that joins a node to this node's cluster (its gossip keys "
        "and cluster label): mesh agent --join HOST --token TOKEN; read from the agent's "
        "data dir, needs no API",
    )
    token.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the agent's data dir (default /var/lib/meshplane, or ~/.local/state/meshplane "
        "without root)",
    )
    token.add_argument(
        "--keyring", metavar="FILE", help="the keyring file the agent runs with, if --keyring"
    )
    token.add_argument(
        "--cluster-label",
        metavar="LABEL",
        help="the cluster label (default: the one stored in the data dir)",
    )
    nouns = add_noun(
        subparsers,
        "keyring",
        parents=parents,
        help="manage the gossip encryption keys of the cluster",
    )
    add_command(
        nouns,
        "list",
        _list,
        parents=parents,
        aliases=("ls",),
        help="list the installed keys by fingerprint",
    )
    for name, method, path, help in _CHANGES:
        command = add_command(nouns, name, _changer(method, path), parents=parents, help=help)
        command.add_argument("key", metavar="KEY", help="the key, base64; - reads it from stdin")


def row(key: JsonObject) -> list[str]:
    return [text(key.get("fingerprint")), "yes" if key.get("primary") else ""]


def _keygen(ctx: Context, args: argparse.Namespace) -> int:
    # Imported here: only this command needs the cryptography stack at start-up.
    from gossip.security import keygen

    key = keygen()
    if ctx.json:
        ctx.emit_json({"key": key})
    else:
        ctx.emit_line(key)
    return 0


def _join_token(ctx: Context, args: argparse.Namespace) -> int:
    from pathlib import Path

    from mesh.config import default_data_dir, runs_privileged
    from mesh.gossip_keys import GossipKeysError, join_token

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(runs_privileged())
    try:
        token = join_token(
            data_dir, Path(args.keyring) if args.keyring else None, args.cluster_label
        )
    except (GossipKeysError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if ctx.json:
        ctx.emit_json({"token": token})
    else:
        ctx.emit_line(token)
    return 0


def _emit_keys(ctx: Context, keyring: object) -> None:
    keys = json_objects(keyring.get("keys") if isinstance(keyring, dict) else None)
    if ctx.json:
        ctx.emit_json(keys)  # a list command prints a bare array (docs/design.md)
    else:
        ctx.emit_table(HEADERS, [row(k) for k in keys])


def _list(ctx: Context, args: argparse.Namespace) -> int:
    _emit_keys(ctx, ctx.client.get("/v1/keyring"))
    return 0


def _changer(method: str, path: str) -> Handler:
    def change(ctx: Context, args: argparse.Namespace) -> int:
        keyring = ctx.client.request(method, path, body={"key": _read_key(args.key)})
        _emit_keys(ctx, keyring)
        return 0

    return change


def _read_key(given: str) -> str:
    key = sys.stdin.readline().strip() if given == "-" else given.strip()
    if not key:
        raise UsageError("no key given")
    return key
