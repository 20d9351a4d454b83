"""A client sending requests steadily: `python -m tests.helpers.steady_client HOST PORT RATE
SECONDS TIMEOUT` (run inside the client's namespace).

One request every 1/RATE seconds for SECONDS, each on its own thread so a hung one
does not slow the others: connect, read the echo server's greeting line (its
name), close. A request that gets no greeting within TIMEOUT seconds, or an error,
has failed. At the end it prints one JSON list: `[started, name or null, error,
seconds]` per request, `started` in seconds of CLOCK_MONOTONIC (shared with the test
on the same host).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any


def one(host: str, port: int, timeout: float, started: float, out: list[Any]) -> None:
    name: str | None = None
    error = ""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(0.01, started + timeout - time.monotonic()))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    error = "closed before the greeting"
                    break
                data += chunk
            else:
                name = data.decode().strip()
    except OSError as exc:
        error = type(exc).__name__ if not str(exc) else str(exc)
    out.append([started, name, error, time.monotonic() - started])


def main(argv: list[str]) -> int:
    host, port, rate, seconds, timeout = (
        argv[0],
        int(argv[1]),
        float(argv[2]),
        float(argv[3]),
        float(argv[4]),
    )
    out: list[Any] = []
    threads: list[threading.Thread] = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        at = start + i / rate
        time.sleep(max(0.0, at - time.monotonic()))
        thread = threading.Thread(
            target=one, args=(host, port, timeout, time.monotonic(), out), daemon=True
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout + 2)
    print(json.dumps(sorted(out, key=lambda r: float(r[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
