"""Durable state in `--data-dir`: SQLite in WAL mode, written by one thread with group commit.

Why SQLite rather than a hand-made log plus snapshots: a transaction gives a
change of several records (a service and its tasks) all or nothing; WAL with
`synchronous=FULL` makes a commit durable once `commit()` returns and survives
kill -9 and power loss at any instant, with recovery done by SQLite on open;
the log is checkpointed into the database by SQLite itself, which is the
compaction we would otherwise write; and an operator can read the state with
the `sqlite3` shell. The cost of one fsync per commit is shared: the writer
thread takes every batch queued while the previous commit ran and commits them
in one transaction, so a burst of 1,000 registrations costs a few dozen fsyncs.

Batches are committed in the order they were submitted, which is the order
the store applied them, so the database always holds a prefix of the store's
history.

A `state.db` that exists always holds the schema: a fresh one is made under
another name and renamed into place. So a `state.db` without it (a 0-byte
file, say, from a truncation or a bad copy) is damage, refused like any other
corruption, never silently taken for an empty state; and a write-ahead log
left without its database is refused too, rather than replayed onto a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.core.codec import record_from_dict, record_json
from mesh.core.model import KIND_OF, Record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "state.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
"""


class PersistError(Exception):
    """The data dir could not be read or written."""


@dataclass(frozen=True, slots=True)
class Loaded:
    records: list[Record]
    clock: int
    meta: dict[str, str]
    skipped: int  # rows that no longer decode (counted and logged, never fatal)


@dataclass(slots=True)
class _Batch:
    records: Sequence[Record]
    clock: int
    done: asyncio.Future[None] | None = None
    meta: dict[str, str] = field(default_factory=dict)
    forget: Sequence[tuple[str, str]] = ()  # (kind, key) rows to delete: reaped tombstones


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


def load(data_dir: Path) -> Loaded:
    """Read the state that the last run made durable (an empty state if there is none)."""
    path = data_dir / DB_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_or_create(path)
        conn = _connect(path)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute("SELECT kind, key, body FROM records").fetchall()
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise PersistError(f"cannot read state in {path}: {exc}") from exc
    records: list[Record] = []
    skipped = 0
    for kind, key, body in rows:
        try:
            records.append(record_from_dict(json.loads(body)))
        except (ValueError, KeyError, TypeError) as exc:
            skipped += 1
            log.error("event=state_row_skipped kind=%s key=%s error=%r", kind, key, exc)
    return Loaded(records, int(meta.get("clock", "0")), meta, skipped)


def _check_or_create(path: Path) -> None:
    """Refuse a database without the schema, before anything is written to it; make
    a missing one whole, schema included, so that this holds on every later start."""
    wal = path.with_name(path.name + "-wal")
    if not path.exists():
        if wal.exists() and wal.stat().st_size > 0:
            raise PersistError(
                f"cannot read state in {path}: the file is missing but its write-ahead log "
                f"{wal.name} is there; restore {path.name}, or move {wal.name} away to "
                "start with an empty state"
            )
        _create(path)
        return
    size = path.stat().st_size
    # Read only: a schema-less file must be left exactly as it was found. (A 0-byte
    # file whose committed pages are all still in its WAL is read from the WAL here.)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    finally:
        conn.close()
    if {"meta", "records"} <= tables:
        return
    what = (
        "the file is empty (0 bytes)"
        if size == 0 and not tables
        else "the file is not a meshplane state database (no meta and records tables)"
    )
    raise PersistError(
        f"cannot read state in {path}: {what}; restore it, or move it away "
        "to start with an empty state"
    )


def _create(path: Path) -> None:
    """A new, empty database with the schema, appearing at `path` only once whole."""
    new = path.with_name(path.name + ".new")
    for leftover in (new, new.with_name(new.name + "-journal")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(new, isolation_level=None)  # rollback journal: one file once done
    try:
        conn.executescript(_SCHEMA)
    finally:
        conn.close()
    fd = os.open(new, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(new, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)


class StateWriter:
    """Commits record versions from a dedicated thread; `write` resolves once durable."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / DB_NAME
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        self._schema_written = False
        self.commits = 0
        self.batches = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        conn = _connect(self._path)  # open here so a bad data dir fails the start
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="state-writer", daemon=True
        )
        self._thread.start()

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def write(
        self,
        records: Iterable[Record],
        clock: int,
        meta: dict[str, str] | None = None,
        forget: Sequence[tuple[str, str]] = (),
    ) -> asyncio.Future[None]:
        """Queue record versions (and rows to forget); the future completes once on disk."""
        assert self._loop is not None, "start() first"
        done: asyncio.Future[None] = self._loop.create_future()
        if self._failed is not None:
            done.set_exception(PersistError(f"state writer failed: {self._failed}"))
            return done
        self._queue.put(_Batch(list(records), clock, done, meta or {}, list(forget)))
        return done

    def close(self) -> None:
        """Finish every queued batch, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                batch = self._queue.get()
                if batch is None:
                    return
                group = [batch]
                stop = False
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    group.append(more)
                self._commit(conn, group)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list[_Batch]) -> None:
        error: BaseException | None = self._failed
        if error is not None:
            # Never commit past a failed batch: the database must stay a prefix
            # of the store's history.
            for batch in group:
                if batch.done is not None:
                    self._settle(batch.done, error)
            return
        try:
            # Only the statements a batch needs: a registration's commit is its record and
            # the clock (each statement is a few µs of the writer's CPU, on the one the
            # loop shares with it when the agent is pinned).
            conn.execute("BEGIN IMMEDIATE")
            for batch in group:
                if batch.records:
                    conn.executemany(
                        "INSERT OR REPLACE INTO records (kind, key, body) VALUES (?, ?, ?)",
                        [(KIND_OF[type(r)].value, r.key, record_json(r)) for r in batch.records],
                    )
                if batch.meta:
                    conn.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        list(batch.meta.items()),
                    )
                if batch.forget:
                    conn.executemany(
                        "DELETE FROM records WHERE kind = ? AND key = ?", list(batch.forget)
                    )
            clock = max(b.clock for b in group)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)", (str(clock),)
            )
            if not self._schema_written:  # once a run: it does not change while it runs
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
            conn.execute("COMMIT")
            self._schema_written = True
            self.commits += 1
            self.batches += len(group)
        except (sqlite3.Error, OSError) as exc:
            error = exc
            self._failed = exc
            log.critical("event=state_write_failed error=%r path=%s", exc, self._path)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        for batch in group:
            if batch.done is not None:
                self._settle(batch.done, error)

    def _settle(self, done: asyncio.Future[None], error: BaseException | None) -> None:
        assert self._loop is not None

        def settle() -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(PersistError(f"cannot write state: {error}"))

        # A closed loop (RuntimeError) means nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)
