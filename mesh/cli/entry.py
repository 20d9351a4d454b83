"""`mesh`, the console script (`mesh = mesh.cli.entry:main`): which half to import.

`mesh agent ...` is handed, untouched, to `mesh.agent.main`, without importing the client's
commands: their parsers, the HTTP client and the doctor's checks are ~3 MB that an agent
would hold for its whole life and never use. Every other command goes to `mesh.cli.main`,
which imports none of the agent.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["agent"]:
        return run_agent(args[1:])
    from mesh.cli.main import main as client_main

    return client_main(args)


def run_agent(argv: list[str]) -> int:
    """`mesh agent ...`: the agent parses its own flags and reports its own errors."""
    try:
        module = importlib.import_module("mesh.agent")
    except ImportError as exc:
        print(f"mesh: the agent is not available: {exc}", file=sys.stderr)
        return 1
    agent_main: Callable[[list[str]], int] = module.main
    return agent_main(argv)
