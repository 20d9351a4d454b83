"""Real HTTP backends for the router's tests: one process serving several named tasks.

`python -m tests.helpers.http_backend NAME=PORT ...` serves, on 127.0.0.1:PORT
for each NAME (an aiohttp server, a real peer the router knows nothing of):

- `GET /whoami`: JSON `{"name", "path", "headers"}` (which task answered, what it got)
- `POST /sink`: reads the body as a stream and answers its size and SHA-256
- `POST /slowsink?wait=S`: the same, after not reading for S seconds
- `GET /bytes/N`: N bytes, streamed chunked in 64 KiB pieces (never held whole)
- `GET /sleep/S`: answers after S seconds
- `GET /ws`: a WebSocket echo

`NAME=PORT,CERTFILE,KEYFILE` serves that task over TLS (a task behind an
`sni://` passthrough route terminates TLS itself). `BackendProcess` starts
the process and waits until every port answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import WSMsgType, web

REPO = Path(__file__).resolve().parents[2]
_PIECE = bytes(range(256)) * 256  # 64 KiB


def make_app(name: str) -> web.Application:
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": name, "path": request.path_qs, "headers": dict(request.headers)}
        )

    async def sink(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"name": name, "bytes": size, "sha256": digest.hexdigest()})

    async def slow_sink(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("wait", "2")))  # a task busy elsewhere
        return await sink(request)

    async def stream(request: web.Request) -> web.StreamResponse:
        left = int(request.match_info["size"])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while left > 0:
            piece = _PIECE[: min(left, len(_PIECE))]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text=f"{name} slept\n")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"{name}:{message.data}")
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/sink", sink)
    app.router.add_post("/slowsink", slow_sink)
    app.router.add_get("/bytes/{size}", stream)
    app.router.add_get("/sleep/{seconds}", sleep)
    app.router.add_get("/ws", echo)
    return app


async def serve(tasks: dict[str, str]) -> None:
    runners = []
    for name, spec in tasks.items():
        port, *tls = spec.split(",")
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls[0], tls[1])
        runner = web.AppRunner(make_app(name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(port), ssl_context=context).start()
        runners.append(runner)
    await asyncio.Event().wait()


class BackendProcess:
    def __init__(self, tasks: dict[str, str], log: Path) -> None:
        self.tasks = tasks
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> BackendProcess:
        argv = [
            sys.executable,
            "-m",
            "tests.helpers.http_backend",
            *(f"{name}={port}" for name, port in self.tasks.items()),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        for spec in self.tasks.values():
            port = int(spec.split(",")[0])
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"backend exited: {self.log_path.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("backend did not start") from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


if __name__ == "__main__":
    pairs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    asyncio.run(serve(pairs))
