"""`mesh`'s client commands (the console script is `mesh.cli.entry:main`).

`mesh agent ...` is handed, untouched, to `mesh.agent.main` (`mesh.cli.entry` starts an agent
without importing this module). Every other command is parsed here, run by its noun module
against the agent's HTTP API, and any failure ends as one line on stderr: `mesh: <reason>`,
exit status 1 (2 for a bad command line), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from mesh import __version__
from mesh.cli import (
    doctor,
    events,
    inspection,
    keyring,
    lb,
    members,
    network,
    resolve,
    run,
    service,
    task,
)
from mesh.cli.client import DEFAULT_API, Client, ClientTls, read_token_file
from mesh.cli.commands import Handler
from mesh.cli.entry import run_agent
from mesh.cli.errors import CliError, UsageError
from mesh.cli.output import Context

EPILOG = (
    "environment: MESH_API (the agent's HOST:PORT or https://HOST:PORT, default "
    "127.0.0.1:2377), MESH_API_TOKEN (its bearer token) or MESH_API_TOKEN_FILE, "
    "MESH_CA_CERT, MESH_CLIENT_CERT and MESH_CLIENT_KEY (HTTPS)"
)
NOUNS = (
    network,
    service,
    task,
    run,
    members,
    resolve,
    keyring,
    lb,
    inspection,
    doctor,
    events,
)
#: the commands that run a command given after `--` (`mesh task run web -- CMD ...`)
TAKES_COMMAND = "takes_command"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["agent"]:
        return run_agent(args[1:])
    try:
        return _run(args)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except SystemExit as exc:  # argparse after --help or a usage error
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mesh task ls | head`
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug or an odd answer: still one line, as promised
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", 1)


def installed_version() -> str:
    """The installed distribution's version (a checkout without one: the package's own)."""
    try:
        return importlib.metadata.version("meshplane")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh", description="meshplane: the mesh client.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"mesh {installed_version()}")
    _add_global_options(parser, suppress=False)
    parents = [_global_parent()]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Listed for --help only: `mesh agent ...` never reaches this parser (see main).
    commands.add_parser(
        "agent", add_help=False, help="run the agent on this node (see: mesh agent --help)"
    )
    for noun in NOUNS:
        noun.register(commands, parents)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    A sub-command's copy defaults to SUPPRESS, so that leaving it out there
    keeps what was given before the sub-command instead of resetting it.
    """
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=default,
        help="the agent's API (default: $MESH_API, else 127.0.0.1:2377; "
        "http://HOST:PORT works too, https://HOST:PORT for an agent with --api-tls-cert)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default,
        help="bearer token for the API (default: $MESH_API_TOKEN); --token-file keeps it "
        "out of the process list",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default,
        help="file holding the bearer token alone (default: $MESH_API_TOKEN_FILE)",
    )
    parser.add_argument(
        "--ca-cert",
        metavar="FILE",
        default=default,
        help="PEM CA certificate to verify an https:// API with (default: $MESH_CA_CERT, "
        "else the system's CAs)",
    )
    parser.add_argument(
        "--cert",
        metavar="FILE",
        default=default,
        help="PEM client certificate for an agent that requires one (mTLS; default: "
        "$MESH_CLIENT_CERT)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=default,
        help="PEM private key of --cert (default: $MESH_CLIENT_KEY)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default or False,
        help="print JSON for scripts instead of a table",
    )


def _global_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    _add_global_options(parent, suppress=True)
    return parent


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The mesh part of a command line and the command after the first `--` (None: no `--`)."""
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def _run(argv: list[str]) -> int:
    parser = build_parser()
    own, command = split_command(argv)
    args, unknown = parser.parse_known_args(own)
    if args.command == "agent":
        parser.error("`agent` takes its own options: write them after it (mesh agent ...)")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if command is not None and not getattr(args, TAKES_COMMAND, False):
        parser.error(f"unrecognized arguments: -- {' '.join(command)}")
    args.argv = command or []
    handler: Handler = args.handler
    return handler(_context(args), args)


def _context(args: argparse.Namespace) -> Context:
    api = args.api or os.environ.get("MESH_API") or DEFAULT_API
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    return Context(Client(api, _token(args), tls=_tls(args)), bool(args.json), sys.stdout, width)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, --token-file, $MESH_API_TOKEN, $MESH_API_TOKEN_FILE."""
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token:
        return str(args.token)
    if args.token_file:
        return read_token_file(Path(args.token_file))
    if os.environ.get("MESH_API_TOKEN"):
        return os.environ["MESH_API_TOKEN"]
    if os.environ.get("MESH_API_TOKEN_FILE"):
        return read_token_file(Path(os.environ["MESH_API_TOKEN_FILE"]), "MESH_API_TOKEN_FILE")
    return None


def _tls(args: argparse.Namespace) -> ClientTls:
    def path(flag: str | None, env: str) -> Path | None:
        chosen = flag or os.environ.get(env)
        return Path(chosen) if chosen else None

    return ClientTls(
        ca_cert=path(args.ca_cert, "MESH_CA_CERT"),
        cert=path(args.cert, "MESH_CLIENT_CERT"),
        key=path(args.key, "MESH_CLIENT_KEY"),
    )


def _fail(message: str, code: int) -> int:
    print(f"mesh: {message}", file=sys.stderr)
    return code
