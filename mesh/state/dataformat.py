"""The data dir's format version, and the migrations from one version to the next.

The file `<data-dir>/format-version` holds one number: the layout of everything the
agent keeps there (`state.db`'s schema, the keyring, the lock file). The agent
checks it at start, under the data dir's lock and before it reads anything:

- no state and no file (a new data dir): the current version is written;
- state but no file: a data dir of an agent older than versioning, version 0;
- an older version: the migrations run one step at a time, each followed by the
  file naming the version it reached (written whole: temp file, fsync, rename,
  fsync of the dir), so a crash between steps resumes at the next one. A step must
  therefore be safe to run again on a dir it half changed;
- a newer version: the agent refuses to start, naming both versions: an older
  agent would not know what the newer one wrote (a downgrade is a restore).

Version 1 is the layout of the first versioned agent, which is the one the
unversioned agents wrote: the step 0 -> 1 only marks the dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "format-version"
CURRENT_FORMAT = 1
#: what a dir that holds no state yet may contain (the lock is taken before the check)
NOT_STATE = frozenset({"agent.lock", "feed.sock", f".{FORMAT_NAME}.tmp"})


class FormatError(Exception):
    """A data dir this agent cannot use: newer than it, or its version unreadable."""


@dataclass(frozen=True, slots=True)
class Migration:
    """The step from `source` to `source + 1`."""

    source: int
    what: str
    apply: Callable[[Path], None]


def _mark_unversioned(data_dir: Path) -> None:
    """0 -> 1: the unversioned layout is version 1's; nothing to change."""


MIGRATIONS: Mapping[int, Migration] = {
    0: Migration(0, "mark the unversioned layout as version 1", _mark_unversioned),
}


def plan(found: int, current: int, migrations: Mapping[int, Migration]) -> list[Migration]:
    """The steps from `found` to `current` (pure: no file is touched)."""
    if found > current:
        raise FormatError(
            f"data dir format version {found} is newer than this agent's version {current}: "
            "it was written by a newer meshplane; run that version (or newer), or restore "
            "a backup made before the upgrade"
        )
    steps = []
    for version in range(found, current):
        step = migrations.get(version)
        if step is None:
            raise FormatError(f"no migration from data dir format version {version}")
        steps.append(step)
    return steps


def parse(text: str, path: Path) -> int:
    try:
        version = int(text.strip())
    except ValueError:
        raise FormatError(
            f"{path} holds {text.strip()[:40]!r}, not a format version number"
        ) from None
    if version < 0:
        raise FormatError(f"{path} holds {version}, not a format version")
    return version


def read(data_dir: Path) -> int | None:
    """The dir's version; None for a dir holding no state yet."""
    path = data_dir / FORMAT_NAME
    try:
        return parse(path.read_text(errors="replace"), path)
    except FileNotFoundError:
        pass
    try:
        names = {entry.name for entry in data_dir.iterdir()}
    except FileNotFoundError:
        return None
    return 0 if names - NOT_STATE else None


def write(data_dir: Path, version: int) -> None:
    """Replace the version file whole (a crash leaves the old one or the new one)."""
    path = data_dir / FORMAT_NAME
    tmp = path.with_name(f".{FORMAT_NAME}.tmp")
    with tmp.open("w") as handle:
        handle.write(f"{version}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True, slots=True)
class Outcome:
    #: the version found (None: a new data dir)
    found: int | None
    version: int
    migrated: tuple[str, ...]


def ensure(
    data_dir: Path,
    current: int = CURRENT_FORMAT,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    on_step: Callable[[Migration], None] | None = None,
) -> Outcome:
    """Bring the data dir (locked by the caller) to `current`, or raise FormatError."""
    found = read(data_dir)
    if found is None:
        write(data_dir, current)
        return Outcome(None, current, ())
    done = []
    for step in plan(found, current, migrations):
        step.apply(data_dir)
        write(data_dir, step.source + 1)
        done.append(step.what)
        if on_step is not None:
            on_step(step)
    return Outcome(found, current, tuple(done))
