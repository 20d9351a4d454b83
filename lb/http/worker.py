"""An HTTP router worker process: one more event loop serving the HRM port.

The agent starts `--http-workers N` of these (and then serves no HTTP in its
own loop). Each binds the HTTP (and HTTPS) address with SO_REUSEPORT, so the
kernel spreads connections over the workers as nginx's `reuseport` does, and
keeps its own route table, fed by the agent's change feed over a Unix socket
(`mesh.core.feedclient`). When the feed ends the worker exits; the agent starts another.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys

import uvloop

from lb.fds import raise_open_file_limit
from lb.http.service import HttpEndpoints, HttpService
from lb.http.settings import RouterSettings
from lb.http.tls import CertSpec
from mesh.core.feedclient import FeedClient
from mesh.core.logs import event, setup
from mesh.core.procstats import process_figures, worker_index
from mesh.core.reportgate import ReportGate

log = logging.getLogger("lb.http.worker")

#: seconds between two reports of a worker's counters to the agent
REPORT_INTERVAL = 1.0


def worker_argv(
    feed: str, endpoints: HttpEndpoints, settings: RouterSettings, log_level: str
) -> list[str]:
    """The command line of one worker (the inverse of `parse_args`)."""
    argv = [
        sys.executable,
        "-m",
        "lb.http.worker",
        "--feed",
        feed,
        "--host",
        endpoints.host,
        "--port",
        str(endpoints.port),
        "--settings",
        json.dumps(dataclasses.asdict(settings)),
        "--log-level",
        log_level,
    ]
    if endpoints.https_host is not None:
        argv += ["--https-host", endpoints.https_host, "--https-port", str(endpoints.https_port)]
    for spec in endpoints.certs:
        argv += ["--tls-cert", str(spec)]
    return argv


async def run(args: argparse.Namespace) -> int:
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
    service = HttpService(endpoints, RouterSettings(**json.loads(args.settings)))
    service.load(records)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    event(log, "http_worker_ready", seq=feed.seq, records=len(records))

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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lb.http.worker")
    parser.add_argument("--feed", required=True, help="the agent's feed socket")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--https-host")
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--tls-cert", action="append", default=[])
    parser.add_argument("--settings", default="{}", help="RouterSettings as JSON")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.log_level)
    soft, hard = raise_open_file_limit()  # (inherited from the agent, raised already there)
    event(log, "open_file_limit", soft=soft, hard=hard)
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
