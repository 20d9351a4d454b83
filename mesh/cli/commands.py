"""The plumbing every noun module shares: how a command is declared and run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeAlias

from mesh.cli.output import Context

Handler = Callable[[Context, argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

JsonObject = dict[str, Any]


def add_command(
    subparsers: Subparsers,
    name: str,
    handler: Handler,
    *,
    parents: list[argparse.ArgumentParser],
    help: str,
    aliases: tuple[str, ...] = (),
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A leaf command that runs `handler`; the global options are accepted after it too.

    An epilog is printed as written: it holds the grammars of flag values.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=help,
        parents=parents,
        aliases=list(aliases),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_noun(
    subparsers: Subparsers, name: str, *, parents: list[argparse.ArgumentParser], help: str
) -> Subparsers:
    """A command group (`mesh network ...`) whose sub-commands are required."""
    parser = subparsers.add_parser(name, help=help, description=help, parents=parents)
    group: Subparsers = parser.add_subparsers(
        dest=f"{name}_command", metavar="COMMAND", required=True
    )
    return group


def json_objects(value: Any) -> list[JsonObject]:
    """A list answer, keeping only its objects (a list endpoint answers a bare array)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def text(value: Any) -> str:
    """A table cell for any JSON value: empty for null."""
    return "" if value is None else str(value)
