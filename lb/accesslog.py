"""Access logs of the HTTP router and the L4 proxy, written off the hot path.

A request (or an L4 connection) that the sampler takes becomes an `Entry` (a dict of
plain values) appended to a bounded queue; a writer thread drains it, formats each
entry (JSON lines or the Combined Log Format) and writes whole lines with one
`write` per batch to a file opened `O_APPEND` (so several processes' writers may share
one file without tearing lines) or to stdout. When the queue is full the entry is
dropped and counted: the proxy never waits for the disk.

Appending to a deque and reading its length are atomic under the GIL, so the hot path
takes no lock and makes no syscall; the writer polls instead of being woken. An idle
writer does not poll for ever: after `PARK_AFTER` empty looks it parks on an event that
the next `put` sets (one lock per park, not per entry), so an idle process is not woken
ten times a second by its access log.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMATS = ("json", "clf")
#: entries waiting for the writer; past it they are dropped (and counted)
QUEUE_LIMIT = 8192
#: how often the writer looks at the queue, seconds
POLL_SECONDS = 0.1
#: empty looks in a row after which the writer parks until the next entry
PARK_AFTER = 10
#: bytes of lines joined into one write
BATCH_BYTES = 64 << 10

Entry = dict[str, Any]


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    #: a file path, or "-" for stdout
    path: str = "-"
    #: the share of requests logged, 0..1 (0: off)
    rate: float = 0.01
    format: str = "json"

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"access-log sample rate {self.rate!r}: between 0 and 1")
        if self.format not in FORMATS:
            raise ValueError(f"access-log format {self.format!r}: one of {', '.join(FORMATS)}")


#: no access log (a rate of 0)
OFF = AccessLogSettings(rate=0.0)


class Sampler:
    """Whether to log this one: `rng() < rate` (the RNG is injected for tests)."""

    __slots__ = ("_rng", "rate")

    def __init__(self, rate: float, rng: Callable[[], float] = random.random) -> None:
        self.rate = rate
        self._rng = rng

    def take(self) -> bool:
        rate = self.rate
        if rate >= 1.0:
            return True
        return rate > 0.0 and self._rng() < rate


class _SecondCache:
    """`strftime` of the current second, formatted once a second (a writer formats
    thousands of lines a second, nearly all in the second of the one before)."""

    __slots__ = ("_pattern", "_second", "_text")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._second = -1
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._text = time.strftime(self._pattern, time.gmtime(second))
            self._second = second
        return self._text


_clf_second = _SecondCache("%d/%b/%Y:%H:%M:%S +0000")
_iso_second = _SecondCache("%Y-%m-%dT%H:%M:%S")


def _clf_time(when: float) -> str:
    return _clf_second(when)


def _iso_time(when: float) -> str:
    return f"{_iso_second(when)}.{int(when % 1 * 1000):03d}Z"


def _quoted(value: object) -> str:
    """A CLF quoted field: `"` and `\\` escaped, control characters dropped."""
    text = str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the usual case, at once
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return "".join(c for c in text if c.isprintable())


#: a JSON string literal, all ASCII (the C encoder json.dumps uses): no byte of it can
#: read as a line end (U+2028 would, to a reader using str.splitlines)
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def format_json(entry: Entry) -> str:
    """One JSON object on one line; built field by field, about twice as fast as
    `json.dumps` of the dict (the writer formats every logged request)."""
    parts = []
    for key, value in entry.items():
        if key == "time":
            value = _iso_time(value)
        if isinstance(value, str):
            parts.append(f'"{key}":{_json_string(value)}')
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f'"{key}":{value}')
        elif isinstance(value, float):
            parts.append(f'"{key}":{value!r}' if math.isfinite(value) else f'"{key}":null')
        else:
            parts.append(f'"{key}":{json.dumps(value)}')
    return "{" + ",".join(parts) + "}"


def format_clf(entry: Entry) -> str:
    """The Combined Log Format; an L4 connection reads as `CONNECT service` with the
    bytes sent to the client."""
    client = entry.get("client") or "-"
    when = _clf_time(entry["time"])
    if entry.get("kind") == "tcp" or entry.get("kind") == "udp":
        request = f"{entry['kind'].upper()} {entry.get('service', '-')} -"
        status: object = "-"
        size = entry.get("bytes_out", 0)
    else:
        request = (
            f"{entry.get('method', '-')} {entry.get('path', '-')} {entry.get('protocol', '-')}"
        )
        status = entry.get("status", "-")
        size = entry.get("bytes", 0)
    return (
        f'{client} - - [{when}] "{_quoted(request)}" {status} {size or "-"} '
        f'"{_quoted(entry.get("referer") or "-")}" "{_quoted(entry.get("user_agent") or "-")}"'
    )


FORMATTERS: dict[str, Callable[[Entry], str]] = {"json": format_json, "clf": format_clf}


class AccessQueue:
    """The bounded queue between the hot path and the writer; counts what it drops."""

    __slots__ = ("dropped", "entries", "limit", "queued")

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.entries: collections.deque[Entry] = collections.deque()
        self.limit = limit
        self.queued = 0
        self.dropped = 0

    def put(self, entry: Entry) -> bool:
        if len(self.entries) >= self.limit:
            self.dropped += 1
            return False
        self.entries.append(entry)
        self.queued += 1
        return True

    def drain(self, formatter: Callable[[Entry], str], max_bytes: int = BATCH_BYTES) -> bytes:
        """Whole lines, at most `max_bytes` (or one longer line), from the queue's front."""
        lines: list[str] = []
        size = 0
        entries = self.entries
        while entries:
            line = formatter(entries[0]) + "\n"
            size += len(line)
            if size > max_bytes and lines:
                break  # it starts the next batch: a batch stays within one write's bound
            entries.popleft()
            lines.append(line)
        return "".join(lines).encode("utf-8", "replace")


