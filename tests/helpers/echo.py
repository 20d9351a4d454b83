"""Named echo servers: real TCP servers standing in for tasks behind the load balancer.

Each says its own `address:port` on connect, then echoes what it gets until
EOF, so a client learns which task its connection reached and can check that
a connection still carries data. Threaded, so sync tests (and sockets made
inside a network namespace by `Netns.call`) can use them; `connections` counts
accepted connections.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class EchoServer:
    def __init__(self, address: str, port: int, sock: socket.socket | None = None) -> None:
        """Serve on `address:port`, or on `sock` already bound there (in a namespace)."""
        self.address = address
        self.port = port
        self.name = f"{address}:{port}"
        if sock is None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
        sock.listen(256)
        sock.settimeout(0.2)
        self.sock = sock
        self.connections = 0
        self.open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"echo-{self.name}")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            conn.sendall(f"{self.name}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Stop accepting (connections already open keep being served)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(2)


def hello(address: str, port: int, timeout: float = 3.0) -> str | None:
    """One connection: the name of the server that answered, or None."""
    try:
        with socket.socket() as sock:
            sock.settimeout(timeout)
            sock.connect((address, port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.decode(errors="replace").strip() or None
