"""`mesh`: the entry point (`mesh = mesh.cli.main:main`).

`mesh agent ...` is handed, untouched, to `mesh.agent.main`, imported only
then. Every other command is parsed here, run by its noun module against the
agent's HTTP API, and any failure ends as one line on stderr: `mesh: <reason>`,
exit status 1 (2 for a bad command line), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import sys
from collections.abc import Callable

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
from mesh.cli.client import DEFAULT_API, Client
from mesh.cli.commands import Handler
from mesh.cli.errors import CliError
from mesh.cli.output import Context

EPILOG = (
    "environment: MESH_API (the agent's HOST:PORT, default 127.0.0.1:2377), "
    "MESH_API_TOKEN (its bearer token)"
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
        return _run_agent(args[1:])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh", description="meshplane: the mesh client.", epilog=EPILOG
    )
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
        "http://HOST:PORT works too)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default,
        help="bearer token for the API (default: $MESH_API_TOKEN)",
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
    token = args.token or os.environ.get("MESH_API_TOKEN") or None
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    return Context(Client(api, token), bool(args.json), sys.stdout, width)


def _run_agent(argv: list[str]) -> int:
    """`mesh agent ...`: the agent parses its own flags and reports its own errors."""
    try:
        module = importlib.import_module("mesh.agent")
    except ImportError as exc:
        return _fail(f"the agent is not available: {exc}", 1)
    agent_main: Callable[[list[str]], int] = module.main
    return agent_main(argv)


def _fail(message: str, code: int) -> int:
    print(f"mesh: {message}", file=sys.stderr)
    return code
