"""What a command needs besides its arguments: the API client and where and how to print."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mesh.cli import table
from mesh.cli.client import Client


@dataclass(frozen=True, slots=True)
class Context:
    client: Client
    json: bool  # --json: print the API's objects as they are, for scripts
    out: TextIO
    width: int | None = None  # the terminal's width; None when piped (never cut)

    def emit_json(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")

    def emit_table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.out.write(table.render(headers, rows, self.width) + "\n")

    def emit_line(self, text: str) -> None:
        self.out.write(text + "\n")

    def warn(self, text: str) -> None:
        """On stderr, so that what a script reads on stdout stays the same."""
        print(f"mesh: warning: {text}", file=sys.stderr)

    def emit_object(self, obj: Any, line: str) -> None:
        """A created or changed object: the whole of it with --json, else one line (its id)."""
        if self.json:
            self.emit_json(obj)
        else:
            self.emit_line(line)
