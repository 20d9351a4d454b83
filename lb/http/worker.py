"""An HTTP router worker process: one more event loop serving the HRM port.

The agent starts `--http-workers N` of these (and then serves no HTTP in its
own loop). Each binds the HTTP (and HTTPS) address with SO_REUSEPORT, so the
kernel spreads connections over the workers as nginx's `reuseport` does, and
keeps its own route table, fed by the agent's change feed over a Unix socket
(`mesh.core.feedclient`). When the feed ends the worker exits; the agent starts another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import uvloop

from lb.fds import raise_open_file_limit
from lb.http.service import HttpEndpoints, HttpService
from lb.http.settings import RouterSettings
from lb.http.tls import CertSpec
from mesh.core.feedclient import FeedClient
from mesh.core.heap import freeze_startup_heap
from mesh.core.logs import event, setup
from mesh.core.procstats import process_figures, worker_index
from mesh.core.reportgate import ReportGate
from mesh.core.workerargs import WorkerArgsError, read_worker_args, worker_command

log = logging.getLogger("lb.http.worker")

#: seconds between two reports of a worker's counters to the agent
REPORT_INTERVAL = 1.0


@dataclass(frozen=True)
class HttpWorkerArgs:
    """What the agent starts an HTTP worker with (`mesh.core.workerargs`)."""

    #: the agent's feed socket
    feed: str
    host: str
    port: int
    https_host: str | None = None
    https_port: int = 0
    #: `--tls-cert` values, "HOST=CERTFILE,KEYFILE"
    tls_cert: list[str] = field(default_factory=list)
    #: RouterSettings' fields
    settings: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


def worker_argv(
    feed: str, endpoints: HttpEndpoints, settings: RouterSettings, log_level: str
) -> list[str]:
    """The command line of one worker."""
    return worker_command(
        "lb.http.worker",
        HttpWorkerArgs(
            feed=feed,
            host=endpoints.host,
            port=endpoints.port,
            https_host=endpoints.https_host,
            https_port=endpoints.https_port,
            tls_cert=[str(spec) for spec in endpoints.certs],
            settings=dataclasses.asdict(settings),
            log_level=log_level,
        ),
    )


async def run(args: HttpWorkerArgs) -> int:
    feed = FeedClient(args.feed)
    index = worker_index()
    records = await feed.open()
    endpoints = HttpEndpoints(
        host=args.host,
        port=args.port,
        https_host=args.https_host,
        https_port=args.https_port,
        certs=tuple(CertSpec.parse(c) for c in args.tls_cert),
        reuse_port=True,
    )
    service = HttpService(endpoints, RouterSettings(**args.settings))
    service.load(records)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    frozen = freeze_startup_heap()  # after the load: the loaded tables too
    event(log, "http_worker_ready", seq=feed.seq, records=len(records), frozen_objects=frozen)

    async def follow() -> None:
        await feed.follow(service.on_change)
        stopping.set()

    async def report() -> None:  # the counters, for the agent's metrics
        gate = ReportGate()  # an idle worker's unchanged counters go up only now and then
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            stats = service.snapshot()
            if not gate.due((stats, feed.seq), loop.time()):
                continue
            feed.report(
                {
                    "http_worker": os.getpid(),
                    "stats": stats,
                    "index": index,
                    "process": process_figures(),
                    "seq": feed.seq,
                }
            )

    follower = asyncio.create_task(follow())
    reporter = asyncio.create_task(report())
    await stopping.wait()
    follower.cancel()
    reporter.cancel()
    await asyncio.gather(follower, reporter, return_exceptions=True)
    # The last counts, so that a worker stopped on purpose loses none of them.
    feed.report(
        {
            "http_worker": os.getpid(),
            "stats": service.snapshot(),
            "index": index,
            "process": process_figures(),
            "seq": feed.seq,
        }
    )
    feed.close()
    await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = read_worker_args(HttpWorkerArgs, sys.argv[1:] if argv is None else argv)
    except WorkerArgsError as error:
        print(f"python -m lb.http.worker: {error}", file=sys.stderr)
        return 2
    setup(args.log_level)
    soft, hard = raise_open_file_limit()  # (inherited from the agent, raised already there)
    event(log, "open_file_limit", soft=soft, hard=hard)
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