class AccessLog:
    """One process's access log: a sampler, a queue, and a writer thread."""

    def __init__(
        self,
        settings: AccessLogSettings,
        *,
        rng: Callable[[], float] = random.random,
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self.settings = settings
        self.sampler = Sampler(settings.rate, rng)
        self.queue = AccessQueue(limit)
        self.written = 0
        self.write_errors = 0
        self._formatter = FORMATTERS[settings.format]
        self._fd = -1
        self._batch = BATCH_BYTES
        self._stop = threading.Event()
        #: set by `put` when the writer is parked (and by `stop`)
        self._wake = threading.Event()
        self._parked = False
        #: times the writer woke up, and parked (tests read them)
        self.wakeups = 0
        self.parks = 0
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.sampler.rate > 0.0

    def take(self) -> bool:
        """Whether this request is logged (then `put` its entry)."""
        return self.sampler.take()

    def put(self, entry: Entry) -> None:
        self.queue.put(entry)
        if self._parked:  # the writer sleeps until told: tell it (once per park)
            self._parked = False
            self._wake.set()

    def counters(self) -> dict[str, int]:
        return {
            "access_log_written": self.written,
            "access_log_dropped": self.queue.dropped,
            "access_log_write_errors": self.write_errors,
        }

    def start(self) -> None:
        """Open the destination and start the writer (nothing when the rate is 0)."""
        if not self.enabled or self._thread is not None:
            return
        path = self.settings.path
        try:
            if path == "-":
                self._fd = os.dup(1)
            else:
                self._fd = os.open(
                    path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
        except OSError as exc:  # the agent's start fails with this one line
            raise OSError(exc.errno, f"access log {path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            # A pipe keeps a write whole only up to PIPE_BUF: other writers (the agent's
            # own log, another process's access log) may share it.
            self._batch = select.PIPE_BUF
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (within `timeout`) and close the destination."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if not thread.is_alive():
            os.close(self._fd)
        self._fd = -1

    def flush(self) -> None:
        """Write every queued entry now (the writer thread does this on its own)."""
        while self.queue.entries:
            data = self.queue.drain(self._formatter, self._batch)
            lines = data.count(b"\n")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                self.written += lines
            except OSError:
                self.write_errors += 1  # a full disk: the lines are lost, and counted

    def _run(self) -> None:
        empty = 0
        while not self._stop.wait(POLL_SECONDS):
            self.wakeups += 1
            if self.queue.entries:
                empty = 0
                self.flush()
                continue
            empty += 1
            if empty < PARK_AFTER:
                continue
            # Park. `_parked` is set before the queue is looked at again, so an entry
            # put meanwhile is either seen here or sets `_wake` (the GIL orders both).
            self._wake.clear()
            self._parked = True
            if not self.queue.entries and not self._stop.is_set():
                self.parks += 1
                self._wake.wait()
            self._parked = False
            empty = 0
            self.flush()
        self.flush()
