"""A worker process's arguments: one JSON object on its command line.

The agent starts its workers (`python -m dns.worker`, `python -m lb.http.worker`) and is
the only writer of their command lines, so a worker takes one JSON object (a dataclass
of its own, `worker_command` / `read_worker_args`) rather than flags. `argparse`, with
what its first parser loads (gettext; shutil with bz2 and lzma, for the terminal's
width), was ~1.1 MB of a worker's resident memory (docs/performance.md); json is
loaded by every worker anyway.

A bad document (not one JSON object, an unknown or missing field, a value of the
wrong type) is a `WorkerArgsError` that says which; the worker prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerArgsError(ValueError):
    """A worker's command line that is not its arguments' JSON object."""


def worker_command(module: str, args: Any) -> list[str]:
    """The command line that starts worker `module` with `args` (its dataclass)."""
    return [sys.executable, "-m", module, json.dumps(dataclasses.asdict(args))]


def read_worker_args(kind: type[T], argv: list[str]) -> T:
    """`kind` (a dataclass) from a worker's command line: one JSON object of its fields."""
    names = [field.name for field in dataclasses.fields(kind)]  # type: ignore[arg-type]
    if len(argv) != 1:
        raise WorkerArgsError(f"expected one argument, a JSON object of {names}")
    try:
        document = json.loads(argv[0])
    except ValueError as error:
        raise WorkerArgsError(f"the argument is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise WorkerArgsError(f"expected a JSON object of {names}")
    unknown = sorted(set(document) - set(names))
    if unknown:
        raise WorkerArgsError(f"unknown field(s) {unknown}; the fields are {names}")
    hints = typing.get_type_hints(kind)
    for name, value in document.items():
        if not _fits(value, hints[name]):
            raise WorkerArgsError(f"{name}: {value!r} is not a {hints[name]}")
    try:
        return kind(**document)
    except TypeError as error:  # a required field missing
        raise WorkerArgsError(str(error)) from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of `hint`: str, int, bool, float, `X | None`,
    `list[X]`, `dict[str, Any]` (the types a worker's arguments use)."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is int:  # JSON's true is not a port number
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
