"""`mesh events`: follow `GET /v1/events` (server-sent events), a line per change.

The stream's `id:` is the change's number; after a dropped connection (the agent
restarted, the network blinked) the command reconnects with `Last-Event-ID` set to
the last number it printed, so the agent sends what was missed while it still keeps
it. When it no longer does (or it restarted and numbers afresh) it says `gap`, and
the command prints that the lists must be re-read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mesh.cli.commands import Subparsers, add_command
from mesh.cli.errors import CliError, Unreachable
from mesh.cli.output import Context

KINDS = ("network", "service", "task", "node")
#: seconds between reconnection attempts: doubled after each failure up to the last
RETRY_FIRST, RETRY_MOST = 0.5, 5.0
#: fields a readable line shows after the key, when the object has them
_DETAILS = ("service", "node", "address", "state", "health", "driver", "subnet", "endpoint_mode")


@dataclass(slots=True)
class Event:
    """One server-sent event: `event:`, `id:` and the joined `data:` lines."""

    kind: str = "message"
    id: str | None = None
    data: list[str] = field(default_factory=list)


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from a stream's lines (without their line ends), as the SSE spec reads
    them: a blank line ends an event; `:` lines are comments (keep-alives)."""
    current = Event()
    seen = False
    for line in lines:
        if not line:
            if seen:
                yield current
            current, seen = Event(), False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            current.kind, seen = value, True
        elif name == "data":
            current.data.append(value)
            seen = True
        elif name == "id" and "\0" not in value:
            current.id, seen = value, True


def readable(event: Event) -> str:
    """A change as one line: `#SEQ OP KIND KEY field=value...`."""
    if event.kind == "gap":
        return "-- gap: some changes are no longer kept (or the agent restarted); re-read the lists"
    try:
        data: dict[str, Any] = json.loads("\n".join(event.data))
    except ValueError:
        return f"#{event.id or '?'} {event.kind} (not JSON)"
    obj = data.get("object") or {}
    details = [
        f"{name}={obj[name]}"
        for name in _DETAILS
        if isinstance(obj, dict) and isinstance(obj.get(name), str | int) and obj.get(name) != ""
    ]
    head = [f"#{event.id or '?'}", str(data.get("op", "?")), event.kind, str(data.get("key", "?"))]
    return " ".join([*head, *details])


def as_json(event: Event) -> str:
    """A change as one JSON line for scripts: the data, with `id` and `event`."""
    try:
        data = json.loads("\n".join(event.data)) if event.data else {}
    except ValueError:
        data = {"data": "\n".join(event.data)}
    if not isinstance(data, dict):
        data = {"data": data}
    seq = int(event.id) if event.id and event.id.isdigit() else event.id
    return json.dumps({"id": seq, "event": event.kind, **data}, separators=(",", ":"))


Opener = Callable[[str | None], Iterable[str]]


def follow(
    open_stream: Opener,
    emit: Callable[[Event], None],
    *,
    since: str | None = None,
    kinds: frozenset[str] = frozenset(),
    notice: Callable[[str], None] = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
    attempts: int | None = None,
) -> None:
    """Print the stream's events (those of `kinds`, or all) until interrupted,
    reconnecting from the last id seen. `open_stream(last_id)` gives the lines of one
    connection (it raises `Unreachable` when it cannot connect); `attempts` bounds the
    connections made (tests), None: forever. The first connection's failure is an error."""
    last = since
    made = 0
    connected_once = False
    delay = RETRY_FIRST
    while attempts is None or made < attempts:
        made += 1
        try:
            lines = open_stream(last)
            connected_once = True
            for event in parse_sse(lines):
                if event.id is not None:
                    last = event.id
                if event.kind == "gap" or not kinds or event.kind in kinds:
                    emit(event)
                delay = RETRY_FIRST
        except (Unreachable, OSError) as exc:
            if not connected_once:
                raise
            notice(f"mesh events: {exc}; retrying in {delay:g} s")
        else:
            notice(f"mesh events: the stream ended; reconnecting from #{last or 'now'}")
        if attempts is not None and made >= attempts:
            return
        sleep(delay)
        delay = min(RETRY_MOST, delay * 2)


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        "events",
        _events,
        parents=parents,
        help="follow the change stream: a line per change (reconnects and resumes)",
    )
    parser.add_argument(
        "--since",
        metavar="V",
        help="start after change number V (the changes the agent still keeps); default: now",
    )
    parser.add_argument(
        "--type",
        action="append",
        choices=KINDS,
        default=[],
        help="only changes of this kind; repeat for several",
    )


def _events(ctx: Context, args: argparse.Namespace) -> int:
    since: str | None = args.since
    if since is not None and not (since.isascii() and since.isdigit()):
        raise CliError(f"--since {since!r}: a change number (0 or more)")

    def emit(event: Event) -> None:
        ctx.out.write((as_json(event) if ctx.json else readable(event)) + "\n")
        ctx.out.flush()

    def notice(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    follow(
        lambda last: ctx.client.stream("/v1/events", last_event_id=last),
        emit,
        since=since,
        kinds=frozenset(args.type),
        notice=notice,
    )
    return 0
