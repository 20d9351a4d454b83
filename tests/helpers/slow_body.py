"""A slow-body flood (the attack of issue 13, defect 3) and a latency probe of the API.

`SlowBodies` opens connections to the router, each sending a request head
that announces a large body and then only a byte now and then: every such
request is routed, so the router holds a connection to the task as well.
`probe_health` GETs the agent's `/v1/health` over and over on a fresh
connection each time and records how long each took (a refused or timed out
one counts as its timeout). Bounded everywhere: a count, a rate and a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class SlowBodies:
    host: str
    port: int
    vhost: str
    path: str = "/sink"
    body_size: int = 1 << 20
    #: connections that got as far as sending their head
    opened: int = 0
    #: connections refused or closed by the far end before the flood ended
    refused: int = 0
    #: what the router answered on connections it closed (first status line word)
    answers: dict[str, int] = field(default_factory=dict)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def _head(self) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.vhost}\r\n"
            f"Content-Length: {self.body_size}\r\n\r\n"
        ).encode()

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            line = await reader.readline()
            if line:
                parts = line.split()
                status = parts[1].decode() if len(parts) > 1 else "?"
                self.answers[status] = self.answers.get(status, 0) + 1
            self.refused += 1

    async def open(self, count: int, per_second: float, within: float) -> None:
        """Open `count` slow-body connections, at most `per_second`, for at most `within` s."""
        deadline = time.monotonic() + within
        gap = 1.0 / per_second
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), 2.0
                )
                writer.write(self._head() + b"x")
            except (OSError, TimeoutError):
                self.refused += 1
                continue
            self.opened += 1
            self._writers.append(writer)
            self._readers.append(asyncio.ensure_future(self._watch(reader)))
            await asyncio.sleep(gap)

    async def trickle(self, seconds: float, every: float, chunk: int = 1) -> None:
        """Send `chunk` more body bytes on every connection each `every` seconds, for
        `seconds` (a trickle above the router's minimum rate stays until its deadline)."""
        piece = b"x" * chunk
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(every)
            for writer in self._writers:
                if not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write(piece)

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await asyncio.sleep(0.1)  # the aborted transports close their sockets
        self._writers.clear()
        self._readers.clear()


async def health_latency(host: str, port: int, limit: float) -> float:
    """Seconds a GET /v1/health took on a fresh connection (`limit` if it failed)."""
    timeout = limit
    start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            line = await reader.readline()
            if b" 200 " not in line:
                return timeout
            await reader.read()
    except (OSError, TimeoutError):
        return timeout
    finally:
        if writer is not None:
            writer.transport.abort()
    return time.monotonic() - start


async def probe_health(
    host: str, port: int, seconds: float, every: float = 0.1, limit: float = 10.0
) -> list[float]:
    """`health_latency` every `every` seconds for `seconds`: the latencies measured."""
    found = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found.append(await health_latency(host, port, limit))
        await asyncio.sleep(every)
    return found
