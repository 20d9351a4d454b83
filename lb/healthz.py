"""The health listener for external load balancers: `--lb-healthz ADDR[:PORT]` (10256).

`GET /v1/lb/healthz/<service>` answers 200 or 503 with the body `GET` on the
API gives (`lb.policy.healthz`), without credentials: what it tells (whether this
node has a healthy task of a service) is what an external load balancer probing
the published port learns anyway. Nothing else is served (404); HEAD is answered
without a body.

Every peer is assumed hostile, so it is small and bounded, not aiohttp:

- at most `max_connections` at once (64), and `per_peer` (8) from one address;
  one over is closed at once, unanswered, and counted (`refused_busy`);
- the request head must arrive whole within `timeout` (2 s) and within
  `MAX_HEAD` bytes (1 KiB), else the connection is closed and counted
  (`timeouts`, `bad_requests`); the body, if any, is never read;
- one request per connection (`Connection: close`): nothing is kept between them.

Nothing is logged per request; the counters show in `GET /v1/lb` (`healthz`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from urllib.parse import unquote

from lb.policy import Health

log = logging.getLogger(__name__)

DEFAULT_PORT = 10256  # kube-proxy's healthz port
PATH_PREFIX = "/v1/lb/healthz/"
MAX_HEAD = 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS[503] = "Service Unavailable"


class HealthListener:
    def __init__(
        self,
        answer: Callable[[str], Health],
        host: str,
        port: int = DEFAULT_PORT,
        *,
        max_connections: int = 64,
        per_peer: int = 8,
        timeout: float = 2.0,
    ) -> None:
        self._answer = answer
        self.host = host
        self.port = port
        self._max = max_connections
        self._per_peer = per_peer
        self._timeout = timeout
        self._open: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self.counters: Counter[str] = Counter(
            requests=0, refused_busy=0, bad_requests=0, timeouts=0
        )

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port the kernel chose, for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def stats(self) -> dict[str, int]:
        return {**self.counters, "open": sum(self._open.values())}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=MAX_HEAD
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if sum(self._open.values()) >= self._max or self._open[who] >= self._per_peer:
            self.counters["refused_busy"] += 1
            writer.transport.abort()
            return
        self._open[who] += 1
        try:
            await self._one_request(reader, writer)
        except (ConnectionError, OSError):
            pass  # the peer went away: nothing to answer
        finally:
            self._open[who] -= 1
            if not self._open[who]:
                del self._open[who]
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
        except TimeoutError:
            self.counters["timeouts"] += 1
            return
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            self.counters["bad_requests"] += 1
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.counters["bad_requests"] += 1
            await self._write(writer, 400, {"error": "bad request"}, body=True)
            return
        method, target = parts[0], parts[1].decode("latin-1").split("?", 1)[0]
        self.counters["requests"] += 1
        if method not in (b"GET", b"HEAD"):
            await self._write(writer, 405, {"error": "GET or HEAD only"}, body=method != b"HEAD")
            return
        name = unquote(target[len(PATH_PREFIX) :]) if target.startswith(PATH_PREFIX) else ""
        if not name or "/" in name:
            body = method == b"GET"
            await self._write(writer, 404, {"error": f"try {PATH_PREFIX}<service>"}, body)
            return
        health = self._answer(name)
        await self._write(writer, health.status, health.body, body=method == b"GET")

    async def _write(
        self, writer: asyncio.StreamWriter, status: int, payload: object, body: bool
    ) -> None:
        data = json.dumps(payload).encode() + b"\n"
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head + data if body else head)
        await asyncio.wait_for(writer.drain(), self._timeout)
