"""Structured logs: one `key=value` line per significant event (logfmt).

`event(log, "task_registered", task=..., service=...)` writes
`ts=... level=info event=task_registered task=... service=...`, which both a
person and `grep`/Loki/Vector can read.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(log: logging.Logger, what: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if log.isEnabledFor(level):
        pairs = "".join(f" {k}={_quote(v)}" for k, v in fields.items())
        log.log(level, "event=%s%s", what, pairs)


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
