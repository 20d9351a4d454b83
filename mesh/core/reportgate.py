"""Whether a worker's report to the agent is worth sending now.

A worker looks at its counters every `REPORT_INTERVAL` and reports them up the feed
socket; an idle worker's counters do not move, and sending the same report every
second wakes the agent for nothing (and reads /proc for the process figures). So a
report goes out when the counters (or the feed position) changed, and otherwise only
every `heartbeat` seconds, which keeps the process figures (RSS, CPU) fresh enough.
"""

from __future__ import annotations

import json
from typing import Any

#: seconds between two reports of a worker whose counters did not change
HEARTBEAT = 10.0


class ReportGate:
    __slots__ = ("_last", "_sent_at", "heartbeat")

    def __init__(self, heartbeat: float = HEARTBEAT) -> None:
        self.heartbeat = heartbeat
        self._last: str | None = None
        self._sent_at: float | None = None

    def due(self, counters: Any, now: float) -> bool:
        """True (and remembered as sent) if `counters` differ from the last sent, or the
        last report is `heartbeat` old. The counters are compared by their JSON, which
        cannot alias a dict the worker goes on changing."""
        text = json.dumps(counters, sort_keys=True, separators=(",", ":"), default=str)
        if (
            text == self._last
            and self._sent_at is not None
            and now - self._sent_at < self.heartbeat
        ):
            return False
        self._last = text
        self._sent_at = now
        return True
