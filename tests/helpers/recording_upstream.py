"""A task that records exactly what reached it: every byte, every request it parsed.

It reads requests as a plain origin server does (the head up to the empty
line, then a body of Content-Length bytes or chunked, no body without either),
so bytes a proxy forwards without their framing show up here as a request of
their own: the smuggling tests assert on `targets()` and on `raw`. Each answer
names the request it answers (`{"conn", "seq", "method", "target", "host",
"body"}`), so a client can tell whether it got its own.

A request for `/trail...` is answered with a second, unasked-for response in
the same send (a task answering a request smuggled to it): the router must
never pass it on as the answer to the next request.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field

#: what a `/trail` request's answer is followed by, in the same send
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nPOISONED!"


@dataclass
class Recorded:
    conn: int
    seq: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


@dataclass
class RecordingUpstream:
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    raw: dict[int, bytes] = field(default_factory=dict)  # every byte received, per connection
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None
    _conns: list[socket.socket] = field(default_factory=list)
    _count: int = 0

    def start(self) -> RecordingUpstream:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self._sock = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()

    def targets(self) -> list[str]:
        with self._lock:
            return [r.target for r in self.requests]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.raw.clear()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._count += 1
                number = self._count
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        seq = 0
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.raw[number] = self.raw.get(number, b"") + data
                buffer += data
                while (parsed := _parse(buffer)) is not None:
                    request, buffer = parsed
                    seq += 1
                    recorded = Recorded(number, seq, *request)
                    with self._lock:
                        self.requests.append(recorded)
                    try:
                        conn.sendall(_answer(recorded))
                    except OSError:
                        return


def _answer(request: Recorded) -> bytes:
    body = json.dumps(
        {
            "conn": request.conn,
            "seq": request.seq,
            "method": request.method,
            "target": request.target,
            "host": request.header("host"),
            "body": request.body.decode("latin-1"),
        }
    ).encode()
    out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    if request.target.startswith("/trail"):
        out += POISON
    return out


def _parse(buffer: bytes) -> tuple[tuple[str, str, list[tuple[str, str]], bytes], bytes] | None:
    """One request off the front of `buffer` (None: not whole yet), as a naive origin reads it."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0]
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    names = {n.lower(): v for n, v in headers}
    rest_bytes = buffer[end + 4 :]
    if names.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            line_end = rest_bytes.find(b"\r\n")
            if line_end < 0:
                return None
            size = int(rest_bytes[:line_end].split(b";")[0], 16)
            if len(rest_bytes) < line_end + 2 + size + 2:
                return None
            body += rest_bytes[line_end + 2 : line_end + 2 + size]
            rest_bytes = rest_bytes[line_end + 2 + size + 2 :]
            if size == 0:
                return (method, target, headers, body), rest_bytes
    length = int(names.get("content-length", "0") or 0)
    if len(rest_bytes) < length:
        return None
    return (method, target, headers, rest_bytes[:length]), rest_bytes[length:]
