"""The router out of descriptors (issue 13, defect 3): its own shortage is never a task's failure.

In-process, with real sockets: a router on 127.0.0.1 routes to a real task;
a client connection is made, then this process's soft RLIMIT_NOFILE is
lowered to the descriptors it holds, so the router's connect to the task
fails with EMFILE. The client gets 503, the shortage is counted on its own,
and the task is neither ejected nor counted as a connect failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterator

from lb.http.router import Router
from lb.http.routes import RouteTable
from lb.http.settings import RouterSettings
from mesh.core.model import Health, Service, Task


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The limit bounds descriptor numbers, and a new one takes the lowest free number:
    # a limit at that number leaves none free.
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _task_server() -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def test_emfile_on_connect_is_503_and_no_ejection() -> None:
    task_server = await _task_server()
    task_port = task_server.sockets[0].getsockname()[1]
    table = RouteTable()
    table.load(
        [
            Service(
                name="app",
                id="id-app",
                labels={"mesh.http.hosts": "app.test", "mesh.http.port": "80"},
            ),
            Task(
                id="t1",
                name="app.1.t1",
                service="app",
                slot=1,
                node="n",
                address="127.0.0.1",
                ports={80: task_port},
                health=Health.HEALTHY,
            ),
        ]
    )
    router = Router(table, RouterSettings(pool_size=0))  # every request connects anew
    port = await router.listen_http("127.0.0.1", 0, reuse_port=False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):  # until the router has accepted it
            if router.conns:
                break
            await asyncio.sleep(0.01)
        with descriptors_exhausted():
            head = await _ask(reader, writer)
        status_line = head.split(b"\r\n")[0]
        print(
            f"\nanswered while out of descriptors: {status_line!r}; counters: {router.snapshot()}"
        )
        assert head.startswith(b"HTTP/1.1 503 "), head
        snap = router.snapshot()
        assert snap["ejected"] == [] and snap["ejections"] == 0, snap
        assert snap["connect_failures"] == 0 and snap["fd_shortage"] == 1, snap
        writer.close()
        # Descriptors are back: the same task serves the next request.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await _ask(reader, writer)
        assert head.startswith(b"HTTP/1.1 200 "), head
        writer.close()
    finally:
        await router.close()
        task_server.close()
        await task_server.wait_closed()
