"""A DNS worker process: one more event loop answering on the agent's DNS port.

The agent starts `--dns-workers N` of these. Each binds the DNS address with
SO_REUSEPORT beside the agent's own listener, so the kernel spreads queries
over every process (by the asker's address and port), and keeps its own copy
of the name table, fed by the agent's change feed over a Unix socket
(`mesh.feedserver`): a snapshot, then every change. When the feed ends (the
agent stopped or cut it off) the worker exits; the agent starts another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import uvloop

from dns.forward import parse_upstream
from dns.service import DnsService, DnsSettings
from mesh.logs import event, setup
from mesh.state.codec import record_from_dict
from mesh.state.model import KIND_OF, Change, Kind, Record

log = logging.getLogger("dns.worker")

#: the longest feed line: a snapshot of a large cluster
LINE_LIMIT = 1 << 30


class Replica:
    """The records as the feed has delivered them, to give each change its `before`."""

    def __init__(self) -> None:
        self._records: dict[tuple[Kind, str], Record] = {}

    def load(self, records: list[Record]) -> None:
        for record in records:
            self._records[(KIND_OF[type(record)], record.key)] = record

    def change(self, record: Record) -> Change:
        key = (KIND_OF[type(record)], record.key)
        before = self._records.get(key)
        self._records[key] = record
        return Change(key[0], record.key, before, record)


async def run(args: argparse.Namespace) -> int:
    reader, writer = await asyncio.open_unix_connection(args.feed, limit=LINE_LIMIT)
    first = json.loads(await reader.readline())
    records = [record_from_dict(r) for r in first["records"]]
    upstreams = tuple(parse_upstream(u) for u in args.upstream) or None
    service = DnsService(DnsSettings(host=args.host, port=args.port, ttl=args.ttl,
                                     domain=args.domain, upstreams=upstreams,
                                     reuse_port=True))
    replica = Replica()
    replica.load(records)
    service.load(records)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    event(log, "dns_worker_ready", seq=first["snapshot"], records=len(records))

    async def follow() -> None:
        while line := await reader.readline():
            message = json.loads(line)
            service.on_change(replica.change(record_from_dict(message["record"])))
        stopping.set()

    follower = asyncio.create_task(follow())
    await stopping.wait()
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    writer.close()
    await service.stop()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dns.worker")
    parser.add_argument("--feed", required=True, help="the agent's feed socket")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--domain")
    parser.add_argument("--upstream", action="append", default=[])
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.log_level)
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

