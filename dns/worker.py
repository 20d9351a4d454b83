"""A DNS worker process: one more event loop answering on the agent's DNS port.

The agent starts `--dns-workers N` of these. Each binds the DNS address with
SO_REUSEPORT beside the agent's own listener, so the kernel spreads queries
over every process (UDP at random, `dns.reuseport`; TCP connections by the
asker's address and port), and keeps its own copy
of the name table, fed by the agent's change feed over a Unix socket
(`mesh.feedserver`): a snapshot, then every change. It reports its counters
back up that socket every second (`{"dns_worker": PID, "stats": {...}}`),
which the agent sums into `GET /metrics`. When the feed ends (the
agent stopped or cut it off) the worker exits; the agent starts another.

It is started lean: a DNS worker speaks no TLS, so the process the agent starts
(`python -m dns.worker`) keeps `ssl` out before anything imports it, and runs on
asyncio's own event loop (uvloop imports ssl). That is 4-5 MB of resident memory
less per worker (docs/performance.md); the queries' hot path reads and writes the
socket itself (`dns.fastpath`), so the loop is entered once per burst, not per query.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # As asyncio does on a Python built without ssl: its TLS parts are left out.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

from dns.service import DnsService, DnsSettings
from dns.upstreams import parse_upstream
from mesh.core.feedclient import FeedClient
from mesh.core.heap import freeze_startup_heap
from mesh.core.logs import event, setup
from mesh.core.procstats import process_figures, worker_index
from mesh.core.reportgate import ReportGate
from mesh.core.workerargs import WorkerArgsError, read_worker_args

log = logging.getLogger("dns.worker")

#: seconds between two reports of a worker's counters to the agent
REPORT_INTERVAL = 1.0


@dataclass(frozen=True)
class DnsWorkerArgs:
    """What the agent starts a DNS worker with (`mesh.core.workerargs`)."""

    #: the agent's feed socket
    feed: str
    host: str
    port: int
    ttl: int = 5
    #: processes sharing the port (UDP spread at random over them)
    group: int = 0
    domain: str | None = None
    upstream: list[str] = field(default_factory=list)
    log_level: str = "info"


async def run(args: DnsWorkerArgs) -> int:
    feed = FeedClient(args.feed)
    index = worker_index()
    records = await feed.open()
    upstreams = tuple(parse_upstream(u) for u in args.upstream) or None
    service = DnsService(
        DnsSettings(
            host=args.host,
            port=args.port,
            ttl=args.ttl,
            domain=args.domain,
            upstreams=upstreams,
            reuse_port=True,
            reuse_group=args.group,
        )
    )
    service.load(records)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    frozen = freeze_startup_heap()  # after the load: the loaded tables too
    event(log, "dns_worker_ready", seq=feed.seq, records=len(records), frozen_objects=frozen)

    async def follow() -> None:
        await feed.follow(service.on_change)
        stopping.set()

    async def report() -> None:  # the counters, for the agent's metrics
        gate = ReportGate()  # an idle worker's unchanged counters go up only now and then
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            stats = {**service.stats(), **service.metric_counts()}
            if not gate.due((stats, feed.seq), loop.time()):
                continue
            feed.report(
                {
                    "dns_worker": os.getpid(),
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
            "dns_worker": os.getpid(),
            "stats": {**service.stats(), **service.metric_counts()},
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
        args = read_worker_args(DnsWorkerArgs, sys.argv[1:] if argv is None else argv)
    except WorkerArgsError as error:
        print(f"python -m dns.worker: {error}", file=sys.stderr)
        return 2
    setup(args.log_level)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
